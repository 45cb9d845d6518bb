"""Transformer decoder blocks of the Llama family, and a span of consecutive blocks.

Responsibility: compute blocks ``[start, end)`` of a Llama / Mistral / Qwen2 / Qwen3 model exactly as
transformers does (same operation order, RMSNorm in float32, RoPE tables in float32 cast to the
activation dtype), with or without a :class:`KVCache`.

Invariants: parameter names mirror Hugging Face's (``layers.{i - start}.self_attn.q_proj.weight`` for
checkpoint ``model.layers.{i}.self_attn.q_proj.weight``) so a checkpoint slice loads with a plain
``load_state_dict``; a forward call either fully succeeds, or raises before touching the cache (all
checks happen first), so a failed call never leaves the cache half-written.
:meth:`BlockSpan.forward_batch` runs the steps of several sessions at once and computes exactly what
one ``forward`` per session computes (same per-row operations, only more rows per matrix product).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .kv_cache import KVCache

# `enable_gqa` arrived in torch 2.5; the project allows torch >= 2.1.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in float32 and cast back before the weight, as transformers does: bit-level
        # agreement in half precision depends on this order.
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def rope_inv_freq(config: ModelConfig) -> Tensor:
    """Inverse RoPE frequencies (float32, CPU), with Llama 3 scaling applied when configured."""
    dim = config.head_dim
    # Explicit device: this must be real even when modules are being built on the meta device.
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").to(torch.float32) / dim
    inv_freq = 1.0 / (config.rope_theta ** exponents)
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    # Llama 3: keep high frequencies, divide low ones by `factor`, interpolate in between.
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


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(config.hidden_size, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=config.o_proj_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None, is_causal: bool,
                kv: tuple[Tensor, Tensor] | None, past_length: int) -> Tensor:
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3 normalizes each head before RoPE
            q = self.q_norm(q)
            k = self.k_norm(k)
        out = self.attend(q, k, v, cos, sin, mask, is_causal, kv, past_length)
        return self.o_proj(out).view(batch, length, -1)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None,
               is_causal: bool, kv: tuple[Tensor, Tensor] | None, past_length: int) -> Tensor:
        """RoPE, cache append and attention for one session; q/k/v are [B, T, heads, head_dim] after q/k norm.

        Returns [B * T, heads * head_dim], ready for ``o_proj``.
        """
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, T, head_dim]
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return self.attend_roped(q, k, v, mask, is_causal, kv, past_length)

    def attend_roped(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool,
                     kv: tuple[Tensor, Tensor] | None, past_length: int) -> Tensor:
        """Cache append and attention for one session; q/k/v are [B, heads, T, head_dim], RoPE applied."""
        batch, _, length, _ = q.shape
        if kv is not None:
            cache_k, cache_v = kv
            end = past_length + length
            cache_k[:, :, past_length:end] = k
            cache_v[:, :, past_length:end] = v
            k, v = cache_k[:, :, :end], cache_v[:, :, :end]
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and _SDPA_GQA:
            # Lets SDPA share each key/value head without copying the whole cache every step.
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        else:
            if groups > 1:  # torch < 2.5: expand the key/value heads explicitly
                k = k.repeat_interleave(groups, dim=1)
                v = v.repeat_interleave(groups, dim=1)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)
        return out.transpose(1, 2).reshape(batch * length, self.num_heads * self.head_dim)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderBlock(nn.Module):
    """One pre-norm Transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, mask: Tensor | None = None, is_causal: bool = True,
                kv: tuple[Tensor, Tensor] | None = None, past_length: int = 0) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, is_causal, kv, past_length)
        return x + self.mlp(self.post_attention_layernorm(x))


class _Segment:
    """One session's rows in a batched step: where they lie in the flat rows, and its attention inputs."""

    __slots__ = ("offset", "batch", "length", "mask", "is_causal", "cache", "past_length")

    def __init__(self, offset: int, batch: int, length: int, mask: Tensor | None, is_causal: bool,
                 cache: KVCache | None, past_length: int) -> None:
        self.offset, self.batch, self.length = offset, batch, length
        self.mask, self.is_causal = mask, is_causal
        self.cache, self.past_length = cache, past_length


