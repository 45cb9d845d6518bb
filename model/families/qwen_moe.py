"""Qwen3-MoE (Qwen3 attention with q/k norm; softmax top-k router) and Qwen2-MoE (Qwen2 attention with
q/k/v biases; a shared expert behind a sigmoid gate). Both may keep some layers dense
(``mlp_only_layers``, ``decoder_sparse_step``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from ..attention import Attention
from ..blocks import DecoderBlock
from ..config import ModelConfig, MoEConfig, read_sliding_window
from ..mlp import GatedMLP
from ..moe import Experts, SoftmaxTopKRouter, SparseMoE
from .base import Family, layer_list, positive_int


def _moe(d: dict[str, Any], **extra: Any) -> MoEConfig:
    layers = positive_int(d, "num_hidden_layers")
    step = positive_int(d, "decoder_sparse_step", 1)
    dense = layer_list(d, "mlp_only_layers") | {i for i in range(layers) if (i + 1) % step}
    return MoEConfig(
        num_experts=positive_int(d, "num_experts", d.get("num_local_experts")),
        top_k=positive_int(d, "num_experts_per_tok"),
        intermediate_size=positive_int(d, "moe_intermediate_size"),
        norm_topk_prob=bool(d.get("norm_topk_prob", False)),
        dense_layers=frozenset(dense),
        **extra,
    )


def _qwen3_moe(d: dict[str, Any]) -> dict[str, Any]:
    read_sliding_window(d, "qwen3_moe")
    return {"qk_norm": True, "moe": _moe(d)}


def _qwen2_moe(d: dict[str, Any]) -> dict[str, Any]:
    read_sliding_window(d, "qwen2_moe")
    shared = d.get("shared_expert_intermediate_size") or 0
    return {"attention_bias": bool(d.get("qkv_bias", True)), "o_bias": False,
            "moe": _moe(d, shared_expert_intermediate_size=shared, shared_expert_gate=shared > 0)}


def moe_block(config: ModelConfig, layer: int) -> DecoderBlock:
    """Attention as the config says, then experts with a softmax top-k router (or a dense MLP)."""
    moe = config.moe
    assert moe is not None
    if not config.is_sparse(layer):
        mlp: nn.Module = GatedMLP(config.hidden_size, config.intermediate_size)
    else:
        shared = None
        if moe.shared_expert_intermediate_size:
            shared = GatedMLP(config.hidden_size, moe.shared_expert_intermediate_size)
        mlp = SparseMoE(
            SoftmaxTopKRouter(config.hidden_size, moe.num_experts, moe.top_k, normalize=moe.norm_topk_prob,
                              float32_weights=moe.float32_weights),
            Experts(moe.num_experts, config.hidden_size, moe.intermediate_size),
            shared,
            nn.Linear(config.hidden_size, 1, bias=False) if moe.shared_expert_gate else None,
        )
    return DecoderBlock(config, Attention(config, layer), mlp)


QWEN3_MOE = Family(read=_qwen3_moe, block=moe_block)
QWEN2_MOE = Family(read=_qwen2_moe, block=moe_block)
