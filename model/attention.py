"""Grouped-query attention over the flat rows of several sessions, and each session's place in them.

Responsibility: project the rows of a batched step to queries, keys and values (one matrix product
for all sessions), apply RoPE at each row's own position, then append to each session's cache and
attend per session, with the session's causal (optionally sliding-window) mask.
Invariants: a :class:`Segment` is one session's contiguous rows ``[offset, offset + batch * length)``
in the flat rows; the cache of block ``index`` is written at positions ``[past_length, past_length +
length)`` only. Masks are built once per segment and window and shared by the blocks that use them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .kv_cache import KVCache
from .mlp import fuse_linears
from .norms import RMSNorm
from .rope import apply_rope

# `enable_gqa` arrived in torch 2.5; the project allows torch >= 2.1.
_SDPA_GQA = "enable_gqa" in (F.scaled_dot_product_attention.__doc__ or "")


class Segment:
    """One session's rows in a batched step: where they lie in the flat rows, and its cache."""

    __slots__ = ("offset", "batch", "length", "cache", "past_length", "_masks")

    def __init__(self, offset: int, batch: int, length: int, cache: KVCache | None, past_length: int) -> None:
        self.offset, self.batch, self.length = offset, batch, length
        self.cache, self.past_length = cache, past_length
        self._masks: dict[int | None, tuple[Tensor | None, bool]] = {}

    @property
    def rows(self) -> slice:
        return slice(self.offset, self.offset + self.batch * self.length)

    def heads(self, x: Tensor) -> Tensor:
        """This segment's rows of ``x`` [N, heads, dim] as [batch, heads, length, dim]."""
        if self.offset == 0 and x.shape[0] == self.batch * self.length:  # the only session: no slice
            return x.view(self.batch, self.length, *x.shape[1:]).transpose(1, 2)
        return x[self.rows].view(self.batch, self.length, *x.shape[1:]).transpose(1, 2)

    def mask(self, window: int | None, device: torch.device) -> tuple[Tensor | None, bool]:
        """(attn_mask, is_causal) for queries at past_length.. over keys at 0..past_length+length-1.

        A query at position p sees keys in (p - window, p] when ``window`` is set, else [0, p].
        """
        if window not in self._masks:
            self._masks[window] = self._build_mask(window, device)
        return self._masks[window]

    def _build_mask(self, window: int | None, device: torch.device) -> tuple[Tensor | None, bool]:
        past, length = self.past_length, self.length
        total = past + length
        window_matters = window is not None and total > window
        if not window_matters:
            if past == 0:
                return None, True
            if length == 1:
                return None, False  # one new query sees every stored key
        q_pos = torch.arange(past, total, device=device)[:, None]
        k_pos = torch.arange(total, device=device)[None, :]
        allowed = k_pos <= q_pos
        if window_matters:
            allowed = allowed & (q_pos - k_pos < window)
        return allowed, False


def append_to_cache(seg: Segment, index: int, *new: Tensor, dim: int = 2) -> tuple[Tensor, ...]:
    """Write ``new`` (one tensor per cache tensor of block ``index``) at the segment's positions along
    ``dim``; return every stored position so far. Without a cache, ``new`` itself."""
    if seg.cache is None:
        return new
    end = seg.past_length + seg.length
    out = []
    for stored, value in zip(seg.cache.tensors[index], new, strict=True):
        stored.narrow(dim, seg.past_length, seg.length).copy_(value)
        out.append(stored.narrow(dim, 0, end))
    return tuple(out)


