"""Ternary linear layers of BitNet b1.58 checkpoints, and BitNet's squared-ReLU feed-forward.

Responsibility: take a layer's weights as the hub stores them and compute what transformers' BitNet
integration computes, with the weights held at 4 bits.
- Checkpoint form (``microsoft/bitnet-b1.58-2B-4T``, transformers' ``pack_weights``): ``weight`` uint8
  ``[out / 4, in]``, where bits ``2i..2i+1`` of byte ``[r, k]`` hold the ternary value of row
  ``i * out / 4 + r`` plus one (codes 0, 1, 2); ``weight_scale`` ``[1]``.
- ``linear_class: bitlinear`` (transformers' ``BitLinear``): activations are quantized per token to
  integers ``q = clamp(round(x * s), -128, 127)`` with ``s = 127 / max|x|``, and
  ``y = (q @ T.T) / (weight_scale * s) + bias``. ``autobitlinear`` (offline): the activations are
  rounded the same way but divided back, ``y = (q / s @ T.T + bias) * weight_scale``.
- In memory: ``T + 8`` as 4-bit values in torch's int4 CPU kernel layout (:mod:`.int4_pack`) with unit
  scales and zero points, one shared tensor per shape (a few hundred KiB per process, not per block):
  0.125x of float32's bytes.
What runs: ``q`` is an integer of at most 8 bits, exact in bfloat16. In a bfloat16 (or float16) span,
small batches go through the kernel's vectorised bfloat16 code, whose product is rounded to bfloat16 as
transformers' bfloat16 ``F.linear`` rounds it; larger ones (prefill) take the exact product, rounded
once to the span's dtype (computed in bfloat16 where :func:`~.quant.dense_bfloat16` says the CPU is
fast at it: integer products summed in float32 give the same bits). In a float32 span every product is exact, as in
transformers' float32 layers: chunks of rows are dequantized and multiplied densely (integer sums stay
below 2^24); the kernel's bfloat16 rounding (a relative 2^-9), re-quantized by the next layer, moved a
tiny random model's last hidden states by 5% and its argmax on 4% of positions. Measured on a
6912x2560 weight, one token, one thread: kernel 1.4 ms, a dense float32 weight 2.8 ms, the exact
dense path 29 ms, a 2-bit form unpacked at every step 41 ms, the kernel's float32 code 52 ms: so
bfloat16 is the dtype to serve BitNet in, float32 the one to check it against transformers in.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int4_pack
from .norms import RMSNorm
from .quant import QuantizedLinearInt4, dense_bfloat16

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
VALUES_PER_BYTE = 4
_KERNEL_GROUPS = (128, 64, 32)  # the kernel's group sizes, largest first (fewest scales to read)
_SCALE_DTYPE = torch.bfloat16


def unpack_ternary(packed: Tensor) -> Tensor:
    """uint8 ``[out / 4, in]`` in the checkpoint's form -> int8 ``[out, in]`` ternary values."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed ternary weights must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    codes = torch.cat([(packed >> (2 * i)) & 3 for i in range(VALUES_PER_BYTE)])
    if bool((codes == 3).any()):
        raise ValueError("packed ternary weights hold the code 3, which is no ternary value")
    return codes.to(torch.int8) - 1


def pack_ternary(values: Tensor) -> Tensor:
    """int ``[out, in]`` ternary values (``out`` a multiple of 4) -> the checkpoint's uint8 ``[out / 4, in]``."""
    rows = values.shape[0] // VALUES_PER_BYTE
    if values.dim() != 2 or rows * VALUES_PER_BYTE != values.shape[0]:
        raise ValueError(f"ternary weights must be [out, in] with out a multiple of 4, got {tuple(values.shape)}")
    codes = (values + 1).to(torch.uint8)
    packed = torch.zeros(rows, values.shape[1], dtype=torch.uint8)
    for i in range(VALUES_PER_BYTE):
        packed |= codes[i * rows : (i + 1) * rows] << (2 * i)
    return packed


