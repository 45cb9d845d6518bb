"""Multi-head Latent Attention (DeepSeek-V3, Kimi K2) over the flat rows of several sessions.

Responsibility: queries from a low-rank (``q_a_proj``, ``q_a_layernorm``, ``q_b_proj``) or full
(``q_proj``) projection; one shared compressed latent (``kv_a_proj_with_mqa``, ``kv_a_layernorm``) and
one shared rotated key part per position; RoPE over ``qk_rope_head_dim`` only, on interleaved pairs
when ``rope_interleave``; the YaRN softmax scale. Attention runs in one of two forms, per session:
- absorbed (DeepSeek-V3's ``attn_impl="absorb"``): each head's query is taken into the latent space
  through its ``W_uk`` (``kv_b_proj``'s key rows), attends over the stored latents themselves, and the
  weighted latent leaves through its ``W_uv`` (the value rows). The stored positions are read as they
  are: a step's cost per cached token is the latent's (kv_lora_rank + qk_rope_head_dim values).
- expanded (transformers' form): keys' unrotated part and values recomputed from every stored latent
  through ``kv_b_proj``, then per-head attention; cheaper when many queries share the expansion (prefill).
:meth:`MultiHeadLatentAttention.absorbs` chooses by counting multiply-adds (see there).
Invariants: the cache of block ``index`` holds exactly the normalized latent [B, L, kv_lora_rank] and
the rotated key part [B, L, qk_rope_head_dim] (576 values per token for DeepSeek-V3), the same
tensors transformers caches, so results do not depend on whether a position came from the cache;
rotated parts are laid out as halves (even pairs' members first) in queries, keys and the cache alike.
``kv_b_proj`` keeps its key and value rows as two contiguous per-head stacks (:class:`LatentUpProjection`),
made once when the checkpoint's matrix is loaded (from a checkpoint that ships it 4-bit: dequantized once,
at the first step); it stays in the model dtype under ``--quant``, and is counted so.
"""

from __future__ import annotations

from typing import Any

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
ATTENTION_FORMS = ("auto", "absorbed", "expanded")


def softmax_scale(config: ModelConfig, mla: MLAConfig) -> float:
    """qk_head_dim ** -0.5, times mscale(factor, mscale_all_dim) squared under YaRN with mscale_all_dim."""
    scale = mla.qk_head_dim ** (-0.5)
    scaling = config.rope_scaling
    if scaling is not None and scaling.get("mscale_all_dim"):
        factor = scaling.get("factor") or config.max_position_embeddings / scaling["original_max_position_embeddings"]
        mscale = yarn_mscale(factor, scaling["mscale_all_dim"])
        scale = scale * mscale * mscale  # in the reference's order
    return scale


class LatentUpProjection(nn.Module):
    """``kv_b_proj``: the latent's up-projection to each head's unrotated key part and value, held as
    ``w_uk`` [heads, qk_nope_head_dim, kv_lora_rank] and ``w_uv`` [heads, v_head_dim, kv_lora_rank], each
    contiguous (a batched product over a strided view of one matrix copies it: 4-14x slower in bfloat16
    here). Its state dict speaks the checkpoint's form, one ``weight`` [heads * (nope + v), kv_lora_rank]
    (split on loading, joined on saving), so checkpoint names, loading and byte counts stay those of a
    linear layer. Not an ``nn.Linear``: weight quantization leaves it in the model dtype, which the
    absorbed products read (it is 2-8% of an MLA block's attention weights)."""

    def __init__(self, kv_lora_rank: int, heads: int, nope_dim: int, v_dim: int) -> None:
        super().__init__()
        self.heads, self.nope_dim, self.v_dim, self.kv_lora_rank = heads, nope_dim, v_dim, kv_lora_rank
        self.w_uk = nn.Parameter(torch.empty(heads, nope_dim, kv_lora_rank))
        self.w_uv = nn.Parameter(torch.empty(heads, v_dim, kv_lora_rank))

    @property
    def in_features(self) -> int:
        return self.kv_lora_rank

    @property
    def out_features(self) -> int:
        return self.heads * (self.nope_dim + self.v_dim)

    def keys_and_values(self, latent: Tensor) -> tuple[Tensor, Tensor]:
        """``latent`` [..., kv_lora_rank] -> unrotated key parts [..., heads, nope] and values [..., heads, v]."""
        k = F.linear(latent, self.w_uk.view(-1, self.kv_lora_rank))
        v = F.linear(latent, self.w_uv.view(-1, self.kv_lora_rank))
        return k.view(*latent.shape[:-1], self.heads, self.nope_dim), v.view(*latent.shape[:-1], self.heads, self.v_dim)

    def forward(self, latent: Tensor) -> Tensor:
        """What ``nn.Linear`` with the checkpoint's weight gives: [..., heads * (nope + v)]."""
        k, v = self.keys_and_values(latent)
        return torch.cat((k, v), dim=-1).flatten(-2)

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        weight = torch.cat((self.w_uk, self.w_uv), dim=1).view(self.out_features, self.kv_lora_rank)
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[no-untyped-def]
        key = prefix + "weight"
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k != key
                                   and "." not in k[len(prefix):])
        weight = state_dict.get(key)
        if weight is None:
            if strict:
                missing_keys.append(key)
            return
        if tuple(weight.shape) != (self.out_features, self.kv_lora_rank):
            error_msgs.append(f"size mismatch for {key}: got {list(weight.shape)}, the layer takes "
                              f"[{self.out_features}, {self.kv_lora_rank}]")
            return
        rows = weight.view(self.heads, self.nope_dim + self.v_dim, self.kv_lora_rank)
        k, v = rows.split((self.nope_dim, self.v_dim), dim=1)
        with torch.no_grad():
            if local_metadata.get("assign_to_params_buffers", False) or self.w_uk.is_meta:
                # new storage either way: a view of the checkpoint file's memory map is not kept
                self.w_uk = nn.Parameter(k.clone(memory_format=torch.contiguous_format),
                                         requires_grad=self.w_uk.requires_grad)
                self.w_uv = nn.Parameter(v.clone(memory_format=torch.contiguous_format),
                                         requires_grad=self.w_uv.requires_grad)
            else:
                self.w_uk.copy_(k)
                self.w_uv.copy_(v)

    def extra_repr(self) -> str:
        return (f"kv_lora_rank={self.kv_lora_rank}, heads={self.heads}, nope_dim={self.nope_dim}, "
                f"v_dim={self.v_dim}")


