"""Q4_0 matrices of a GGUF file held as they are: llama.cpp's Q4_0 read as pre-quantized 4-bit weights.

Responsibility: the names both 4-bit forms share (llama.cpp's block matrices, per-expert names, the
packed tensors' names) and a Q4_0 matrix's bytes turned into compressed-tensors' ``pack-quantized`` form
(:func:`q4_0_as_packed`), which the pre-quantized layers of :mod:`.prequant` read; which matrices stay
4-bit is :func:`.gguf_q4.q4_plan`'s to decide, Q4_1 and Q4_K's form :mod:`.gguf_q4`'s. Q4_0 stores ``w = d * (q - 8)`` per block of 32 inputs,
``d`` float16 and ``q`` in 0..15: exactly pack-quantized's symmetric int4 in groups of 32 (``v = q``
stored, ``scale = d``), so nothing is rounded on the way.

Invariants: a file whose only 4-bit type is Q4_0 is read in this form (16-bit scales, no zeros);
every ``deepseek2`` ``kv_b_proj`` is read as floats.
"""

from __future__ import annotations

import re

import numpy as np
import torch
from torch import Tensor

from .prequant import pack_int32

# llama.cpp's block matrices -> Hugging Face module names
HF_LINEARS = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
              "ffn_down": "mlp.down_proj", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
              "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj"}
# deepseek2's (DeepSeek-V3, Kimi K2): MLA's projections, shared experts under the checkpoint's name. Its
# kv_b_proj is always read as floats: attn_k_b is stored transposed, its groups of 32 along the wrong side
DEEPSEEK_LINEARS = {**HF_LINEARS, "attn_q_a": "self_attn.q_a_proj", "attn_q_b": "self_attn.q_b_proj",
                    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
                    "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj"}
KV_B = ("attn_kv_b", "attn_k_b", "attn_v_b")
EXPERT_STACKS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
# one expert's matrix of a stack (a 4-bit expert is read per expert, as pre-quantized checkpoints store them)
PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\."
                        r"(gate_proj|up_proj|down_proj|w1|w3|w2)\.weight$")
STACK_OF = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
            "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
PACKED = ("weight_packed", "weight_scale", "weight_zero", "weight_shape")  # weight_zero: gguf_q4's form
# A file's Q4_0 block matrices, read as compressed-tensors' symmetric 4-bit groups of 32
Q4_0_AS_PACKED_INT4 = {
    "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
    "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
        "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}},
}
_CHUNK_BYTES = 16 << 20  # of a matrix's rows converted at a time


def packed_base(name: str) -> tuple[str, str | None]:
    """``x.weight_packed`` -> (``x.weight``, ``weight_packed``); any other name -> (name, None)."""
    head, _, last = name.rpartition(".")
    return (f"{head}.weight", last) if head and last in PACKED else (name, None)


def q4_0_as_packed(data: np.ndarray, packed: str, out: Tensor) -> None:
    """A Q4_0 matrix's bytes ``data`` ``[N, K / 32 * 18]`` (per block of 32 inputs: float16 ``d``, then 16
    bytes of nibbles) into ``out``: its words (``weight_packed`` ``[N, K / 8]``: eight values ``q`` a word,
    the first in the low bits) or its block scales (``weight_scale`` ``[N, K / 32]``, ``d``), a bounded
    number of rows at a time."""
    rows = data.shape[0]
    step = max(1, _CHUNK_BYTES // max(1, data.shape[1] * 4))
    for begin in range(0, rows, step):
        blocks = torch.from_numpy(np.array(data[begin : begin + step])).view(-1, data.shape[1] // 18, 18)
        if packed == "weight_scale":
            out[begin : begin + blocks.shape[0]] = blocks[..., :2].contiguous().view(torch.float16)[..., 0]
            continue
        nibbles = blocks[..., 2:]
        # in a block, byte j holds element j (low nibble) and element j + 16 (high nibble)
        values = torch.cat((nibbles & 15, nibbles >> 4), dim=-1).reshape(blocks.shape[0], -1)
        out[begin : begin + blocks.shape[0]] = pack_int32(values, 1)