class Attention(nn.Module):
    """Llama-style attention: q/k/v/o projections (optional biases), optional per-head q/k RMSNorm
    (Qwen3), grouped key/value heads, RoPE over the whole head, an optional sliding window."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.window = config.window_of(layer_index)
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=config.attention_bias)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=config.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=config.o_proj_bias)
        self.qk_norm = config.qk_norm
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qkv_proj: nn.Module | None = None  # set by fuse()
        self._qkv_sizes = (self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim,
                           self.num_kv_heads * self.head_dim)

    def fuse(self) -> bool:
        """Replace q_proj, k_proj and v_proj by one ``qkv_proj`` (their weights and biases stacked in
        that order) when all three are plain ``nn.Linear``; return whether it did (idempotent). The
        outputs are the same dot products; only the kernel's blocking may change a sum's last bit."""
        if self.qkv_proj is not None:
            return True
        fused = fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def project(self, h: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Queries [N, heads, dim] and keys [N, kv_heads, dim] of the rows ``h`` [N, hidden], normed (Qwen3)
        and rotated, and values [N, kv_heads, dim]."""
        rows = h.shape[0]
        if self.qkv_proj is not None:
            qkv = self.qkv_proj(h)
            if not self.qk_norm:
                # queries and keys side by side in the fused output: one rotation for both (the same
                # elementwise operations, per element, as rotating each)
                q_size, kv_size, _ = self._qkv_sizes
                qk, v = qkv.split((q_size + kv_size, kv_size), dim=-1)
                q, k = apply_rope(qk.view(rows, -1, self.head_dim), cos, sin).split(
                    (self.num_heads, self.num_kv_heads), dim=1)
                return q, k, v.view(rows, self.num_kv_heads, self.head_dim)
            q, k, v = qkv.split(self._qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(h), self.k_proj(h), self.v_proj(h)
        q = q.view(rows, self.num_heads, self.head_dim)
        k = k.view(rows, self.num_kv_heads, self.head_dim)
        if self.qk_norm:  # Qwen3 normalizes each head before RoPE
            q = self.q_norm(q)
            k = self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v.view(rows, self.num_kv_heads, self.head_dim)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, segments: list[Segment], index: int) -> Tensor:
        """``h`` [N, hidden] normed rows; cos/sin [N, 1, rope_dim] per row; returns [N, hidden]."""
        q, k, v = self.project(h, cos, sin)
        outs = []
        for seg in segments:
            keys, values = append_to_cache(seg, index, seg.heads(k), seg.heads(v))
            mask, is_causal = seg.mask(self.window, h.device)
            out = self.attend(seg.heads(q), keys, values, mask, is_causal)
            outs.append(out.transpose(1, 2).reshape(seg.batch * seg.length, self.num_heads * self.head_dim))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        """Scaled dot-product attention; q [B, heads, T, d], k/v [B, kv_heads, S, d] -> [B, heads, T, d]."""
        groups = self.num_heads // self.num_kv_heads
        if groups > 1 and _SDPA_GQA:
            # Lets SDPA share each key/value head without copying the whole cache every step.
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True)
        if groups > 1:  # torch < 2.5: expand the key/value heads explicitly
            k = k.repeat_interleave(groups, dim=1)
            v = v.repeat_interleave(groups, dim=1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal)


class SinkAttention(Attention):
    """Attention with a learned per-head sink logit (GPT-OSS): the sink joins each query's softmax as
    one more column and is then dropped, so a head may give part of its weight to no position at all.

    The softmax is explicit, in transformers' eager order: scaled scores, mask, the sink column, the
    row maximum subtracted, softmax, sink dropped, then the product with the values.
    """

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.sinks = nn.Parameter(torch.empty(self.num_heads))
        self.scaling = self.head_dim**-0.5

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, is_causal: bool) -> Tensor:
        batch, heads, length, dim = q.shape
        kv_heads, keys = k.shape[1], k.shape[2]
        # Query head h reads key/value head h // groups (transformers' repeat_kv order); grouping the
        # queries instead of expanding the keys spares a copy of the cache every step.
        grouped = q.reshape(batch, kv_heads, heads // kv_heads * length, dim)
        scores = torch.matmul(grouped, k.transpose(2, 3)).view(batch, heads, length, keys) * self.scaling
        if is_causal:  # only for a segment without a past: queries and keys are the same positions
            mask = torch.ones(length, keys, dtype=torch.bool, device=q.device).tril()
        if mask is not None:
            # -inf where the reference adds the dtype's minimum: both give an exact 0 after the
            # softmax, since the sink keeps every row's maximum finite.
            scores = scores.masked_fill(~mask, float("-inf"))
        sinks = self.sinks.view(1, heads, 1, 1).expand(batch, heads, length, 1).to(scores.dtype)
        logits = torch.cat([scores, sinks], dim=-1)
        logits = logits - logits.max(dim=-1, keepdim=True).values
        probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)[..., :-1].to(v.dtype)
        out = torch.matmul(probs.reshape(batch, kv_heads, heads // kv_heads * length, keys), v)
        return out.view(batch, heads, length, dim)
