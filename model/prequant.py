"""Checkpoints the hub ships already quantized to 4 bits: GPTQ and compressed-tensors' pack-quantized int4.

Responsibility: read a checkpoint's ``quantization_config`` into a :class:`PrequantSpec`, and give each
linear layer it covers a module (:class:`GPTQLinear`, :class:`PackedInt4Linear`) whose parameter names
are the checkpoint's and which turns those tensors, as ``load_state_dict`` hands them over, straight
into :class:`~.quant.QuantizedLinearInt4`'s form: no float copy of a weight is ever made.
- GPTQ (``quant_method: gptq``, 4 bits, ``checkpoint_format`` ``gptq``): ``qweight`` int32 ``[K / 8, N]``
  (eight inputs a word, the first in the low bits), ``qzeros`` int32 ``[K / g, N / 8]`` (eight outputs a
  word), ``scales`` ``[K / g, N]``, ``g_idx`` ``[K]``; ``w = (q - (z + 1)) * scale`` (the format keeps
  zero points minus one; ``gptq_v2`` does not).
- compressed-tensors ``pack-quantized`` (Kimi K2 Thinking's routed experts): ``weight_packed`` int32
  ``[N, K / 8]`` (eight inputs a word, stored as ``q + 8``), ``weight_scale`` ``[N, K / g]``, an optional
  ``weight_zero_point`` ``[N / 8, K / g]`` (packed the same way), ``weight_shape`` ``[2]``;
  ``w = (q - zero_point) * scale``.
Our form is ``w = (v - 8) * scale + zero`` with ``v`` in 0..15, so ``v`` is the stored value, offset, and
``zero = (8 - z) * scale``. Scales and zero points are kept where every value is exact: symmetric
weights (zero points 0) in the checkpoint's 16-bit scale dtype, asymmetric ones in float32; so the
dense path (prefill, float32 checks) multiplies by exactly the checkpoint's weights. Where our kernels
are built (:mod:`.kernels`) the weights are held in their form, the plain layout (byte for byte the
compressed-tensors words), scales in the checkpoint's dtype, read as stored; else torch's kernel reads
them, converted to bfloat16.
Mixture-of-Experts blocks: routed experts stored so (one layer per expert and projection) become a
:class:`PrequantExperts`.
Invariants: only layers in the checkpoint's target list become quantized modules (routers, the LM head
and ``ignore``/``modules_to_not_convert`` entries stay as they are); a layout, bit width or grouping this
module cannot read exactly (activation order with a shuffled ``g_idx``, 8 bits, channel-wise or
per-tensor strategies) is refused when the config is read, never approximated.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import int4_pack, kernels
from .moe import Experts
from .quant import (
    INT4_GROUP_SIZES,
    OURS_MAX_ROWS,
    UNQUANTIZED_NAMES,
    QuantizedLinearInt4,
    experts_by_our_kernel,
)

PREQUANT_METHODS = ("gptq", "compressed-tensors", "gguf")  # gguf: a GGUF file's 4-bit blocks (gguf_q4)
_READ_ELSEWHERE = ("fp8", "mxfp4", "bitnet")  # the checkpoint reader and the families read these
_INT4_N_MULTIPLE = 16


@dataclass(frozen=True)
class PrequantSpec:
    """How a checkpoint's linear weights are stored: its method, group size and what is left unquantized."""

    method: str  # "gptq" | "compressed-tensors"
    group_size: int
    symmetric: bool = True
    zeros_offset: int = 1  # GPTQ's "gptq" format stores zero points minus one
    ignore: tuple[str, ...] = ()  # module names (or "re:" patterns) left in float

    def covers(self, name: str, layer: int) -> bool:
        """Whether linear ``name`` of block ``layer`` (e.g. ``self_attn.q_proj``) is stored quantized; the
        ignore list is matched against the checkpoint's full name, ``model.layers.{layer}.{name}``."""
        if name.rsplit(".", 1)[-1] in UNQUANTIZED_NAMES:
            return False
        full = f"model.layers.{layer}.{name}"
        for pattern in self.ignore:
            if pattern.startswith("re:"):
                if re.fullmatch(pattern[3:], full):
                    return False
            elif full == pattern or full.endswith("." + pattern):
                return False
        return True


def read_prequant(d: dict[str, Any]) -> PrequantSpec | None:
    """The :class:`PrequantSpec` of a ``config.json``'s ``quantization_config``, None for none (or for a
    method another part reads: FP8, MXFP4, BitNet); ValueError for a form this module cannot read."""
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ValueError(f"must be a JSON object, got {q!r}")
    if q.get("quant_method") in _READ_ELSEWHERE:
        return None
    if q.get("quant_method") not in PREQUANT_METHODS:
        raise ValueError(f"unsupported quant_method {q.get('quant_method')!r}; supported: "
                         f"{', '.join(PREQUANT_METHODS + _READ_ELSEWHERE)}")
    if q["quant_method"] == "gptq":
        return _read_gptq(q)
    if q["quant_method"] == "gguf":
        from .gguf_q4 import read_gguf_int4  # it builds on this module

        return read_gguf_int4(q)
    return _read_compressed(q)


