"""What transformers computes, step by step, to hold the numbers that come back through a swarm against.

The hidden states compared are those leaving the last block, before the final norm: an RMSNorm divides
out any common scale, so a hidden state off by a constant factor would pass a check on normed states or
on logits alone. A step is checked on its own (a decoding step's one position is not averaged into a
long prompt's), with the relative error of the whole step's tensor, as the in-process tests do. The
nodes' Info counters tell how the steps travelled and were computed.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

from homeswarm.client.transport import ChannelPool, ping

# float32 through the swarm against transformers in float32: the in-process tests' bound. Measured here:
# a cached decoding step differs by at most 2.3e-6 per position (different kernel shapes), the uncached
# prefill not at all; a 1e-4 relative error anywhere on the way stands out by 10x.
FLOAT32_TOL = 1e-5


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()


def reference_in(path: str | Path, dtype: torch.dtype) -> transformers.PreTrainedModel:
    """The checkpoint loaded by transformers in ``dtype``, eval mode."""
    transformers.utils.logging.disable_progress_bar()
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


@torch.no_grad()
def last_hidden_states(model: transformers.PreTrainedModel, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden states entering the final norm [B, T, H], logits [B, T, V]) of one uncached forward pass."""
    seen: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _module, args: seen.append(args[0]))
    try:
        out = model(ids, attention_mask=torch.ones_like(ids))
    finally:
        hook.remove()
    assert len(seen) == 1
    return seen[0], out.logits


def step_errors(steps: list[torch.Tensor], reference: torch.Tensor) -> list[float]:
    """Relative error of each step's output against the matching positions of ``reference`` [B, T, H]."""
    errors, offset = [], 0
    for out in steps:
        length = out.shape[1]
        errors.append(rel_err(out, reference[:, offset : offset + length]))
        offset += length
    assert offset == reference.shape[1], "the steps do not cover the reference positions"
    return errors


@torch.no_grad()
def greedy_steps(model, session, prompt: torch.Tensor, new_tokens: int,
                 before_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Greedy decoding through ``session`` of a distributed model: (prompt plus new ids, every step's output).

    Step 0 is the prompt; step i > 0 feeds token i - 1. ``before_step(i)`` runs before step i is sent.
    """
    ids, outputs = prompt, []
    for i in range(new_tokens):
        if before_step is not None:
            before_step(i)
        hidden = session.step(model.head.embed(prompt if i == 0 else ids[:, -1:]))
        outputs.append(hidden)
        token = model.head.logits(hidden[:, -1:])[:, -1].float().argmax(dim=-1)
        ids = torch.cat([ids, token[:, None]], dim=1)
    return ids, outputs


def check_against(reference: transformers.PreTrainedModel, ids: torch.Tensor, outputs: list[torch.Tensor],
                  tol: float) -> list[float]:
    """Assert that each step's output is within ``tol`` of transformers' over ``ids``; return the errors.

    ``outputs`` are the steps of greedy_steps (the last new token was never fed back)."""
    expected, _ = last_hidden_states(reference, ids[:, :-1])
    errors = step_errors(outputs, expected)
    assert max(errors) < tol, f"relative error per step {errors} (bound {tol:g})"
    return errors


def node_counters(addresses: list[str], peers: dict[str, Any], pool: ChannelPool | None = None) -> dict[str, object]:
    """Each node's Info (counters since start), by address; ``peers`` maps address -> the node's ready-file
    info (peer id, TLS certificate), or -> its peer id when ``pool`` knows its certificate. A ``pool``
    given keeps its connections for the next call (for reads that must be quick)."""
    own = pool is None
    pool = ChannelPool() if pool is None else pool
    ids = {}
    for address in addresses:
        peer = peers[address]
        ids[address] = peer["peer_id"] if isinstance(peer, dict) else peer
        if isinstance(peer, dict):
            pool.note_tls(peer["peer_id"], peer.get("tls_cert", ""))
    try:
        return {address: ping(pool, ids[address], address, 10)[1] for address in addresses}
    finally:
        if own:
            pool.close()


def node_info(address: str, peer: str | dict[str, Any], pool: ChannelPool | None = None):
    """One node's Info (its counters since start); ``peer`` as in ``node_counters``."""
    return node_counters([address], {address: peer}, pool)[address]


def steps_in(info) -> int:
    """Steps a node has received (from the client or pushed by a peer), from its Info."""
    return info.steps_from_client + info.steps_from_peers
