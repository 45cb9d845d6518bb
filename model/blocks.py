"""A pre-norm Transformer decoder block, and a span of consecutive blocks: what one node serves.

Responsibility: compute blocks ``[start, end)`` of a model exactly as transformers does (same operation
order, RMSNorm in float32, RoPE tables in float32 cast to the activation dtype), with or without a
:class:`KVCache`, for every family in ``families/``, which says what attention and feed-forward each
block has.

Invariants: parameter names mirror Hugging Face's (``layers.{i - start}.self_attn.q_proj.weight`` for
checkpoint ``model.layers.{i}.self_attn.q_proj.weight``; where a family's checkpoint names differ, its
``aliases`` and the loader map them); a forward call either fully succeeds, or raises before touching
the cache (all checks happen first), so a failed call never leaves the cache half-written.
Every forward runs over flat rows: norms, projections, the MLP or experts run once over the rows of
all sessions of a batch; RoPE, the cache append and attention run per session (:class:`Segment`), so
:meth:`BlockSpan.forward_batch` computes exactly what one ``forward`` per session computes.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .attention import Segment
from .config import ModelConfig
from .kv_cache import KVCache
from .norms import RMSNorm
from .rope import cos_sin, rope_tables


class DecoderBlock(nn.Module):
    """One pre-norm block: x + attn(norm(x)), then x + mlp(norm(x)), over flat rows [N, hidden]."""

    def __init__(self, config: ModelConfig, attention: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = attention
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, segments: list[Segment], index: int) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, segments, index)
        return x + self.mlp(self.post_attention_layernorm(x))


def fuse_projections(module: nn.Module) -> int:
    """Fuse the projections that read the same input (q/k/v, gate/up) in every submodule that can
    (:meth:`Attention.fuse <.attention.Attention.fuse>`, :meth:`GatedMLP.fuse <.mlp.GatedMLP.fuse>`:
    plain ``nn.Linear`` layers only); return how many modules fused. The loader calls it on each
    loaded block before quantizing, so a fused projection is quantized as one matrix."""
    fusable = [m for m in module.modules() if callable(getattr(m, "fuse", None)) and m is not module]
    return sum(bool(m.fuse()) for m in fusable)


def build_block(config: ModelConfig, layer: int) -> nn.Module:
    """Block ``layer`` (absolute index) of a model, as its family composes it."""
    from .families import family_of  # the families build on this module

    family = family_of(config.family)
    block = family.block(config, layer)
    if config.prequant is not None:  # linear weights stored as 4-bit integers: layers that read them
        from .prequant import replace_prequantized

        replace_prequantized(block, config.prequant, layer, family.expert_names, family.aliases)
    return block


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
        self.layers = nn.ModuleList(build_block(config, i) for i in range(start, end))
        # float32, CPU; moved lazily to the activations' device
        self._inv_freq, self._rope_factor = rope_tables(config.rope_dim, config.rope_theta, config.rope_scaling,
                                                        config.max_position_embeddings)
        self._rope_cache: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

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
        view._inv_freq, view._rope_factor = self._inv_freq, self._rope_factor
        view._rope_cache = self._rope_cache
        return view

    def new_cache(self, batch_size: int, max_length: int) -> KVCache:
        """An empty cache for this span, in the span's dtype and on its device."""
        return KVCache(self.config, self.num_blocks, batch_size, max_length, dtype=self.dtype, device=self.device)

    def _rope_at(self, positions: Tensor, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin [len(positions), rope_dim] for float32 positions."""
        return cos_sin(self._inv_freq, self._rope_factor, positions, dtype, device)

    def _rope_rows(self, start: int, end: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
        """cos and sin [end - start, rope_dim] for positions start..end-1, sliced from a table of the
        first positions (grown to the next power of two when needed): a decoding step takes one slice
        instead of a dozen small operations. The table holds what :meth:`_rope_at` gives for each
        position (the same elementwise operations, row by row)."""
        key = (dtype, device)
        table = self._rope_cache.get(key)
        if table is None or table[0].shape[0] < end:
            size = max(256, 1 << (end - 1).bit_length())
            table = self._rope_at(torch.arange(size, device=device, dtype=torch.float32), dtype, device)
            self._rope_cache[key] = table
        return table[0][start:end], table[1][start:end]

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
        return self._run([(hidden, cache)])[0]

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
        return self._run(items)

    def _run(self, items: list[tuple[Tensor, KVCache | None]]) -> list[Tensor]:
        segments = []
        offset = 0
        device = items[0][0].device
        for hidden, cache in items:
            batch, length = hidden.shape[:2]
            past = cache.length if cache is not None else 0
            segments.append(Segment(offset, batch, length, cache, past))
            offset += batch * length
        if len(segments) == 1 and segments[0].batch == 1:
            # One session of one sequence (the common case on a node): a slice of the table, no copy.
            seg = segments[0]
            cos, sin = self._rope_rows(seg.past_length, seg.past_length + seg.length, self.dtype, device)
        else:
            end = max(seg.past_length + seg.length for seg in segments)
            cos, sin = self._rope_rows(0, end, self.dtype, device)
            index = torch.cat([torch.arange(seg.past_length, seg.past_length + seg.length,
                                            device=device).repeat(seg.batch) for seg in segments])
            cos, sin = cos[index], sin[index]
        cos, sin = cos[:, None], sin[:, None]  # [N, 1, rope_dim]: broadcast over the heads
        rows = [hidden.reshape(-1, hidden.shape[-1]) for hidden, _ in items]
        x = rows[0] if len(rows) == 1 else torch.cat(rows)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, segments, i)
        for seg in segments:
            if seg.cache is not None:
                seg.cache.length += seg.length
        return [x[seg.rows].view(seg.batch, seg.length, -1) for seg in segments]