def _block_batch(layer: DecoderBlock, x: Tensor, cos: Tensor, sin: Tensor, segments: list[_Segment],
                 index: int) -> Tensor:
    """One block over the flat rows ``x`` [N, H] of several sessions; cos/sin [N, 1, head_dim] per row.

    RoPE is elementwise, so it runs over all rows at once with each row's own position; only the cache
    append and attention run per session.
    """
    attn = layer.self_attn
    h = layer.input_layernorm(x)
    rows = x.shape[0]
    q = attn.q_proj(h).view(rows, attn.num_heads, attn.head_dim)
    k = attn.k_proj(h).view(rows, attn.num_kv_heads, attn.head_dim)
    v = attn.v_proj(h).view(rows, attn.num_kv_heads, attn.head_dim)
    if attn.qk_norm:
        q = attn.q_norm(q)
        k = attn.k_norm(k)
    q = q * cos + _rotate_half(q) * sin
    k = k * cos + _rotate_half(k) * sin
    outs = []
    for seg in segments:
        part = slice(seg.offset, seg.offset + seg.batch * seg.length)
        shape = (seg.batch, seg.length)
        kv = (seg.cache.keys[index], seg.cache.values[index]) if seg.cache is not None else None
        outs.append(attn.attend_roped(q[part].view(*shape, *q.shape[1:]).transpose(1, 2),
                                      k[part].view(*shape, *k.shape[1:]).transpose(1, 2),
                                      v[part].view(*shape, *v.shape[1:]).transpose(1, 2),
                                      seg.mask, seg.is_causal, kv, seg.past_length))
    x = x + attn.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))
    return x + layer.mlp(layer.post_attention_layernorm(x))


