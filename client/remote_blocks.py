"""Every block of the model on the swarm as one differentiable function, for training.

Forward runs the hidden states hop by hop through the route's stateless Forward RPCs, keeping each
hop's input; backward sends each hop, last to first, its input and the gradient of its output
(Backward RPC) and passes the returned input gradient on. Deep prompts travel with both, each hop
getting its blocks' rows, and their gradients come back per hop. Nothing is held on the nodes between
the two passes, so any server of a span can answer either.

Failover: a hop that fails (unreachable, timed out, an error status other than INVALID_ARGUMENT) is
banned by the route manager and its blocks re-planned, possibly as several hops, which take its place
for the rest of this pass and later steps; a failed backward hop is recomputed on the replacement chain
(a forward through it for the inner inputs when it has several hops). Routes use unquantized nodes only
(``exact``): quantized ones have no backward pass. After ``max_failovers`` failures the step raises.
INVALID_ARGUMENT is the client's own mistake and raises at once.
"""

from __future__ import annotations

import logging
from typing import Any

import grpc
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.route import RouteManager
from homeswarm.client.transport import ChannelPool, HopFailed
from homeswarm.protocol import PROTOCOL_VERSION, CodecError, deserialize_tensor, node_pb2, serialize_tensor
from homeswarm.protocol.codec import parse_compression
from homeswarm.routing.planner import Hop

logger = logging.getLogger(__name__)

Trace = list[tuple[Hop, torch.Tensor]]  # each hop of a forward pass and the input it got


class TrainingError(RuntimeError):
    """A training step could not be completed through the swarm."""


