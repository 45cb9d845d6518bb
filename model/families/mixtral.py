"""Mixtral: Mistral attention (sliding window when set) and 8 experts, top-2, renormalised, with
float32 routing weights; its checkpoints call the layer ``block_sparse_moe`` and the experts' weights
``w1`` (gate), ``w3`` (up) and ``w2`` (down)."""

from __future__ import annotations

from typing import Any

from ..config import MoEConfig, read_sliding_window
from .base import Family, positive_int
from .qwen_moe import moe_block


def _mixtral(d: dict[str, Any]) -> dict[str, Any]:
    return {
        "sliding_window": read_sliding_window(d, "mixtral"),
        "moe": MoEConfig(num_experts=positive_int(d, "num_local_experts"), top_k=positive_int(d, "num_experts_per_tok"),
                         intermediate_size=positive_int(d, "intermediate_size"), norm_topk_prob=True,
                         float32_weights=True),
    }


MIXTRAL = Family(read=_mixtral, block=moe_block, aliases=(("mlp.", "block_sparse_moe."),),
                 expert_names=("w1", "w3", "w2"))
