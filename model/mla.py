"""Multi-head Latent Attention (DeepSeek-V3, Kimi K2) over the flat rows of several sessions.

Responsibility: queries from a low-rank (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``) or full
(``q_proj``) projection; one shared compressed latent (``kv_a_proj_with_mqa``, ``kv_a_layernorm``) and
one shared rotated key part per position; keys' unrotated part and the values recomputed from the
latent (``kv_b_proj``) for every stored position at each step; RoPE over ``qk_rope_head_dim`` only,
on interleaved pairs when ``rope_interleave``; the YaRN softmax scale.
Invariants: the cache of block ``index`` holds exactly the normalized latent [B, L, kv_lora_rank] and
the rotated key part [B, L, qk_rope_head_dim] (576 values per token for DeepSeek-V3), the same
tensors transformers caches, so results do not depend on whether a position came from the cache;
rotated parts are laid out as halves (even pairs' members first) in queries, keys and the cache alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .attention import Segment, append_to_cache
from .config import MLAConfig, ModelConfig
from .norms import RMSNorm
from .rope import apply_rope, deinterleave, yarn_mscale

# transformers (and DeepSeek's own code) build the latent norms with the RMSNorm default eps, not the
# config's rms_norm_eps.
_LATENT_NORM_EPS = 1e-6


def softmax_scale(config: ModelConfig, mla: MLAConfig) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) squared under YaRN with mscale_all_dim."""
    scale = mla.qk_head_dim ** (-0.5)
    scaling = config.rope_scaling
    if scaling is not None and scaling.get("mscale_all_dim"):
        factor = scaling.get("factor") or config.max_position_embeddings / scaling["original_max_position_embeddings"]
        mscale = yarn_mscale(factor, scaling["mscale_all_dim"])
        scale = scale * mscale * mscale  # in the reference's order
    return scale


class MultiHeadLatentAttention(nn.Module):
    """MLA with the rows API of :class:`~.attention.Attention`: ``forward(h [N, hidden], cos, sin
    [N, 1, qk_rope_head_dim], segments, index) -> [N, hidden]``."""

    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        mla = config.mla
        if mla is None:
            raise ValueError("MultiHeadLatentAttention needs config.mla")
        hidden, heads, bias = config.hidden_size, config.num_attention_heads, config.attention_bias
        self.num_heads = heads
        self.nope_dim, self.rope_dim, self.v_dim = mla.qk_nope_head_dim, mla.qk_rope_head_dim, mla.v_head_dim
        self.qk_dim = mla.qk_head_dim
        self.kv_lora_rank = mla.kv_lora_rank
        self.interleave = mla.rope_interleave
        self.scale = softmax_scale(config, mla)
        self.q_lora = mla.q_lora_rank is not None
        if mla.q_lora_rank is None:
            self.q_proj = nn.Linear(hidden, heads * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, _LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(mla.q_lora_rank, heads * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, mla.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, _LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(mla.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # Interleaved pairs rotated directly equal, bit for bit, the pairs gathered into halves and
        # rotated as halves: the result is in halves either way, as the reference leaves it.
        return apply_rope(deinterleave(x) if self.interleave else x, cos, sin)

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, segments: list[Segment], index: int) -> Tensor:
        """``h`` [N, hidden] normed rows; cos/sin [N, 1, qk_rope_head_dim] per row; returns [N, hidden]."""
        rows = h.shape[0]
        q = self.q_proj(h) if not self.q_lora else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        q_pass, q_rot = q.view(rows, self.num_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(h).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q = torch.cat((q_pass, self._rope(q_rot, cos, sin)), dim=-1)
        k_rot = self._rope(k_rot[:, None], cos, sin)[:, 0]  # one key part shared by every head
        outs = []
        for seg in segments:
            shape = (seg.batch, seg.length)
            stored_latent, stored_rot = append_to_cache(
                seg, index, latent[seg.rows].view(*shape, -1), k_rot[seg.rows].view(*shape, -1), dim=1)
            keys, values = self._expand(stored_latent, stored_rot)
            mask, is_causal = seg.mask(None, h.device)
            out = F.scaled_dot_product_attention(seg.heads(q), keys, values, attn_mask=mask, is_causal=is_causal,
                                                 scale=self.scale)
            outs.append(out.transpose(1, 2).reshape(seg.batch * seg.length, self.num_heads * self.v_dim))
        return self.o_proj(outs[0] if len(outs) == 1 else torch.cat(outs))

    def _expand(self, latent: Tensor, k_rot: Tensor) -> tuple[Tensor, Tensor]:
        """Latent [B, S, kv_lora_rank] and rotated key part [B, S, rope] -> keys [B, heads, S, qk_head_dim]
        and values [B, heads, S, v_head_dim]."""
        batch, length = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(batch, length, self.num_heads, self.nope_dim + self.v_dim).transpose(1, 2)
        k_nope, values = kv.split([self.nope_dim, self.v_dim], dim=-1)
        k_rot = k_rot[:, None].expand(batch, self.num_heads, length, self.rope_dim)
        return torch.cat((k_nope, k_rot), dim=-1), values
