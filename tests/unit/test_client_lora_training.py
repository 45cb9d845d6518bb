"""The client's LoRA training path (client.lora_training.AdapterBlocks) over fake nodes, no sockets.

Fake nodes compute Forward and Backward on a span loaded here (model.lora_training, as a node does) and
fail when told to. Held: the matrices' gradients after a backward pass equal local autograd's, also when
a replacement chain fails after one of its hops has answered (that hop's gradients must count once), and
every request names the model's served adapter.
"""

from __future__ import annotations

import grpc
import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.lora_training import AdapterBlocks, ClientLora
from homeswarm.model import ModelConfig, load_span
from homeswarm.model.lora_training import ClientMatrices, lora_backward, lora_forward
from homeswarm.protocol import deserialize_tensor, node_pb2, serialize_tensor
from homeswarm.routing.planner import Hop
from homeswarm.routing.records import PeerId, ServerRecord, ServerState
from tests.helpers.checkpoints import make_checkpoint

pytestmark = pytest.mark.timeout(120)


class Unavailable(grpc.RpcError):
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.UNAVAILABLE

    def details(self) -> str:
        return "gone"


class FakeNode:
    """Forward and Backward of blocks [start, end) of ``span``; ``fail_backward``: Backward calls left to fail."""

    def __init__(self, span, seen: list, fail_backward: int = 0) -> None:
        self.span, self.seen, self.fail_backward = span, seen, fail_backward

    def _matrices(self, request) -> tuple:
        sub = self.span.subspan(request.start_block, request.end_block)
        matrices = [ClientMatrices(e.block, e.module, deserialize_tensor(e.a), deserialize_tensor(e.b), e.scale)
                    for e in request.lora]
        return sub, matrices

    def Forward(self, request, timeout=None):  # noqa: N802, ANN001, ANN201
        self.seen.append(request.adapter)
        sub, matrices = self._matrices(request)
        with torch.no_grad():
            out = lora_forward(sub, deserialize_tensor(request.hidden), matrices)
        return node_pb2.ForwardResponse(hidden=serialize_tensor(out))

    def Backward(self, request, timeout=None):  # noqa: N802, ANN001, ANN201
        self.seen.append(request.adapter)
        if self.fail_backward > 0:
            self.fail_backward -= 1
            raise Unavailable()
        sub, matrices = self._matrices(request)
        grad_hidden, _, grads = lora_backward(sub, deserialize_tensor(request.hidden),
                                              deserialize_tensor(request.grad_output), matrices)
        response = node_pb2.BackwardResponse(grad_hidden=serialize_tensor(grad_hidden))
        for a, b in grads:
            response.grad_lora.add(a=serialize_tensor(a), b=serialize_tensor(b))
        return response


class FakePool:
    def __init__(self, nodes: dict[str, FakeNode]) -> None:
        self.nodes = nodes

    def stub(self, address: str, peer_id: str = "") -> FakeNode:
        return self.nodes[peer_id]


class FakeRoutes:
    """Plans from a script: (start, end) -> the plans to hand out, in turn."""

    num_blocks = 4

    def __init__(self, plans: dict[tuple[int, int], list[list[tuple[str, int, int]]]]) -> None:
        self.plans = plans
        self.banned: list[str] = []

    def plan(self, start: int, end: int, *, exact: bool | None = None, adapter: str | None = None) -> list[Hop]:
        return [Hop(record(peer), a, b) for peer, a, b in self.plans[start, end].pop(0)]

    def ban(self, peer_id: str) -> None:
        self.banned.append(peer_id)


def record(peer: str) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address=f"{peer}:1", model="m", start=0, end=4,
                        state=ServerState.ONLINE, protocol_version=1, dtype="float32", throughput=1.0,
                        cache_tokens_left=1000)


def test_a_retried_chain_counts_each_hops_gradients_once(tmp_path):
    torch.set_num_threads(1)
    checkpoint = make_checkpoint(tmp_path / "llama", "llama3", num_layers=4)
    config = ModelConfig.from_dir(checkpoint)
    span = load_span(checkpoint, 0, 4)
    torch.manual_seed(0)
    lora = ClientLora(config, r=2, lora_alpha=4.0, target_modules=("q_proj", "down_proj"))
    with torch.no_grad():
        for b in lora.lora_B:
            b.normal_(std=0.05)
    seen: list[str] = []
    # c serves all four blocks and dies at the backward pass; its replacement chain a + b fails at a once
    # (after b answered), then runs as a2 + b
    nodes = {"c": FakeNode(span, seen, fail_backward=9), "a": FakeNode(span, seen, fail_backward=1),
             "a2": FakeNode(span, seen), "b": FakeNode(span, seen)}
    routes = FakeRoutes({(0, 4): [[("c", 0, 4)], [("a", 0, 2), ("b", 2, 4)], [("a2", 0, 2), ("b", 2, 4)]]})
    blocks = AdapterBlocks(routes, FakePool(nodes), ClientConfig(adapter="style"), lora)  # type: ignore[arg-type]
    hidden = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(1))
    grad = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(2))
    output, trace = blocks.forward(hidden)
    grad_hidden, _ = blocks.backward(trace, grad)
    assert routes.banned == ["c", "a"]
    assert set(seen) == {"style"}  # every request named the served adapter
    matrices = [ClientMatrices(block, path, a.detach(), b.detach(), lora.scale)
                for (block, path), a, b in zip(lora.targets, lora.lora_A, lora.lora_B, strict=True)]
    with torch.no_grad():
        assert torch.allclose(output, lora_forward(span, hidden, matrices), rtol=1e-5, atol=1e-5)
    want_hidden, _, want = lora_backward(span, hidden, grad, matrices)
    assert torch.allclose(grad_hidden, want_hidden, rtol=1e-5, atol=1e-6)
    for a, b, (want_a, want_b) in zip(lora.lora_A, lora.lora_B, want, strict=True):
        assert torch.allclose(a.grad, want_a, rtol=1e-5, atol=1e-7)
        assert torch.allclose(b.grad, want_b, rtol=1e-5, atol=1e-7)
