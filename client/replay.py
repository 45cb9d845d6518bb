"""What a hop's cache holds, from the steps it was sent, and how to rebuild it on a new node in few steps.

A session records, per hop, every step's input and its rollback ((step_id, hidden [batch, tokens, hidden],
keep_length)). The cache those steps leave is the concatenation of their inputs with each rollback applied
first (``keep_length``: only that many positions kept). Failover rebuilds that cache on a replacement by
sending it as a prefill of few steps (``replay_steps``), not one step per recorded step: a history taken
one token at a time is a handful of messages, each computed in chunks by the node. Each replayed step
carries the id of the last recorded step merged into it (so later steps keep the chain's numbering) and
holds whole recorded steps only, so ids stay distinct and increasing. Pure: tensors in, tensors out.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

StepRecord = tuple[int, torch.Tensor, "int | None"]  # (step_id, hidden [batch, tokens, hidden], keep_length)

# A replayed message's hidden states, at most (a larger recorded step goes alone, as it was first sent).
REPLAY_MAX_BYTES = 64 * 1024 * 1024


def cache_segments(steps: Sequence[StepRecord]) -> list[tuple[int, torch.Tensor]]:
    """(step_id, positions [batch, n, hidden]) that the cache holds after ``steps``, in order: each step's
    input, minus what a later rollback dropped (segments emptied by a rollback are left out)."""
    segments: list[tuple[int, torch.Tensor]] = []
    for step_id, hidden, keep in steps:
        if keep is not None:
            kept, left = [], keep
            for sid, part in segments:
                if left <= 0:
                    break
                kept.append((sid, part[:, :left]))
                left -= part.shape[1]
            if left > 0:
                raise ValueError(f"step {step_id} keeps {keep} positions, the cache held {keep - left}")
            segments = kept
        segments.append((step_id, hidden))
    return [(sid, part) for sid, part in segments if part.shape[1] > 0]


def cache_length(steps: Sequence[StepRecord]) -> int:
    return sum(part.shape[1] for _, part in cache_segments(steps))


def replay_steps(steps: Sequence[StepRecord], max_bytes: int = REPLAY_MAX_BYTES) -> list[tuple[int, torch.Tensor]]:
    """The fewest (step_id, hidden) messages that rebuild the cache of ``steps`` on an empty session: whole
    segments merged while a message stays within ``max_bytes``, each with its last segment's step id."""
    messages: list[tuple[int, torch.Tensor]] = []
    pending: list[torch.Tensor] = []
    pending_bytes = 0
    last_id = 0
    for step_id, part in cache_segments(steps):
        size = part.numel() * part.element_size()
        if pending and pending_bytes + size > max_bytes:
            messages.append((last_id, _cat(pending)))
            pending, pending_bytes = [], 0
        pending.append(part)
        pending_bytes += size
        last_id = step_id
    if pending:
        messages.append((last_id, _cat(pending)))
    return messages


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    if len(parts) == 1:
        return parts[0]
    dtype = parts[-1].dtype
    return torch.cat([p.to(dtype) for p in parts], dim=1)
