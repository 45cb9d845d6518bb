"""Rotary position embeddings: inverse frequencies (plain, Llama 3, YaRN) and their application.

Responsibility: the float32 inverse frequencies and the cos/sin post-scaling factor that a
checkpoint's RoPE settings call for, computed as transformers computes them, and the two ways of
rotating a head (halves, as Llama does, and interleaved pairs, as DeepSeek's weights are laid out).
Invariant: tables are float32 on the CPU, real even while modules are built on the meta device.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def _plain(dim: int, theta: float) -> Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    return 1.0 / (theta ** exponents)


def _llama3(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    # Keep high frequencies, divide low ones by `factor`, interpolate in between.
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn(dim: int, theta: float, scaling: dict[str, Any], max_positions: int) -> tuple[Tensor, float]:
    factor = scaling.get("factor")
    original = scaling["original_max_position_embeddings"]
    if factor is None:
        factor = max_positions / original
    attention_factor = scaling.get("attention_factor")
    mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim))
        else:
            attention_factor = yarn_mscale(factor)
    beta_fast = scaling.get("beta_fast") or 32
    beta_slow = scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float) / dim)
    extrapolation_factor = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (1.0 / pos_freqs) * extrapolation_factor
    return inv_freq, float(attention_factor)


def rope_tables(dim: int, theta: float, scaling: dict[str, Any] | None,
                max_positions: int) -> tuple[Tensor, float]:
    """(inverse frequencies [dim / 2], factor applied to cos and sin) for one RoPE configuration."""
    if scaling is None:
        return _plain(dim, theta), 1.0
    rope_type = scaling.get("rope_type")
    if rope_type == "llama3":
        return _llama3(_plain(dim, theta), scaling), 1.0
    if rope_type == "yarn":
        return _yarn(dim, theta, scaling, max_positions)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}")


def cos_sin(inv_freq: Tensor, attention_factor: float, positions: Tensor, dtype: torch.dtype,
            device: torch.device) -> tuple[Tensor, Tensor]:
    """cos and sin [len(positions), dim] for float32 positions, scaled, then cast to ``dtype``."""
    freqs = positions[:, None] * inv_freq.to(device)[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention_factor != 1.0:
        cos, sin = cos * attention_factor, sin * attention_factor
    return cos.to(dtype), sin.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    return x * cos + rotate_half(x) * sin


def deinterleave(x: Tensor) -> Tensor:
    """Pairs (x0, x1), (x2, x3), ... laid out as halves (x0, x2, ...), (x1, x3, ...), as DeepSeek rotates."""
    *lead, dim = x.shape
    return x.view(*lead, dim // 2, 2).transpose(-1, -2).reshape(*lead, dim)
