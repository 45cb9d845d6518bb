"""What a family file provides, and the helpers most families share."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..config import ModelConfig


@dataclass(frozen=True)
class Family:
    # ModelConfig fields this family sets from config.json (on top of the shared ones)
    read: Callable[[dict[str, Any]], dict[str, Any]]
    # block `layer` (absolute index) of a model
    block: Callable[[ModelConfig, int], nn.Module]
    # (part of our parameter name, the checkpoint's name for it), e.g. ("mlp.", "block_sparse_moe.")
    aliases: tuple[tuple[str, str], ...] = ()
    # per-expert checkpoint names: (gate, up, down) as in "experts.{e}.<name>.weight"
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")
    # our parameter names (endings) read and kept in float32 whatever the span's dtype, as the
    # reference keeps them (DeepSeek's router)
    float32_params: tuple[str, ...] = ()


def positive_int(d: dict[str, Any], key: str, default: Any = None) -> int:
    value = d.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"config field {key} must be a positive integer, got {value!r}")
    return value


def layer_list(d: dict[str, Any], key: str) -> frozenset[int]:
    value = d.get(key) or []
    if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
        raise ValueError(f"config field {key} must be a list of layer indices, got {value!r}")
    return frozenset(value)