class BlockSpan(nn.Module):
    """Blocks ``[start, end)`` of a model; what one node serves."""

    def __init__(self, config: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= config.num_hidden_layers:
            raise ValueError(
                f"invalid block range [{start}, {end}) for a model with {config.num_hidden_layers} blocks"
            )
        self.config = config
        self.start = start
        self.end = end
        self.layers = nn.ModuleList(DecoderBlock(config) for _ in range(end - start))
        self._inv_freq = rope_inv_freq(config)  # float32, CPU; moved lazily to the activations' device

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    @property
    def dtype(self) -> torch.dtype:
        return self.layers[0].input_layernorm.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.layers[0].input_layernorm.weight.device

    def subspan(self, start: int, end: int) -> BlockSpan:
        """Blocks [start, end) of this span as a span of their own, sharing the weights (no copy)."""
        if not self.start <= start < end <= self.end:
            raise ValueError(f"[{start}, {end}) is not a non-empty part of this span [{self.start}, {self.end})")
        view = BlockSpan.__new__(BlockSpan)
        nn.Module.__init__(view)
        view.config = self.config
        view.start = start
        view.end = end
        view.layers = nn.ModuleList(self.layers[start - self.start : end - self.start])
        view._inv_freq = self._inv_freq
        return view

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for this span, in the span's dtype and on its device."""
        return KVCache(self.config, self.num_blocks, batch_size, max_length, dtype=self.dtype, device=self.device)

    def _rope(self, past_length: int, length: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        positions = torch.arange(past_length, past_length + length, device=device, dtype=torch.float32)
        return self._rope_at(positions, dtype, device)

    def _rope_at(self, positions: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin [len(positions), head_dim] for float32 positions."""
        inv_freq = self._inv_freq.to(device)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def _mask(self, past_length: int, length: int, device: torch.device) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for queries at past_length.. over keys at 0..past_length+length-1."""
        total = past_length + length
        window = self.config.sliding_window
        window_matters = window is not None and total > window
        if not window_matters:
            if past_length == 0:
                return None, True
            if length == 1:
                return None, False  # one new query sees every stored key
        q_pos = torch.arange(past_length, total, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window_matters:
            allowed = allowed & (q_pos - k_pos < window)
        return allowed, False

    def check(self, hidden: Tensor, cache: KVCache | None = None) -> None:
        """Raise the ValueError that ``forward(hidden, cache)`` would raise, if any; touches nothing."""
        self._check(hidden, cache)

    def _check(self, hidden: Tensor, cache: KVCache | None) -> None:
        if not isinstance(hidden, Tensor) or hidden.dim() != 3:
            shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
            raise ValueError(f"hidden states must be a 3-D tensor [batch, length, hidden], got {shape}")
        batch, length, size = hidden.shape
        if size != self.config.hidden_size:
            raise ValueError(f"hidden size mismatch: got {size}, model has {self.config.hidden_size}")
        if batch == 0 or length == 0:
            raise ValueError(f"hidden states must have non-empty batch and length, got {tuple(hidden.shape)}")
        if hidden.dtype != self.dtype:
            raise ValueError(f"hidden states dtype {hidden.dtype} does not match the span's dtype {self.dtype}")
        if hidden.device != self.device:
            raise ValueError(f"hidden states are on {hidden.device}, the span is on {self.device}")
        if cache is None:
            return
        if cache.num_blocks != self.num_blocks:
            raise ValueError(f"cache holds {cache.num_blocks} blocks, this span has {self.num_blocks}")
        if cache.batch_size != batch:
            raise ValueError(f"batch size mismatch: hidden states have {batch}, the cache was made for {cache.batch_size}")
        if cache.dtype != self.dtype or cache.device != self.device:
            raise ValueError(
                f"cache is {cache.dtype} on {cache.device}, the span is {self.dtype} on {self.device}"
            )
        if cache.length + length > cache.max_length:
            raise ValueError(
                f"cache overflow: {cache.length} stored + {length} new positions > max_length {cache.max_length}"
            )

    @torch.no_grad()
    def forward(self, hidden: Tensor, cache: KVCache | None = None) -> Tensor:
        """Run every block of the span on ``hidden`` [B, T, H]; see the module docstring for the cache."""
        self._check(hidden, cache)
        past_length = cache.length if cache is not None else 0
        length = hidden.shape[1]
        cos, sin = self._rope(past_length, length, hidden.dtype, hidden.device)
        mask, is_causal = self._mask(past_length, length, hidden.device)
        for i, layer in enumerate(self.layers):
            kv = (cache.keys[i], cache.values[i]) if cache is not None else None
            hidden = layer(hidden, cos, sin, mask, is_causal, kv, past_length)
        if cache is not None:
            cache.length += length
        return hidden

    @torch.no_grad()
    def forward_batch(self, items: list[tuple[Tensor, KVCache | None]]) -> list[Tensor]:
        """Run the steps of several sessions together; the same results as one :meth:`forward` per item.

        Each item is one session's hidden states [B_i, T_i, H] and its own cache (any lengths). Norms,
        projections and the MLP run once over all rows; RoPE, the cache append and attention run per
        session at its own position. Every item is checked before any cache is touched; a cache may
        appear only once (its second step would depend on the first). Each cache advances by its T_i.
        """
        if not isinstance(items, (list, tuple)) or not items:
            raise ValueError("forward_batch needs a non-empty list of (hidden, cache) items")
        seen: set[int] = set()
        for n, item in enumerate(items):
            if not isinstance(item, tuple) or len(item) != 2:
                raise ValueError(f"item {n} must be a (hidden, cache) tuple")
            hidden, cache = item
            if cache is not None and not isinstance(cache, KVCache):
                raise ValueError(f"item {n}: cache must be a KVCache or None, got {type(cache).__name__}")
            try:
                self._check(hidden, cache)
            except ValueError as e:
                raise ValueError(f"item {n}: {e}") from None
            if cache is not None:
                if id(cache) in seen:
                    raise ValueError(f"item {n}: the same cache appears twice in one batch")
                seen.add(id(cache))
        segments = []
        positions = []
        offset = 0
        device = items[0][0].device
        for hidden, cache in items:
            batch, length = hidden.shape[:2]
            past = cache.length if cache is not None else 0
            mask, is_causal = self._mask(past, length, device)
            segments.append(_Segment(offset, batch, length, mask, is_causal, cache, past))
            positions.append(torch.arange(past, past + length, device=device, dtype=torch.float32).repeat(batch))
            offset += batch * length
        cos, sin = self._rope_at(torch.cat(positions), self.dtype, device)
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, head_dim]: broadcast over the heads
        x = torch.cat([hidden.reshape(-1, hidden.shape[-1]) for hidden, _ in items])
        for i, layer in enumerate(self.layers):
            x = _block_batch(layer, x, cos, sin, segments, i)
        for seg in segments:
            if seg.cache is not None:
                seg.cache.length += seg.length
        return [x[s.offset : s.offset + s.batch * s.length].view(s.batch, s.length, -1) for s in segments]