def _group(value: Any) -> int:
    if value not in INT4_GROUP_SIZES:
        raise ValueError(f"4-bit groups of {value!r} inputs are not supported; supported: {INT4_GROUP_SIZES}")
    return int(value)


def _read_gptq(q: dict[str, Any]) -> PrequantSpec:
    if q.get("bits") != 4:
        raise ValueError(f"GPTQ with {q.get('bits')!r} bits is not supported: only 4")
    if q.get("desc_act", False):
        raise ValueError("GPTQ with desc_act=True (inputs in activation order) is not supported")
    fmt = q.get("checkpoint_format", "gptq")
    if fmt not in ("gptq", "gptq_v2"):
        raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported: only 'gptq' and 'gptq_v2'")
    ignore = tuple(q.get("modules_to_not_convert") or ())
    return PrequantSpec("gptq", _group(q.get("group_size")), bool(q.get("sym", True)),
                        1 if fmt == "gptq" else 0, ignore)


def _read_compressed(q: dict[str, Any]) -> PrequantSpec:
    if q.get("format") != "pack-quantized":
        raise ValueError(f"compressed-tensors format {q.get('format')!r} is not supported: only 'pack-quantized'")
    groups = q.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise ValueError("compressed-tensors: exactly one config group is supported")
    group = next(iter(groups.values()))
    weights = group.get("weights") or {}
    if group.get("input_activations") is not None:
        raise ValueError("compressed-tensors with quantized activations is not supported")
    if weights.get("num_bits") != 4 or weights.get("type", "int") != "int" or weights.get("strategy") != "group":
        raise ValueError("compressed-tensors: only 4-bit integer weights in groups are supported, got "
                         f"{weights.get('num_bits')!r}-bit {weights.get('type')!r} by {weights.get('strategy')!r}")
    if weights.get("dynamic", False) or weights.get("actorder") not in (None, False, "static", "weight"):
        raise ValueError("compressed-tensors: dynamic or activation-ordered weights are not supported")
    targets = group.get("targets") or []
    if targets and "Linear" not in targets:
        raise ValueError(f"compressed-tensors: targets {targets} are not supported: only 'Linear'")
    return PrequantSpec("compressed-tensors", _group(weights.get("group_size")),
                        bool(weights.get("symmetric", True)), 0, tuple(q.get("ignore") or ()))


def unpack_int32(packed: Tensor, dim: int) -> Tensor:
    """int32 words holding eight 4-bit values each (the first in the low bits), spread along ``dim``
    -> uint8 values in 0..15, eight times as long along ``dim``."""
    words = packed.to(torch.int32)
    values = torch.stack([(words >> (4 * i)) & 15 for i in range(8)], dim=dim + 1)
    shape = list(packed.shape)
    shape[dim] *= 8
    return values.reshape(shape).to(torch.uint8)


def pack_int32(values: Tensor, dim: int) -> Tensor:
    """The inverse of :func:`unpack_int32`: values in 0..15 -> int32 words along ``dim``."""
    v = values.to(torch.int64).movedim(dim, -1)
    v = v.reshape(*v.shape[:-1], -1, 8)
    words = sum(v[..., i] << (4 * i) for i in range(8))
    words = torch.where(words >= 2**31, words - 2**32, words)  # the bits of an int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