class RemoteBlocks:
    """Forward and backward passes through blocks [0, num_blocks) on the swarm, hop by hop, with failover."""

    def __init__(self, routes: RouteManager, pool: ChannelPool, config: ClientConfig) -> None:
        self.routes = routes
        self.pool = pool
        self.config = config
        self.failovers = 0
        self._route: list[Hop] = []  # kept between passes; a failed hop's place taken by its replacement
        # gradients are as exact as the weights: lossless unless a compression is asked for by name
        self.compression = parse_compression("none" if config.compression == "auto" else config.compression)

    # --- one RPC ---------------------------------------------------------------------------------

    def _call(self, hop: Hop, method: str, request: Any) -> Any:
        try:
            return getattr(self.pool.stub(hop.address, hop.peer_id), method)(
                request, timeout=self.config.forward_timeout)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT:
                raise TrainingError(f"node {hop.address} refused the {method} request: {e.details()}") from None
            raise HopFailed(hop.peer_id, hop.address, f"{method} failed: {e.code().name}: {e.details()}",
                            e.code()) from None

    def _decode(self, hop: Hop, message: node_pb2.Tensor, like: torch.Tensor) -> torch.Tensor:
        try:
            tensor = deserialize_tensor(message)
        except CodecError as e:
            raise HopFailed(hop.peer_id, hop.address, f"malformed tensor: {e}") from None
        if tensor.shape != like.shape:
            raise HopFailed(hop.peer_id, hop.address, f"answered shape {list(tensor.shape)}, "
                            f"{list(like.shape)} expected")
        return tensor.to(like.dtype)

    def forward_hop(self, hop: Hop, hidden: torch.Tensor, prompts: torch.Tensor | None) -> torch.Tensor:
        request = node_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                                          start_block=hop.start, end_block=hop.end,
                                          response_compression=self.compression)
        if prompts is not None:
            request.prompts.CopyFrom(serialize_tensor(prompts[hop.start : hop.end].contiguous()))
        return self._decode(hop, self._call(hop, "Forward", request).hidden, hidden)

    def backward_hop(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor,
                     prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        request = node_pb2.BackwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                                           grad_output=serialize_tensor(grad.to(hidden.dtype).contiguous()),
                                           start_block=hop.start, end_block=hop.end,
                                           response_compression=self.compression)
        hop_prompts = None
        if prompts is not None:
            hop_prompts = prompts[hop.start : hop.end].contiguous()
            request.prompts.CopyFrom(serialize_tensor(hop_prompts))
        response = self._call(hop, "Backward", request)
        grad_hidden = self._decode(hop, response.grad_hidden, hidden)
        if hop_prompts is None:
            return grad_hidden, None
        if not response.HasField("grad_prompts"):
            raise HopFailed(hop.peer_id, hop.address, "answered no gradients for the deep prompts")
        return grad_hidden, self._decode(hop, response.grad_prompts, hop_prompts)

    # --- failover --------------------------------------------------------------------------------

    def _failed(self, e: HopFailed) -> None:
        self.failovers += 1
        logger.warning("%s; routing around it", e)
        self.routes.ban(e.peer_id)
        if self.failovers > self.config.max_failovers:
            raise TrainingError(f"gave up after {self.failovers} node failures; last: {e}") from e

    def _plan(self, start: int, end: int) -> list[Hop]:
        return self.routes.plan(start, end, exact=True)

    # --- passes ----------------------------------------------------------------------------------

    def forward(self, hidden: torch.Tensor, prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, Trace]:
        """The output of the last block for ``hidden`` [B, T, H] (deep ``prompts`` [num_blocks, prefix, H]),
        and the trace that :meth:`backward` needs."""
        if not self._route:
            self._route = self._plan(0, self.routes.num_blocks)
        trace: Trace = []
        i = 0
        while i < len(self._route):
            hop = self._route[i]
            try:
                output = self.forward_hop(hop, hidden, prompts)
            except HopFailed as e:
                self._failed(e)
                self._route[i : i + 1] = self._plan(hop.start, hop.end)
                continue
            trace.append((hop, hidden))
            hidden = output
            i += 1
        return hidden, trace

    def backward(self, trace: Trace, grad: torch.Tensor,
                 prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(d loss / d hidden, d loss / d prompts) for ``grad`` = d loss / d output of the pass ``trace``."""
        grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
        for hop, hidden in reversed(trace):
            grad, hop_grad = self._backward_span(hop, hidden, grad, prompts)
            if grad_prompts is not None and hop_grad is not None:
                grad_prompts[hop.start : hop.end] += hop_grad
        return grad, grad_prompts

    def _backward_span(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor,
                       prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Backward through the blocks of ``hop``: on its server, else on a replacement chain."""
        chain = [hop]
        while True:
            try:
                if len(chain) == 1:
                    return self.backward_hop(chain[0], hidden, grad, prompts)
                return self._backward_chain(chain, self._chain_inputs(chain, hidden, prompts), grad, prompts)
            except HopFailed as e:
                self._failed(e)
                chain = self._plan(hop.start, hop.end)
                self._adopt(chain)

    def _adopt(self, chain: list[Hop]) -> None:
        """Put ``chain`` in the kept route in place of the hops covering its blocks, so later passes use it
        rather than the banned server (a kept hop straddling its ends: the next pass plans anew)."""
        start, end = chain[0].start, chain[-1].end
        before = [h for h in self._route if h.end <= start]
        after = [h for h in self._route if h.start >= end]
        inside = [h for h in self._route if start <= h.start and h.end <= end]
        if len(before) + len(inside) + len(after) != len(self._route):
            self._route = []
            return
        self._route = before + chain + after

    def _chain_inputs(self, chain: list[Hop], hidden: torch.Tensor, prompts: torch.Tensor | None) -> list[torch.Tensor]:
        """Each hop's input, by a forward pass through all hops but the last."""
        inputs = [hidden]
        for hop in chain[:-1]:
            inputs.append(self.forward_hop(hop, inputs[-1], prompts))
        return inputs

    def _backward_chain(self, chain: list[Hop], inputs: list[torch.Tensor], grad: torch.Tensor,
                        prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        grad_prompts = torch.zeros_like(prompts) if prompts is not None else None
        for hop, hidden in zip(reversed(chain), reversed(inputs), strict=True):
            grad, hop_grad = self.backward_hop(hop, hidden, grad, prompts)
            if grad_prompts is not None and hop_grad is not None:
                grad_prompts[hop.start : hop.end] += hop_grad
        return grad, None if grad_prompts is None else grad_prompts[chain[0].start : chain[-1].end]


class RemoteBlocksFunction(torch.autograd.Function):
    """``apply(hidden, prompts, blocks)``: the output of every block, differentiable in ``hidden`` and in the
    deep ``prompts`` (None: no prompts) through the swarm (``blocks``: a :class:`RemoteBlocks`)."""

    @staticmethod
    def forward(ctx: Any, hidden: torch.Tensor, prompts: torch.Tensor | None,  # noqa: ANN401
                blocks: RemoteBlocks) -> torch.Tensor:
        prompts = prompts.detach() if prompts is not None else None
        output, trace = blocks.forward(hidden.detach(), prompts)
        ctx.blocks, ctx.trace, ctx.prompts = blocks, trace, prompts
        return output

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None, None]:  # noqa: ANN401
        grad_hidden, grad_prompts = ctx.blocks.backward(ctx.trace, grad.contiguous(), ctx.prompts)
        return grad_hidden, grad_prompts, None
