"""Q4_1 and Q4_K matrices of a GGUF file held as they are, beside Q4_0's: llama.cpp's 4-bit block types
read into our int4 form, ``w = (v - 8) * scale + zero`` per group of 32 inputs, ``v`` in 0..15.

Responsibility: decide which block matrices of a file stay 4-bit (:func:`q4_plan`, Q4_0, Q4_1 and Q4_K
together), convert one such matrix's bytes into this form's tensors (:func:`q4_as_packed`), and give the
linear layer that reads them (:class:`GGUFInt4Linear`, a pre-quantized layer of :mod:`.prequant`).
- Q4_0 (blocks of 32: float16 ``d``, 16 bytes of nibbles): ``w = d * (q - 8)``: ``v = q``, ``scale = d``,
  ``zero = 0``.
- Q4_1 (blocks of 32: float16 ``d`` and ``m``, 16 bytes of nibbles): ``w = d * q + m``: ``v = q``,
  ``scale = d``, ``zero = m + 8 * d``.
- Q4_K (super-blocks of 256: float16 ``d`` and ``dmin``, 12 bytes of 6-bit scales ``sc`` and mins ``mn``
  for its 8 groups of 32, 128 bytes of nibbles): ``w = d * sc * q - dmin * mn``: ``v = q``,
  ``scale = d * sc``, ``zero = 8 * d * sc - dmin * mn``.
Scales and zeros are float32. ``scale`` and ``(v - 8) * scale`` are exact in float32 (at most 17 and 21
significant bits); ``zero`` is a sum of two exact terms, exact unless their exponents lie more than 24 bits
of precision apart (then rounded once, to float32's last bit). Where ``zero`` is exact, our weight
``(v - 8) * scale + zero`` is one rounding of the same number gguf's dequantization rounds once, so the
two are equal bit for bit.

Invariants: a file holding only Q4_0 matrices keeps :mod:`.gguf_q4_0`'s compressed-tensors form (its
16-bit scales, no zeros); a file holding Q4_1 or Q4_K uses this module's form for all its 4-bit
matrices; a layer's routed experts are 4-bit all together or not at all; a ``deepseek2`` file's Q4_1 and
Q4_K matrices are dequantized (its family reads only the hub's quantization methods), and a ``gpt-oss``
file has nothing held 4-bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from .gguf_q4_0 import DEEPSEEK_LINEARS, EXPERT_STACKS, HF_LINEARS, KV_B, Q4_0_AS_PACKED_INT4, q4_0_as_packed
from .prequant import PrequantSpec, _PrequantLinear, pack_int32, unpack_int32

HELD_TYPES = ("Q4_0", "Q4_1", "Q4_K")
GGUF_INT4_METHOD = "gguf"
# tensor names of a 4-bit matrix in this module's form (the compressed-tensors names, and float zeros)
GGUF_PACKED = ("weight_packed", "weight_scale", "weight_zero", "weight_shape")
_BLOCK_BYTES = {"Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144)}  # inputs and bytes a block
_CHUNK_BYTES = 16 << 20  # of a matrix's rows converted at a time


def quantization_config(held: set[str], ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` of a file whose blocks hold ``held`` types 4-bit, ``ignore`` read as floats."""
    if held == {"Q4_0"}:
        return {**Q4_0_AS_PACKED_INT4, "ignore": ["lm_head", *ignore]}
    return {"quant_method": GGUF_INT4_METHOD, "types": sorted(held), "group_size": 32, "ignore": ["lm_head", *ignore]}


def read_gguf_int4(q: dict[str, Any]) -> PrequantSpec:
    """The :class:`~.prequant.PrequantSpec` of this module's ``quantization_config``."""
    if q.get("group_size") != 32 or not set(q.get("types") or ()) <= set(HELD_TYPES):
        raise ValueError(f"gguf 4-bit weights: groups of 32 of {', '.join(HELD_TYPES)} only, got {q!r}")
    return PrequantSpec(GGUF_INT4_METHOD, 32, False, 0, tuple(q.get("ignore") or ()))


def q4_plan(types: dict[str, str], arch: str) -> tuple[set[str], list[str]]:
    """The 4-bit types a file's blocks hold as they are (tensor name -> GGML type name; empty: none), and
    the Hugging Face names of the block matrices of other types."""
    if arch == "gpt-oss":  # its experts come as MXFP4, its attention as floats: nothing to keep 4-bit
        return set(), []
    held_types = {"Q4_0"} if arch == "deepseek2" else set(HELD_TYPES)
    linears = DEEPSEEK_LINEARS if arch == "deepseek2" else HF_LINEARS
    kinds = {n: kind for n, kind in types.items()
             if n.startswith("blk.") and n.count(".") == 3 and n.endswith(".weight") and n.split(".")[2] in linears}
    stacks: dict[str, set[str]] = {}
    for n, kind in types.items():
        if n.startswith("blk.") and n.split(".")[2] in EXPERT_STACKS:
            stacks.setdefault(n.split(".")[1], set()).add(kind)
    held = held_types & {*kinds.values(), *(k for ks in stacks.values() for k in ks)}
    if not held or any(ks & held and not ks <= held for ks in stacks.values()):
        return set(), []  # a layer's experts partly 4-bit: dequantized, the whole file
    mixtral = arch == "llama" and bool(stacks)
    others = [f"model.layers.{name.split('.')[1]}.{linears[name.split('.')[2]]}"
              for name, kind in sorted(kinds.items()) if kind not in held]
    kv_b = {n.split(".")[1] for n in types if n.startswith("blk.") and n.split(".")[2] in KV_B}
    others += [f"model.layers.{layer}.self_attn.kv_b_proj" for layer in sorted(kv_b, key=int)]
    for layer, ks in sorted(stacks.items(), key=lambda item: int(item[0])):
        if not ks <= held:
            others.append(f"model.layers.{layer}." + ("block_sparse_moe.experts.0.w1" if mixtral
                                                       else "mlp.experts.0.gate_proj"))
    return held, others