class MultiHeadLatentAttention(nn.Module):
    """MLA with the rows API of :class:`~.attention.Attention`: ``forward(h [N, hidden], cos, sin
    [N, 1, qk_rope_head_dim], segments, index) -> [N, hidden]``."""

    # "auto" chooses per session by counting multiply-adds (absorbs()); "absorbed" and "expanded" force a
    # form (benchmarks and tests set it on the class or on one module).
    attention_form = "auto"

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
        self.kv_b_proj: nn.Module
        if config.prequant is not None and config.prequant.covers("self_attn.kv_b_proj", layer_index):
            # a checkpoint that ships kv_b_proj 4-bit: read as stored (build_block swaps this layer for its
            # 4-bit module), dequantized into the per-head stacks once, at the first step (_up)
            self.kv_b_proj = nn.Linear(mla.kv_lora_rank, heads * (self.nope_dim + self.v_dim), bias=False)
        else:
            self.kv_b_proj = LatentUpProjection(mla.kv_lora_rank, heads, self.nope_dim, self.v_dim)
        self.o_proj = nn.Linear(heads * self.v_dim, hidden, bias=bias)

    # model/sizes.py counts these children in the model dtype, whatever form they are loaded in
    held_in_float = ("kv_b_proj",)

    def _up(self, dtype: torch.dtype) -> LatentUpProjection:
        """``kv_b_proj`` as per-head stacks; a 4-bit one is dequantized into them once, here."""
        up = self.kv_b_proj
        if not isinstance(up, LatentUpProjection):
            weight = up.dequantized_weight(dtype)  # type: ignore[operator]
            up = LatentUpProjection(self.kv_lora_rank, self.num_heads, self.nope_dim, self.v_dim).to(weight.device)
            up.load_state_dict({"weight": weight}, assign=True)
            up.requires_grad_(False)
            self.kv_b_proj = up
        return up

    def _rope(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        # Interleaved pairs rotated directly equal, bit for bit, the pairs gathered into halves and
        # rotated as halves: the result is in halves either way, as the reference leaves it.
        return apply_rope(deinterleave(x) if self.interleave else x, cos, sin)

    def absorbs(self, length: int, total: int) -> bool:
        """Whether ``length`` new queries per sequence over ``total`` stored positions attend in the
        absorbed form: when it takes fewer multiply-adds per head than the expanded one.
        absorbed: length * rank * (nope + v) to take queries in and outputs out, plus
        length * total * (2 * rank + rope) for scores and the weighted sum over the latents;
        expanded: total * rank * (nope + v) to expand every stored position, plus
        length * total * (nope + rope + v). With K2's sizes (rank 512, nope = v = 128, rope 64) decoding
        steps, verify steps and small batches of new tokens absorb (up to about 170 queries per
        sequence over a long past), a prefill from an empty cache never does. Measured, the absorbed form
        stays faster past that line (docs/BENCHMARKS.md, "Kimi K2 on N PCs"); the count bounds it anyway,
        since it holds every head's scores over every stored position at once, in float32."""
        if self.attention_form != "auto":
            if self.attention_form not in ATTENTION_FORMS:
                raise ValueError(f"attention_form must be one of {ATTENTION_FORMS}, got {self.attention_form!r}")
            return self.attention_form == "absorbed"
        rank, up = self.kv_lora_rank, self.nope_dim + self.v_dim
        absorbed = length * rank * up + length * total * (2 * rank + self.rope_dim)
        expanded = total * rank * up + length * total * (self.qk_dim + self.v_dim)
        return absorbed < expanded

    def forward(self, h: Tensor, cos: Tensor, sin: Tensor, segments: list[Segment], index: int) -> Tensor:
        """``h`` [N, hidden] normed rows; cos/sin [N, 1, qk_rope_head_dim] per row; returns [N, hidden]."""
        rows = h.shape[0]
        q = self.q_proj(h) if not self.q_lora else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(h)))
        q_pass, q_rot = q.view(rows, self.num_heads, self.qk_dim).split([self.nope_dim, self.rope_dim], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(h).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_rot = self._rope(q_rot, cos, sin)
        k_rot = self._rope(k_rot[:, None], cos, sin)[:, 0]  # one key part shared by every head
        up = self._up(latent.dtype)
        forms = [self.absorbs(seg.length, seg.past_length + seg.length) for seg in segments]
        # every session absorbing (decoding): one product takes all rows' queries in, one takes them out
        shared = all(forms) and len(segments) > 1
        q_latent = self._absorb_queries(up, q_pass) if shared else None
        outs = []
        for seg, absorbed in zip(segments, forms, strict=True):
            shape = (seg.batch, seg.length)
            stored_latent, stored_rot = append_to_cache(
                seg, index, latent[seg.rows].view(*shape, -1), k_rot[seg.rows].view(*shape, -1), dim=1)
            if absorbed:
                seg_q = q_latent[:, seg.rows] if q_latent is not None else self._absorb_queries(up, q_pass[seg.rows])
                out = self._attend_latent(seg, seg_q, q_rot[seg.rows], stored_latent, stored_rot, h.device)
                outs.append(out if shared else self._values_out(up, out))
            else:
                outs.append(self._attend_expanded(up, seg, q_pass, q_rot, stored_latent, stored_rot, h.device))
        if shared:  # [heads, n, rank] per session
            out = self._values_out(up, torch.cat(outs, dim=1))
        else:
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return self.o_proj(out)

    def _absorb_queries(self, up: LatentUpProjection, q_pass: Tensor) -> Tensor:
        """Unrotated query parts [n, heads, nope] -> the latent space, per head: [heads, n, rank]."""
        return torch.bmm(q_pass.transpose(0, 1), up.w_uk)

    def _values_out(self, up: LatentUpProjection, out_latent: Tensor) -> Tensor:
        """Attention-weighted latents [heads, n, rank] -> each head's values, as rows [n, heads * v]."""
        values = torch.bmm(out_latent, up.w_uv.transpose(1, 2))  # [heads, n, v]
        return values.transpose(0, 1).reshape(out_latent.shape[1], self.num_heads * self.v_dim)

    def _attend_latent(self, seg: Segment, q_latent: Tensor, q_rot: Tensor, latent: Tensor, k_rot: Tensor,
                       device: torch.device) -> Tensor:
        """One session's absorbed queries [heads, B*T, rank] and rotated parts [B*T, heads, rope] over its
        stored latents [B, S, rank] and key parts [B, S, rope] -> weighted latents [heads, B*T, rank].
        Each sequence's heads and queries form the rows of one product with its stored positions, in the
        reference's order: scores scaled, masked, softmax in float32, rounded to the activations' dtype."""
        batch, length, heads = seg.batch, seg.length, self.num_heads
        ql = q_latent.view(heads, batch, length, -1).transpose(0, 1).reshape(batch, heads * length, -1)
        qr = q_rot.view(batch, length, heads, -1).transpose(1, 2).reshape(batch, heads * length, -1)
        rot_scores = torch.bmm(qr, k_rot.transpose(1, 2))
        scores = torch.baddbmm(rot_scores, ql, latent.transpose(1, 2), beta=self.scale, alpha=self.scale)
        mask, is_causal = seg.mask(None, device)
        if is_causal:  # no past: queries and stored positions are the same positions
            mask = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if mask is not None:
            scores = scores.view(batch, heads, length, -1).masked_fill(~mask, float("-inf")).view_as(scores)
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(latent.dtype)
        out = torch.bmm(probs, latent)  # [B, heads * T, rank]
        return out.view(batch, heads, length, -1).transpose(0, 1).reshape(heads, batch * length, -1)

    def _attend_expanded(self, up: LatentUpProjection, seg: Segment, q_pass: Tensor, q_rot: Tensor,
                         latent: Tensor, k_rot: Tensor, device: torch.device) -> Tensor:
        """One session's attention with keys and values expanded from every stored latent -> [B*T, heads * v]."""
        batch, length = latent.shape[:2]
        k_nope, values = up.keys_and_values(latent)  # [B, S, heads, nope | v]
        k_rot = k_rot[:, None].expand(batch, self.num_heads, length, self.rope_dim)
        keys = torch.cat((k_nope.transpose(1, 2), k_rot), dim=-1)
        q = torch.cat((q_pass, q_rot), dim=-1)
        mask, is_causal = seg.mask(None, device)
        out = F.scaled_dot_product_attention(seg.heads(q), keys, values.transpose(1, 2), attn_mask=mask,
                                             is_causal=is_causal, scale=self.scale)
        return out.transpose(1, 2).reshape(seg.batch * seg.length, self.num_heads * self.v_dim)
