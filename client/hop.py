"""One hop of an inference session: its open streams and recorded inputs, and when a step on it is late.

Shared by the session (``client.session``: the session's life) and its mirrors (``client.mirror``). A hop's
``inputs`` are every step it was sent, in order, with its rollback ((step_id, hidden, keep_length)): what its
cache holds follows from them (``client.replay``), so a replacement or a new mirror can be rebuilt from them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.transport import HopStream
from homeswarm.routing.records import ServerRecord

if TYPE_CHECKING:
    from homeswarm.client.mirror import MirrorBuild


class SessionError(RuntimeError):
    """The session cannot go on (no replacement for a failed node, or too many failures)."""


@dataclass
class OpenHop:
    start: int
    end: int
    stream: HopStream | None
    # (step_id, hidden, keep_length) sent, in order
    inputs: list[tuple[int, torch.Tensor, int | None]] = field(default_factory=list)
    server: ServerRecord | None = None  # the record the hop was planned from
    mirror: HopStream | None = None  # a second server of the blocks, fed the same inputs (client.mirror)
    mirror_server: ServerRecord | None = None
    mirror_step: int = 0  # the last step sent to the mirror
    building: MirrorBuild | None = None  # a mirror being built in the background


# a prefill position costs a node less than a decoding step (its weights are read once for many positions):
# a step's expected time counts each position at this fraction of a decoding step at the announced speed
PREFILL_STEP_FRACTION = 0.125
_MIN_THROUGHPUT = 1.0  # decoding steps per second through one block assumed of a node announcing less


def step_time_limit(config: ClientConfig, server: ServerRecord | None, blocks: int, tokens: int) -> float:
    """Seconds after which a step of ``tokens`` positions (batch included) through ``blocks`` blocks of
    ``server`` is late: ``config.step_timeout`` plus what the node's announced throughput (decoding steps per
    second through one block) says the positions take. Late is not failed: the client then checks on the node."""
    throughput = max(server.throughput if server is not None else 0.0, _MIN_THROUGHPUT)
    return config.step_timeout + PREFILL_STEP_FRACTION * max(tokens, 1) * blocks / throughput
