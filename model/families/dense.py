"""Dense Llama-family blocks: Llama 2/3, Mistral (sliding window), Qwen2 (q/k/v biases), Qwen3 (q/k norm)."""

from __future__ import annotations

from typing import Any

from ..attention import Attention
from ..blocks import DecoderBlock
from ..config import ModelConfig, read_sliding_window
from ..mlp import GatedMLP
from .base import Family


def dense_block(config: ModelConfig, layer: int) -> DecoderBlock:
    return DecoderBlock(config, Attention(config, layer), GatedMLP(config.hidden_size, config.intermediate_size))


def _llama(d: dict[str, Any]) -> dict[str, Any]:
    return {}


def _mistral(d: dict[str, Any]) -> dict[str, Any]:
    return {"sliding_window": read_sliding_window(d, "mistral")}


def _qwen2(d: dict[str, Any]) -> dict[str, Any]:
    read_sliding_window(d, "qwen2")
    # Qwen2 always has q/k/v biases (its config has no switch for them) and none on o_proj.
    return {"attention_bias": True, "o_bias": False}


def _qwen3(d: dict[str, Any]) -> dict[str, Any]:
    read_sliding_window(d, "qwen3")
    return {"qk_norm": True}


LLAMA = Family(read=_llama, block=dense_block)
MISTRAL = Family(read=_mistral, block=dense_block)
QWEN2 = Family(read=_qwen2, block=dense_block)
QWEN3 = Family(read=_qwen3, block=dense_block)