class _PrequantLinear(QuantizedLinearInt4):
    """A 4-bit linear layer built empty (by :func:`replace_prequantized`) and filled by ``load_state_dict``
    from the checkpoint's tensors; its subclasses name them and say how they read."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, spec: PrequantSpec) -> None:
        nn.Module.__init__(self)
        if in_features % 8 or in_features % group_size:
            raise ValueError(f"a 4-bit layer's inputs ({in_features}) must be a multiple of 8 and of the group "
                             f"size {group_size}")
        self.in_features, self.out_features, self.group_size, self.spec = in_features, out_features, group_size, spec
        self.layout = "plain"
        self._init_bias(torch.zeros(out_features) if bias else None)
        self.loaded = False

    def _finish(self, values: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """``values`` uint8 [N, K] in 0..15, ``scales`` and ``zeros`` [N, K / g]: our int4 form."""
        if values.device.type == "cpu" and kernels.available():
            self._finish_rows(values, scales, zeros)
            return
        scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous().float()
        if self.spec.symmetric:  # zero points are 0: the checkpoint's 16-bit scales hold every value exactly
            for dtype in (torch.float16, torch.bfloat16):
                if torch.equal(scales_and_zeros.to(dtype).float(), scales_and_zeros):
                    scales_and_zeros = scales_and_zeros.to(dtype)
                    break
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        if values.device.type == "cpu" and int4_pack.kernel_available() and self.out_features % _INT4_N_MULTIPLE == 0:
            packed, self.layout = int4_pack.pack_for_kernel(values), int4_pack.kernel_layout()
        else:
            packed, self.layout = int4_pack.pack_plain(values), "plain"
        self.register_buffer("weight", packed.to(values.device))
        self.loaded = True

    def _finish_rows(self, values: Tensor, scales: Tensor, zeros: Tensor) -> None:
        """Our kernel's form: the plain layout (the bytes of compressed-tensors' int32 words), scales
        ``[N, K / g, 1]`` in the checkpoint's 16-bit dtype where symmetric, with zero points ``[N, K / g, 2]``
        in float32 otherwise (every value exact either way)."""
        if self.spec.symmetric:
            scales_and_zeros = scales.float()[..., None].contiguous()
            for dtype in (torch.float16, torch.bfloat16):
                if torch.equal(scales_and_zeros.to(dtype).float(), scales_and_zeros):
                    scales_and_zeros = scales_and_zeros.to(dtype)
                    break
        else:
            scales_and_zeros = torch.stack((scales, zeros), dim=-1).float().contiguous()
        self.register_buffer("scales_and_zeros", scales_and_zeros)
        self.register_buffer("weight", int4_pack.pack_plain(values))
        self.layout = "rows"
        self.loaded = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.loaded:
            raise RuntimeError("a pre-quantized layer computes only once its checkpoint weights are loaded")
        return super().forward(x)

    def stored_bytes(self, element_size: int) -> int:
        """4-bit weights, a scale and a zero point per group (16-bit where symmetric, as the hub's scales
        are; float32 otherwise), the bias in the model dtype."""
        groups = self.in_features // self.group_size
        bias = self.out_features * element_size if self.bias is not None else 0
        # our kernel's form keeps no zero points where they are all 0
        per_group = (1 if kernels.available() else 2) * 2 if self.spec.symmetric else 2 * 4
        return self.out_features * (self.in_features // 2 + groups * per_group) + bias

    def _check(self, prefix: str, state_dict: dict[str, Tensor], shapes: dict[str, tuple[int, ...]]) -> dict[str, Tensor]:
        got = {}
        for name, shape in shapes.items():
            tensor = state_dict.get(prefix + name)
            if tensor is None:
                continue
            if tuple(tensor.shape) != shape:
                raise ValueError(f"{prefix}{name} has shape {list(tensor.shape)}, expected {list(shape)}")
            got[name] = tensor
        return got


class GPTQLinear(_PrequantLinear):
    """A GPTQ 4-bit linear layer (``qweight``, ``qzeros``, ``scales``, ``g_idx``)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, spec: PrequantSpec) -> None:
        super().__init__(in_features, out_features, group_size, bias, spec)
        if out_features % 8:
            raise ValueError(f"a GPTQ layer's outputs ({out_features}) must be a multiple of 8")
        groups = in_features // group_size
        self.register_buffer("qweight", torch.empty(in_features // 8, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.empty(groups, out_features // 8, dtype=torch.int32))
        self.register_buffer("scales", torch.empty(groups, out_features))
        self.register_buffer("g_idx", torch.empty(in_features, dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        shapes = {n: tuple(getattr(self, n).shape) for n in ("qweight", "qzeros", "scales", "g_idx")}
        got = self._check(prefix, state_dict, shapes)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(got) < 4 or got["qweight"].device.type == "meta":
            return
        k, g = self.in_features, self.group_size
        if not torch.equal(got["g_idx"].long(), torch.arange(k, device=got["g_idx"].device) // g):
            raise ValueError(f"{prefix}g_idx is not the plain grouping (inputs in activation order are not supported)")
        values = unpack_int32(got["qweight"], 0).T.contiguous()  # [N, K]
        zeros = unpack_int32(got["qzeros"], 1).float().T + self.spec.zeros_offset  # [N, K / g]
        scales = got["scales"].float().T
        self._finish(values, scales.contiguous(), ((8 - zeros) * scales).contiguous())
        for name in shapes:  # the checkpoint's form is gone: our int4 form holds the same weights
            delattr(self, name)


class PackedInt4Linear(_PrequantLinear):
    """A compressed-tensors pack-quantized 4-bit linear layer (``weight_packed``, ``weight_scale``,
    ``weight_shape``, and ``weight_zero_point`` when asymmetric)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, spec: PrequantSpec) -> None:
        super().__init__(in_features, out_features, group_size, bias, spec)
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.empty(out_features, in_features // 8, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.empty(out_features, groups))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64))
        if not spec.symmetric:
            if out_features % 8:
                raise ValueError(f"packed zero points need outputs ({out_features}) a multiple of 8")
            self.register_buffer("weight_zero_point", torch.empty(out_features // 8, groups, dtype=torch.int32))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        names = ["weight_packed", "weight_scale", "weight_shape"] + ([] if self.spec.symmetric else ["weight_zero_point"])
        got = self._check(prefix, state_dict, {n: tuple(getattr(self, n).shape) for n in names})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(got) < len(names) or got["weight_packed"].device.type == "meta":
            return
        if got["weight_shape"].tolist() != [self.out_features, self.in_features]:
            raise ValueError(f"{prefix}weight_shape is {got['weight_shape'].tolist()}, the layer is "
                             f"[{self.out_features}, {self.in_features}]")
        values = unpack_int32(got["weight_packed"], 1)  # [N, K], stored as q + 8
        scales = got["weight_scale"].float()
        zeros = torch.zeros_like(scales)
        if not self.spec.symmetric:  # stored as zero_point + 8, packed along the outputs
            zeros = -(unpack_int32(got["weight_zero_point"], 0).float() - 8) * scales
        self._finish(values, scales.contiguous(), zeros.contiguous())
        for name in names:
            delattr(self, name)


_CLASSES: dict[str, type[_PrequantLinear]] = {"gptq": GPTQLinear, "compressed-tensors": PackedInt4Linear}


def _class(method: str) -> type[_PrequantLinear]:
    if method == "gguf":
        from .gguf_q4 import GGUFInt4Linear  # it builds on this module

        return GGUFInt4Linear
    return _CLASSES[method]


class PrequantExperts(nn.ModuleList):
    """:class:`~.moe.Experts` stored as one 4-bit layer per expert and projection, under the checkpoint's
    per-expert names (``{e}.gate_proj``, ``{e}.up_proj``, ``{e}.down_proj`` or a family's own); the same
    ``forward``, summing the chosen experts in the same order."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, spec: PrequantSpec,
                 names: tuple[str, str, str]) -> None:
        cls = _class(spec.method)
        experts = []
        for _ in range(num_experts):
            expert = nn.Module()
            for name, (inputs, outputs) in zip(names, ((hidden_size, intermediate_size),
                                                       (hidden_size, intermediate_size),
                                                       (intermediate_size, hidden_size)), strict=True):
                expert.add_module(name, cls(inputs, outputs, spec.group_size, False, spec))
            experts.append(expert)
        super().__init__(experts)
        self.num_experts, self.names = num_experts, names

    def _expert(self, expert: int, x: Tensor) -> Tensor:
        gate, up, down = (getattr(self[expert], name) for name in self.names)
        return down(F.silu(gate(x)) * up(x))

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        if x.shape[0] <= OURS_MAX_ROWS and x.device.type == "cpu" and kernels.available():
            # every chosen expert's gate and up projections in one call of our kernel, the down ones in another
            gate, up, down = self.names
            out = experts_by_our_kernel(x, weights, indices, self.num_experts,
                                        lambda e: (getattr(self[e], gate), getattr(self[e], up)),
                                        lambda e: getattr(self[e], down))
            if out is not None:
                return out
        # the same sums in the same order as the float experts (one-row path included)
        return Experts.forward(self, x, weights, indices)


def replace_prequantized(block: nn.Module, spec: PrequantSpec, layer: int,
                         expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                         aliases: tuple[tuple[str, str], ...] = ()) -> nn.Module:
    """Replace, in place, the ``nn.Linear`` layers and :class:`~.moe.Experts` of block ``layer`` (built
    empty) that ``spec`` covers by empty pre-quantized modules taking the checkpoint's tensor names;
    return the block. ``aliases``: the family's (our name part, the checkpoint's) pairs."""

    def covered(name: str) -> bool:
        for ours, theirs in aliases:
            name = name.replace(ours, theirs, 1)
        return spec.covers(name, layer)

    targets = []
    for name, module in block.named_modules():
        if type(module) is nn.Linear and covered(name):
            targets.append((name, _class(spec.method)(module.in_features, module.out_features, spec.group_size,
                                                        module.bias is not None, spec)))
        elif type(module) is Experts and covered(f"{name}.0.{expert_names[0]}"):
            experts, hidden, intermediate = module.down_proj.shape[0], module.down_proj.shape[1], module.down_proj.shape[2]
            targets.append((name, PrequantExperts(experts, hidden, intermediate, spec, expert_names)))
    for name, new in targets:
        parent_name, _, child = name.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        setattr(parent, child, new)
    return block
