"""Mixture-of-Experts feed-forward layers: routers, stacked experts, shared experts.

Responsibility: route each row (token) to its top-k experts and run only those experts, grouped by
expert so that each chosen expert does one matrix product over all the rows that picked it, whatever
the batch; add the shared expert where a family has one.
Invariants: expert weights are stacked, ``gate_up_proj`` [E, 2 * I, H] (gate rows first, then up) and
``down_proj`` [E, H, I], as transformers 5 holds them in memory; a row's expert outputs are summed in
ascending expert order, as the reference sums them; routers use ``torch.topk`` on the same values as
the reference, so ties break the same way.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .mlp import GatedMLP


class SoftmaxTopKRouter(nn.Module):
    """Softmax over all experts in float32, then top-k (Mixtral, Qwen2-MoE, Qwen3-MoE).

    ``normalize``: rescale the k chosen probabilities to sum to 1 (``norm_topk_prob``; always for
    Mixtral). ``float32_weights``: keep the routing weights in float32 (Mixtral) rather than casting
    them back to the activations' dtype (Qwen).
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, normalize: bool,
                 float32_weights: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.top_k = top_k
        self.normalize = normalize
        self.float32_weights = float32_weights

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[N, H] rows -> (weights [N, k], expert indices [N, k])."""
        logits = F.linear(x, self.weight)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, indices = torch.topk(probs, self.top_k, dim=-1)
        if self.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float32_weights:
            weights = weights.to(logits.dtype)
        return weights, indices


def by_expert(indices: Tensor, num_experts: int) -> list[tuple[int, Tensor, Tensor]]:
    """For each expert that some row picked, ascending: (expert, rows that picked it, their slot in
    the top-k). ``indices`` [N, k]."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    groups = []
    start = 0
    for expert, count in enumerate(counts):
        if count:
            chosen = order[start : start + count]
            groups.append((expert, chosen // k, chosen % k))
            start += count
    return groups


class Experts(nn.Module):
    """``num_experts`` gated SiLU MLPs with stacked weights; runs only the experts the router chose."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def _expert(self, expert: int, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.gate_up_proj[expert]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj[expert])

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        if x.shape[0] == 1:
            # One row (a decoding step of one sequence): no grouping, gathering or scattering, which
            # cost as much as the experts' own products at this size. Same sums in the same order:
            # 0 + y is exactly y, then each further expert in ascending order.
            out = None
            for slot, expert in sorted(enumerate(indices[0].tolist()), key=lambda chosen: chosen[1]):
                # weights[0, slot : slot + 1] is 1-D, so float32 weights promote the product, as the
                # reference's [rows, 1] weights do (a 0-D tensor would not).
                y = (self._expert(expert, x) * weights[0, slot : slot + 1]).to(x.dtype)
                out = y if out is None else out + y
            assert out is not None
            return out
        out = torch.zeros_like(x)
        for expert, rows, slots in by_expert(indices, self.num_experts):
            y = self._expert(expert, x[rows]) * weights[rows, slots, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


class SparseMoE(nn.Module):
    """Router + experts, plus an optional shared expert that every row goes through, optionally
    scaled by a sigmoid gate (Qwen2-MoE)."""

    def __init__(self, gate: nn.Module, experts: nn.Module, shared_expert: GatedMLP | None = None,
                 shared_expert_gate: nn.Linear | None = None) -> None:
        super().__init__()
        self.gate = gate
        self.experts = experts
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate

    def forward(self, x: Tensor) -> Tensor:
        weights, indices = self.gate(x)
        out = self.experts(x, weights, indices)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out


class TopKSoftmaxRouter(nn.Module):
    """Top-k of the biased logits, then a softmax over the k chosen only (GPT-OSS): the weights always
    sum to 1, and the experts not chosen take no part in them."""

    def __init__(self, hidden_size: int, num_experts: int, top_k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.bias = nn.Parameter(torch.empty(num_experts))
        self.top_k = top_k

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[N, H] rows -> (weights [N, k], expert indices [N, k])."""
        logits = F.linear(x, self.weight, self.bias)
        top, indices = torch.topk(logits, self.top_k, dim=-1)
        return torch.softmax(top, dim=-1, dtype=top.dtype), indices


class GptOssExperts(nn.Module):
    """GPT-OSS experts: biased projections and a clamped SwiGLU, ``(up + 1) * gate * sigmoid(alpha * gate)``
    with the gate clamped from above and up from both sides at ``limit``.

    Weights as GPT-OSS stores them: ``gate_up_proj`` [E, H, 2I] multiplies from the right, with gate and
    up interleaved along its last dimension (gate at even, up at odd columns), ``down_proj`` [E, I, H].
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, *, alpha: float,
                 limit: float) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, hidden_size, 2 * intermediate_size))
        self.gate_up_proj_bias = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.down_proj_bias = nn.Parameter(torch.empty(num_experts, hidden_size))
        self.alpha = alpha
        self.limit = limit

    def forward(self, x: Tensor, weights: Tensor, indices: Tensor) -> Tensor:
        out = torch.zeros_like(x)
        for expert, rows, slots in by_expert(indices, self.num_experts):
            gate_up = x[rows] @ self.gate_up_proj[expert] + self.gate_up_proj_bias[expert]
            gate = gate_up[..., ::2].clamp(max=self.limit)
            up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
            y = ((up + 1) * (gate * torch.sigmoid(gate * self.alpha))) @ self.down_proj[expert]
            y = (y + self.down_proj_bias[expert]) * weights[rows, slots, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return out


class GroupLimitedRouter(nn.Module):
    """Sigmoid scores with group-limited top-k (DeepSeek-V3, Kimi K2), in float32 throughout.

    The score-correction bias only steers the choice: experts are split into ``n_group`` groups, each
    group scored by the sum of its two best corrected scores, the best ``topk_group`` groups kept, and
    the top-k of the kept experts' corrected scores chosen; the weights are the chosen experts' plain
    scores, renormalised (``normalize``, with the reference's 1e-20 guard) and multiplied by
    ``scaling_factor``. The weights stay float32, as the reference returns them.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int, *, n_group: int, topk_group: int,
                 normalize: bool, scaling_factor: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size, dtype=torch.float32))
        self.register_buffer("e_score_correction_bias", torch.empty(num_experts, dtype=torch.float32))
        self.num_experts, self.top_k = num_experts, top_k
        self.n_group, self.topk_group = n_group, topk_group
        self.normalize, self.scaling_factor = normalize, scaling_factor

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """[N, H] rows -> (float32 weights [N, k], expert indices [N, k])."""
        logits = F.linear(x.to(torch.float32), self.weight.to(torch.float32))
        scores = logits.sigmoid()
        choice = scores + self.e_score_correction_bias
        per_group = self.num_experts // self.n_group
        group_scores = choice.view(-1, self.n_group, per_group).topk(2, dim=-1)[0].sum(dim=-1)
        # The same torch.topk calls (sorted=False included) as the reference, so ties resolve alike.
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, self.n_group, per_group).reshape(-1, self.num_experts)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
        indices = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if self.normalize:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling_factor, indices
