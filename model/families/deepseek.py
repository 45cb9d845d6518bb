"""DeepSeek-V3 and Kimi K2 (``model_type`` ``deepseek_v3`` / ``kimi_k2``, the same architecture):
Multi-head Latent Attention; the first ``first_k_dense_replace`` layers dense, the rest routed experts
with a sigmoid, group-limited router (score-correction bias for the choice only, renormalised, scaled
by ``routed_scaling_factor``) plus always-on shared experts.

The checkpoint calls the shared experts ``mlp.shared_experts``. ``head_dim`` is the rotary part of a
head (``qk_rope_head_dim``), as transformers' config sets it; every other head size comes from
``config.mla``. The multi-token-prediction layer that the checkpoints append (index
``num_hidden_layers``) is no block of the model and is never read.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from ..blocks import DecoderBlock
from ..config import MLAConfig, ModelConfig, MoEConfig
from ..mla import MultiHeadLatentAttention
from ..mlp import GatedMLP
from ..moe import Experts, GroupLimitedRouter, SparseMoE
from .base import Family, positive_int

# transformers' DeepseekV3Config defaults, for keys a config.json leaves out
_DEFAULTS: dict[str, Any] = {
    "n_shared_experts": 1, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_interleave": True,
}


def _get(d: dict[str, Any], key: str) -> Any:
    return d[key] if key in d else _DEFAULTS[key]


def _read(d: dict[str, Any]) -> dict[str, Any]:
    # The router and layer layout that transformers computes; refuse what it would compute differently.
    if d.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError(f"scoring_func {d['scoring_func']!r} is not supported; only 'sigmoid'")
    if d.get("topk_method", "noaux_tc") != "noaux_tc":
        raise ValueError(f"topk_method {d['topk_method']!r} is not supported; only 'noaux_tc'")
    if d.get("moe_layer_freq", 1) != 1:
        raise ValueError(f"moe_layer_freq={d['moe_layer_freq']!r} is not supported; only 1")
    quant = d.get("quantization_config")
    # 4-bit GPTQ and compressed-tensors weights: read (and checked) by prequant
    if quant is not None and quant.get("quant_method") not in ("gptq", "compressed-tensors") and (
            quant.get("quant_method") != "fp8" or quant.get("weight_block_size", [128, 128]) != [128, 128]):
        raise ValueError(f"unsupported quantization_config {quant!r}; only fp8 with 128x128 weight blocks, "
                         "or 4-bit gptq or compressed-tensors")
    layers = positive_int(d, "num_hidden_layers")
    first_dense = _get(d, "first_k_dense_replace")
    if not isinstance(first_dense, int) or isinstance(first_dense, bool) or first_dense < 0:
        raise ValueError(f"config field first_k_dense_replace must be a non-negative integer, got {first_dense!r}")
    experts = positive_int(d, "n_routed_experts")
    intermediate = positive_int(d, "moe_intermediate_size")
    shared = positive_int({"n": _get(d, "n_shared_experts")}, "n")
    moe = MoEConfig(
        num_experts=experts,
        top_k=positive_int(d, "num_experts_per_tok"),
        intermediate_size=intermediate,
        norm_topk_prob=bool(_get(d, "norm_topk_prob")),
        float32_weights=True,  # the sigmoid router's weights stay float32, as transformers keeps them
        shared_expert_intermediate_size=shared * intermediate,
        dense_layers=frozenset(range(min(first_dense, layers))),
        n_group=positive_int({"n_group": _get(d, "n_group")}, "n_group"),
        topk_group=positive_int({"topk_group": _get(d, "topk_group")}, "topk_group"),
        routed_scaling_factor=float(_get(d, "routed_scaling_factor")),
    )
    if experts // moe.n_group < 2:
        raise ValueError(f"expert groups need at least 2 experts each: {experts} experts in {moe.n_group} groups")
    q_lora_rank = _get(d, "q_lora_rank")
    dims = {key: positive_int({key: _get(d, key)}, key)
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")}
    mla = MLAConfig(
        q_lora_rank=None if q_lora_rank is None else positive_int({"q_lora_rank": q_lora_rank}, "q_lora_rank"),
        rope_interleave=bool(_get(d, "rope_interleave")),
        **dims,
    )
    return {"moe": moe, "mla": mla, "head_dim": mla.qk_rope_head_dim,
            "num_key_value_heads": positive_int(d, "num_attention_heads")}


def deepseek_block(config: ModelConfig, layer: int) -> DecoderBlock:
    """MLA, then a dense MLP (the first layers) or routed plus shared experts."""
    moe = config.moe
    assert moe is not None
    hidden = config.hidden_size
    if not config.is_sparse(layer):
        mlp: nn.Module = GatedMLP(hidden, config.intermediate_size)
    else:
        router = GroupLimitedRouter(hidden, moe.num_experts, moe.top_k, n_group=moe.n_group,
                                    topk_group=moe.topk_group, normalize=moe.norm_topk_prob,
                                    scaling_factor=moe.routed_scaling_factor)
        mlp = SparseMoE(router, Experts(moe.num_experts, hidden, moe.intermediate_size),
                        GatedMLP(hidden, moe.shared_expert_intermediate_size))
    return DecoderBlock(config, MultiHeadLatentAttention(config, layer), mlp)


DEEPSEEK_V3 = Family(read=_read, block=deepseek_block, aliases=(("mlp.shared_expert.", "mlp.shared_experts."),),
                     float32_params=("mlp.gate.weight", "mlp.gate.e_score_correction_bias"))