def _q4_k_scales(packed: Tensor) -> tuple[Tensor, Tensor]:
    """Q4_K's 12 bytes ``[..., 12]`` -> its 6-bit scales and mins ``[..., 8]`` (gguf's ``get_scale_min``):
    bytes 0-3 and 4-7 hold groups 0-3's scales and mins in their low 6 bits, groups 4-7's top 2 bits in
    their top 2; bytes 8-11 groups 4-7's low 4 bits, scales in the low nibble."""
    d, m, low = packed[..., 0:4].long(), packed[..., 4:8].long(), packed[..., 8:12].long()
    scales = torch.cat((d & 0x3F, (low & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return scales, mins


def _convert(kind: str, blocks: Tensor, packed: str) -> Tensor:
    """One chunk of rows, ``blocks`` uint8 ``[rows, blocks a row, bytes a block]``: its ``packed`` tensor."""
    half = lambda b: b.contiguous().view(torch.float16)[..., 0].float()  # noqa: E731
    if kind == "Q4_1":
        d, m = half(blocks[..., 0:2]), half(blocks[..., 2:4])
        if packed == "weight_scale":
            return d
        if packed == "weight_zero":
            return m + 8 * d
        nibbles = blocks[..., 4:]  # byte j: element j (low nibble), element j + 16 (high)
        return pack_int32(torch.cat((nibbles & 15, nibbles >> 4), dim=-1).reshape(blocks.shape[0], -1), 1)
    d, dmin = half(blocks[..., 0:2])[..., None], half(blocks[..., 2:4])[..., None]
    sc, mn = _q4_k_scales(blocks[..., 4:16])
    scale = (d * sc.float()).reshape(blocks.shape[0], -1)  # [rows, groups]
    if packed == "weight_scale":
        return scale
    if packed == "weight_zero":
        return (8 * d * sc.float() - dmin * mn.float()).reshape(blocks.shape[0], -1)
    # 4 runs of 32 bytes: byte j of run r holds group 2r's element j (low nibble), group 2r + 1's (high)
    nibbles = blocks[..., 16:].reshape(*blocks.shape[:2], 4, 1, 32)
    values = torch.cat((nibbles & 15, nibbles >> 4), dim=-2).reshape(blocks.shape[0], -1)
    return pack_int32(values, 1)


def q4_as_packed(kind: str, data: np.ndarray, packed: str, out: Tensor) -> None:
    """A Q4_0, Q4_1 or Q4_K matrix's bytes ``data`` ``[N, bytes a row]`` into ``out``: its words
    (``weight_packed`` ``[N, K / 8]``: eight values ``v`` a word, the first in the low bits), its groups'
    scales or zeros (``weight_scale``, ``weight_zero`` ``[N, K / 32]``), a bounded number of rows at a time."""
    if kind == "Q4_0" and packed != "weight_zero":
        q4_0_as_packed(data, packed, out)  # float16 scales into float32 ones where asked: exact
        return
    if kind == "Q4_0":  # weight_zero
        out.zero_()
        return
    _, size = _BLOCK_BYTES[kind]
    step = max(1, _CHUNK_BYTES // max(1, data.shape[1] * 4))
    for begin in range(0, data.shape[0], step):
        blocks = torch.from_numpy(np.array(data[begin : begin + step])).view(-1, data.shape[1] // size, size)
        out[begin : begin + blocks.shape[0]] = _convert(kind, blocks, packed)


class GGUFInt4Linear(_PrequantLinear):
    """A GGUF file's Q4_0 / Q4_1 / Q4_K matrix held 4-bit (``weight_packed``, ``weight_scale``,
    ``weight_zero``, ``weight_shape``)."""

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool, spec: PrequantSpec) -> None:
        super().__init__(in_features, out_features, group_size, bias, spec)
        groups = in_features // group_size
        self.register_buffer("weight_packed", torch.empty(out_features, in_features // 8, dtype=torch.int32))
        self.register_buffer("weight_scale", torch.empty(out_features, groups))
        self.register_buffer("weight_zero", torch.empty(out_features, groups))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        got = self._check(prefix, state_dict, {n: tuple(getattr(self, n).shape) for n in GGUF_PACKED})
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if len(got) < len(GGUF_PACKED) or got["weight_packed"].device.type == "meta":
            return
        if got["weight_shape"].tolist() != [self.out_features, self.in_features]:
            raise ValueError(f"{prefix}weight_shape is {got['weight_shape'].tolist()}, the layer is "
                             f"[{self.out_features}, {self.in_features}]")
        values = unpack_int32(got["weight_packed"], 1)  # [N, K]
        self._finish(values, got["weight_scale"].float().contiguous(), got["weight_zero"].float().contiguous())
        for name in GGUF_PACKED:
            delattr(self, name)
