"""GPT-OSS: attention with per-head sinks and biases, sliding-window and full layers alternating as
``layer_types`` says, YaRN RoPE; every layer's feed-forward is experts with biases and a clamped SwiGLU,
routed by a softmax over the top-k logits. The checkpoint's names are ours (``mlp.router``,
``mlp.experts.gate_up_proj``, ``self_attn.sinks``); its experts may come as MXFP4 blocks and scales,
which the loader dequantizes."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from ..attention import SinkAttention
from ..blocks import DecoderBlock
from ..config import ModelConfig, MoEConfig
from ..moe import GptOssExperts, TopKSoftmaxRouter
from .base import Family, positive_int


class RoutedExperts(nn.Module):
    """A router and its experts, under the names GPT-OSS checkpoints give them."""

    def __init__(self, router: TopKSoftmaxRouter, experts: GptOssExperts) -> None:
        super().__init__()
        self.router = router
        self.experts = experts

    def forward(self, x: Tensor) -> Tensor:
        weights, indices = self.router(x)
        return self.experts(x, weights, indices)


def _number(d: dict[str, Any], key: str, default: float) -> float:
    value = d.get(key, default)
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
        raise ValueError(f"config field {key} must be a positive number, got {value!r}")
    return float(value)


def _gpt_oss(d: dict[str, Any]) -> dict[str, Any]:
    layer_types = d.get("layer_types")
    if layer_types is None:  # transformers' default: even layers slide, odd ones attend to everything
        layers = positive_int(d, "num_hidden_layers")
        layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
    if not isinstance(layer_types, list):
        raise ValueError(f"config field layer_types must be a list, got {layer_types!r}")
    return {
        "sliding_window": positive_int(d, "sliding_window", 128),
        "layer_types": tuple(layer_types),
        "attention_sinks": True,
        "moe": MoEConfig(num_experts=positive_int(d, "num_local_experts"), top_k=positive_int(d, "num_experts_per_tok"),
                         intermediate_size=positive_int(d, "intermediate_size"),
                         swiglu_alpha=_number(d, "swiglu_alpha", 1.702), swiglu_limit=_number(d, "swiglu_limit", 7.0)),
    }


def gpt_oss_block(config: ModelConfig, layer: int) -> DecoderBlock:
    moe = config.moe
    assert moe is not None
    mlp = RoutedExperts(
        TopKSoftmaxRouter(config.hidden_size, moe.num_experts, moe.top_k),
        GptOssExperts(moe.num_experts, config.hidden_size, moe.intermediate_size, alpha=moe.swiglu_alpha,
                      limit=moe.swiglu_limit),
    )
    return DecoderBlock(config, SinkAttention(config, layer), mlp)


GPT_OSS = Family(read=_gpt_oss, block=gpt_oss_block)