def quantize_activations(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token int8 quantization, in ``x``'s dtype, in transformers' order: (integers ``q`` as ``x``'s
    dtype, scales ``s`` [..., 1]) with ``q = clamp(round(x * s), -128, 127)``, ``s = 127 / max|x|``."""
    scale = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    return (x * scale).round().clamp(-128, 127), scale


@functools.cache
def _unit_scales(groups: int, out_features: int, device: torch.device) -> Tensor:
    """The kernel's ``[groups, N, 2]`` scales and zero points for weights that are their own values."""
    scales_and_zeros = torch.zeros(groups, out_features, 2, dtype=_SCALE_DTYPE, device=device)
    scales_and_zeros[..., 0] = 1
    return scales_and_zeros


class TernaryLinear(QuantizedLinearInt4):
    """A BitNet linear layer; a drop-in for ``nn.Linear`` once its checkpoint tensors are loaded.

    Built empty (on the meta device, by the family), it takes ``weight`` and ``weight_scale`` in the
    checkpoint's form through ``load_state_dict`` and converts them there. ``input_norm``: an RMSNorm
    applied to the input first (BitNet's ``attn_sub_norm`` before ``o_proj``, ``ffn_sub_norm`` before
    ``down_proj``); it lives here so that those projections stay plain modules of their parents.
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False, linear_class: str = "bitlinear",
                 input_norm: RMSNorm | None = None) -> None:
        nn.Module.__init__(self)
        if out_features % VALUES_PER_BYTE:
            raise ValueError(f"a ternary layer's outputs must be a multiple of 4, got {out_features}")
        if linear_class not in LINEAR_CLASSES:
            raise ValueError(f"unknown BitNet linear_class {linear_class!r}; use one of {LINEAR_CLASSES}")
        self.in_features, self.out_features, self.linear_class = in_features, out_features, linear_class
        self.group_size = next((g for g in _KERNEL_GROUPS if in_features % g == 0), _KERNEL_GROUPS[-1])
        self.layout = "plain"
        self.register_buffer("weight", torch.empty(out_features // VALUES_PER_BYTE, in_features, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.ones(1))
        self.register_buffer("scales_and_zeros", torch.empty(0, dtype=_SCALE_DTYPE), persistent=False)
        self._init_bias(torch.zeros(out_features) if bias else None)
        self.input_norm = input_norm
        self.loaded = False

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        packed = state_dict.get(prefix + "weight")
        if packed is not None and (packed.dtype != torch.uint8 or tuple(packed.shape) != tuple(self.weight.shape)
                                   or self.loaded):
            raise ValueError(f"{prefix}weight must be packed ternary weights, uint8 "
                             f"{list(self.weight.shape)}, got {packed.dtype} {list(packed.shape)}")
        scale = state_dict.get(prefix + "weight_scale")
        if scale is not None and scale.numel() != 1:
            raise ValueError(f"{prefix}weight_scale must hold one value, got shape {list(scale.shape)}")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if packed is not None and scale is not None and packed.device.type != "meta":
            self._convert(packed, scale)

    def _convert(self, packed: Tensor, scale: Tensor) -> None:
        """The checkpoint's 2-bit form -> 4-bit values in the kernel's layout (or the plain one)."""
        values = unpack_ternary(packed).to(torch.int32) + 8  # 7, 8, 9: (q - 8) * 1 + 0 gives T back
        rows, cols, group = self.out_features, self.in_features, self.group_size
        if (packed.device.type == "cpu" and int4_pack.kernel_available() and rows % 16 == 0
                and cols % group == 0):
            self.weight, self.layout = int4_pack.pack_for_kernel(values), int4_pack.kernel_layout()
        else:
            padded = -(-cols // group) * group
            self.weight, self.layout = int4_pack.pack_plain(F.pad(values, (0, padded - cols), value=8)), "plain"
        self.weight = self.weight.to(packed.device)
        self.scales_and_zeros = _unit_scales(self.weight.shape[1] * 2 // group, rows, packed.device)
        self.weight_scale = scale.detach().reshape(1).clone()  # not a view of the checkpoint file's map
        self.loaded = True

    def stored_bytes(self, element_size: int) -> int:
        """Bytes this layer holds once loaded: 4-bit weights, its scale, bias and norm in the model dtype
        (``element_size`` bytes each); the unit scales are shared by every layer of the shape."""
        padded = -(-self.in_features // self.group_size) * self.group_size
        extra = 1 + (self.out_features if self.bias is not None else 0)
        extra += self.input_norm.weight.numel() if self.input_norm is not None else 0
        return self.out_features * padded // 2 + extra * element_size

    def matmul(self, rows: Tensor) -> Tensor:
        if rows.dtype == torch.float32:  # exact, as transformers' float32 layers (see the module docstring)
            return self.dense_matmul(rows)
        if self.uses_kernel and rows.device.type == "cpu" and rows.shape[0] <= self.kernel_max_rows:
            return super().matmul(rows)
        # many rows: the exact product, rounded once to the rows' dtype. In bfloat16 where the CPU multiplies
        # it fast (integer products summed in float32, below 2^24: the same bits as float32's product
        # rounded; a 512-token prefill of a 2B4T block ran 0.78x float32's speed through float32)
        if rows.dtype == torch.bfloat16 and dense_bfloat16():
            return self.dense_matmul(rows)
        return self.dense_matmul(rows.float()).to(rows.dtype)

    def forward(self, x: Tensor) -> Tensor:
        if not self.loaded:
            raise RuntimeError("a TernaryLinear computes only once its checkpoint weights are loaded")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"input has {x.shape[-1]} features, the layer takes {self.in_features}")
        rows = x.reshape(-1, self.in_features)
        if self.input_norm is not None:
            rows = self.input_norm(rows)
        if self.linear_class == "bitlinear":
            q, scale = quantize_activations(rows)
            y = self.matmul(q) / (self.weight_scale * scale)
            if self.bias is not None:
                y = y + self.bias
        else:  # AutoBitLinear rounds the activations in float32
            q, scale = quantize_activations(rows.float())
            y = (self.matmul(q.to(rows.dtype)).float() / scale).to(rows.dtype)
            if self.bias is not None:
                y = y + self.bias
            y = y * self.weight_scale
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, linear_class={self.linear_class}"


class BitNetMLP(nn.Module):
    """BitNet's feed-forward: down(ffn_sub_norm(relu(gate(x))^2 * up(x))), every projection ternary."""

    def __init__(self, hidden_size: int, intermediate_size: int, eps: float, linear_class: str) -> None:
        super().__init__()
        self.gate_proj = TernaryLinear(hidden_size, intermediate_size, linear_class=linear_class)
        self.up_proj = TernaryLinear(hidden_size, intermediate_size, linear_class=linear_class)
        self.down_proj = TernaryLinear(intermediate_size, hidden_size, linear_class=linear_class,
                                       input_norm=RMSNorm(intermediate_size, eps))

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(torch.square(F.relu(self.gate_proj(x))) * self.up_proj(x))
