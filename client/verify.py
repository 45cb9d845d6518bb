"""Catching wrong activations: re-running a random fraction of steps on a second server of the same span.

For a checked step, the client relays (no hand-off, so no node downstream sees an output before it is
checked) and, for every hop with a replica (another unbanned server covering the hop's blocks, with the
same dtype and weight format), runs the hop's whole input history through the replica's stateless
Forward and compares the output of this step's tokens with the hop's answer, within a tolerance for the
dtype, the weight format and the wire compression (``tolerance``).

On a disagreement it asks who is wrong (``judge``): the hop again, with the replica's very request (an
honest node reproduces its answer; a node that adds noise does not), then the replica again, then a third
server if there is one (the majority wins). A node caught is reported in a log line, banned by the route
manager (``ClientConfig.caught_ban_seconds``), and the step recomputed elsewhere. Two self-consistent
servers that disagree, with no third to decide, stop the session: an unchecked answer is never returned.
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import grpc
import torch

from homeswarm.client.transport import ChannelPool, HopFailed
from homeswarm.protocol import PROTOCOL_VERSION, CodecError, deserialize_tensor, node_pb2, serialize_tensor
from homeswarm.routing.records import ServerRecord, ServerState

logger = logging.getLogger(__name__)

# relative error (Frobenius norm) two honest computations of a span may differ by: a prefill of the whole
# history against step-by-step decoding with a cache differ in the order of their sums
_DTYPE_TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 3e-2}
_QUANT_FACTOR = {"none": 1.0, "int8": 2.0, "int4": 3.0}
_COMPRESSION_TOLERANCE = {"none": 0.0, "auto": 2e-3, "float16": 2e-3, "bfloat16": 1e-2, "int8": 2e-2}


def tolerance(dtype: str, quant: str, compression: str) -> float:
    """How far (relative error) an honest hop's answer may be from a replica's recomputation."""
    base = _DTYPE_TOLERANCE.get(dtype, 3e-2) * _QUANT_FACTOR.get(quant, 3.0)
    return base + _COMPRESSION_TOLERANCE.get(compression, 2e-2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


class Culprit(enum.Enum):
    NONE = "none"  # a false alarm: on a second look the answers agree
    HOP = "hop"  # the hop's answer is wrong: ban it, recompute the step
    REPLICA = "replica"  # the replica's answer is wrong: ban it, keep the hop's
    UNDECIDED = "undecided"  # two self-consistent answers, nobody to break the tie


def judge(answer: torch.Tensor, replica: torch.Tensor, hop_again: Callable[[], torch.Tensor],
          replica_again: Callable[[], torch.Tensor], third: Callable[[], torch.Tensor | None],
          tol: float) -> Culprit:
    """Who is wrong when the hop's ``answer`` and the ``replica``'s recomputation disagree. Pure but for the
    callables, each a fresh recomputation of the same request (asked only when needed)."""
    def close(x: torch.Tensor, y: torch.Tensor) -> bool:
        return rel_err(x, y) <= tol

    again = hop_again()
    if not close(again, answer):
        return Culprit.HOP  # it does not reproduce its own answer
    if close(again, replica):
        return Culprit.NONE
    if not close(replica_again(), replica):
        return Culprit.REPLICA
    tie_breaker = third()
    if tie_breaker is None:
        return Culprit.UNDECIDED
    if close(tie_breaker, answer) and not close(tie_breaker, replica):
        return Culprit.REPLICA
    if close(tie_breaker, replica) and not close(tie_breaker, answer):
        return Culprit.HOP
    return Culprit.UNDECIDED


@dataclass
class Verdict:
    culprit: Culprit
    replica: ServerRecord | None = None  # None: no replica to check against
    error: float = 0.0  # relative error of the hop's answer against the replica's first recomputation


class Verifier:
    """Decides which steps are checked and checks one hop's answer against replicas of its span."""

    def __init__(self, pool: ChannelPool, *, fraction: float, compression: str, timeout: float,
                 rng: random.Random | None = None, adapter: str = "",
                 lora: Callable[[int, int], list[node_pb2.LoraMatrices]] | None = None):
        """``adapter``: the session's LoRA adapter: replicas must serve it, and run it; ``lora``: blocks [start,
        end) -> the client's own LoRA matrices for them, sent with each check (None: none)."""
        self.pool = pool
        self.adapter = adapter
        self.lora = lora
        self.fraction = fraction
        self.compression = compression
        self.timeout = timeout
        self.rng = rng or random.Random()
        self.checks = 0  # hop answers compared with a replica
        self.unverifiable = 0  # hop answers that had no replica to compare with

    def pick_step(self) -> bool:
        return self.fraction > 0 and self.rng.random() < self.fraction

    def replicas(self, hop: ServerRecord, start: int, end: int, records: Sequence[ServerRecord],
                 banned: Callable[[str], bool]) -> list[ServerRecord]:
        found = [r for r in records if r.peer_id != hop.peer_id and r.start <= start and end <= r.end
                 and r.state == ServerState.ONLINE and r.dtype == hop.dtype and r.quant == hop.quant
                 and (not self.adapter or self.adapter in r.adapters) and not banned(r.peer_id)]
        self.rng.shuffle(found)
        return found

    def forward(self, server: ServerRecord, inputs: torch.Tensor, start: int, end: int) -> torch.Tensor:
        request = node_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(inputs),
                                          start_block=start, end_block=end, adapter=self.adapter,
                                          lora=self.lora(start, end) if self.lora is not None else ())
        try:
            response = self.pool.stub(server.address, server.peer_id).Forward(request, timeout=self.timeout)
            return deserialize_tensor(response.hidden)
        except grpc.RpcError as e:
            raise HopFailed(server.peer_id, server.address, f"check failed: {e.code().name}: {e.details()}",
                            e.code()) from None
        except CodecError as e:
            raise HopFailed(server.peer_id, server.address, f"malformed hidden states: {e}") from None

    def check(self, hop: ServerRecord, start: int, end: int, history: torch.Tensor, answer: torch.Tensor,
              replicas: list[ServerRecord]) -> Verdict:
        """Compare the hop's ``answer`` (its output for the last tokens of ``history``) with replicas'.

        ``history``: every input the hop got in this session, this step's last, [batch, tokens, hidden].
        A replica that fails to answer is skipped (HopFailed from the hop itself propagates).
        """
        tokens = answer.shape[1]
        tol = tolerance(hop.dtype, hop.quant, self.compression)
        while replicas:
            replica = replicas.pop(0)
            try:
                expected = self.forward(replica, history, start, end)[:, -tokens:]
            except HopFailed as e:
                logger.info("skipping a replica for the check: %s", e)
                continue
            self.checks += 1
            error = rel_err(answer, expected)
            if error <= tol:
                return Verdict(Culprit.NONE, replica, error)

            def third() -> torch.Tensor | None:
                for other in replicas:
                    try:
                        return self.forward(other, history, start, end)[:, -tokens:]
                    except HopFailed:
                        continue
                return None

            culprit = judge(answer, expected,
                            hop_again=lambda: self.forward(hop, history, start, end)[:, -tokens:],
                            replica_again=lambda r=replica: self.forward(r, history, start, end)[:, -tokens:],
                            third=third, tol=tol)
            return Verdict(culprit, replica, error)
        self.unverifiable += 1
        return Verdict(Culprit.NONE, None)
