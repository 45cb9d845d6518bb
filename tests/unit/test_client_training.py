"""The client's remote autograd (client/remote_blocks.py) over fake nodes: passes, failover, errors.

In each fake node, every block adds its prompt to the first positions and doubles the result, so the gradients are known
in closed form; a dead node answers UNAVAILABLE. A node failing on forward or on backward is banned and
its blocks re-planned (a replacement chain of two hops recomputes its inner inputs); the gradients stay
those of the uninterrupted pass. INVALID_ARGUMENT raises at once; too many failures give up. The model call
checks its inputs before any request, and takes one sequence as 1-D ids and labels.
"""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.remote_blocks import RemoteBlocks, RemoteBlocksFunction, TrainingError
from homeswarm.protocol import deserialize_tensor, node_pb2, serialize_tensor
from homeswarm.routing.planner import Hop


class _Error(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode) -> None:
        self._code = code

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return f"fake {self._code.name}"


class FakeNode:
    def __init__(self, fail: grpc.StatusCode | None = None) -> None:
        self.fail = fail
        self.calls: list[str] = []

    def _check(self, method: str) -> None:
        self.calls.append(method)
        if self.fail is not None:
            raise _Error(self.fail)

    def Forward(self, request, timeout):  # noqa: N802, ANN001, ANN201 - the stub's name
        self._check("Forward")
        x = deserialize_tensor(request.hidden)
        for i in range(request.end_block - request.start_block):
            if request.HasField("prompts"):
                p = deserialize_tensor(request.prompts)[i]
                x = torch.cat([x[:, : p.shape[0]] + p, x[:, p.shape[0]:]], dim=1)
            x = 2 * x
        return node_pb2.ForwardResponse(hidden=serialize_tensor(x))

    def Backward(self, request, timeout):  # noqa: N802, ANN001, ANN201
        self._check("Backward")
        blocks = request.end_block - request.start_block
        g = deserialize_tensor(request.grad_output)
        response = node_pb2.BackwardResponse(grad_hidden=serialize_tensor(g * 2**blocks))
        if request.HasField("prompts"):
            prefix = deserialize_tensor(request.prompts).shape[1]
            rows = [(g * 2 ** (blocks - i))[:, :prefix].sum(0) for i in range(blocks)]
            response.grad_prompts.CopyFrom(serialize_tensor(torch.stack(rows)))
        return response


class FakeSwarm:
    """Pool and route manager at once: ``plans`` maps a block range to the chains to hand out in turn."""

    def __init__(self, nodes: dict[str, FakeNode], plans: dict[tuple[int, int], list[list[tuple[str, int, int]]]]):
        self.nodes, self.plans, self.banned = nodes, plans, []
        self.num_blocks = 4

    def stub(self, address: str, peer_id: str = "") -> FakeNode:
        return self.nodes[address]

    def plan(self, start: int, end: int, *, exact: bool = False, **_: object) -> list[Hop]:
        assert exact, "training routes use unquantized nodes only"
        chain = self.plans[start, end].pop(0)
        return [Hop(SimpleNamespace(peer_id=name, address=name), a, b) for name, a, b in chain]

    def ban(self, peer_id: str) -> None:
        self.banned.append(peer_id)


def run(swarm: FakeSwarm, config: ClientConfig | None = None) -> tuple[torch.Tensor, ...]:
    blocks = RemoteBlocks(swarm, swarm, config or ClientConfig(max_failovers=3))
    hidden = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(0), requires_grad=True)
    prompts = torch.randn(4, 2, 3, generator=torch.Generator().manual_seed(1), requires_grad=True)
    out = RemoteBlocksFunction.apply(hidden, prompts, blocks)
    out.sum().backward()
    return out.detach(), hidden.grad, prompts.grad


def healthy() -> FakeSwarm:
    return FakeSwarm({"a": FakeNode(), "b": FakeNode()}, {(0, 4): [[("a", 0, 2), ("b", 2, 4)]]})


def test_gradients_through_a_chain():
    out, grad_hidden, grad_prompts = run(healthy())
    assert torch.equal(grad_hidden, torch.full((2, 5, 3), 16.0))
    # prompt i is added before block i: 2 ** (4 - i) per sequence, two sequences
    expected = torch.stack([torch.full((2, 3), 2.0 * 2 ** (4 - i)) for i in range(4)])
    assert torch.equal(grad_prompts, expected)


@pytest.mark.parametrize("dies_on", ["Forward", "Backward"])
def test_a_failed_hop_is_replaced_and_the_gradients_are_unchanged(dies_on):
    expected = run(healthy())
    dying = FakeNode()
    nodes = {"a": FakeNode(), "b": dying, "c": FakeNode(), "d": FakeNode()}
    swarm = FakeSwarm(nodes, {(0, 4): [[("a", 0, 2), ("b", 2, 4)]], (2, 4): [[("c", 2, 3), ("d", 3, 4)]]})
    original = dying.Forward if dies_on == "Backward" else None

    def forward_then_die(request, timeout):  # noqa: ANN001, ANN202
        result = original(request, timeout)
        dying.fail = grpc.StatusCode.UNAVAILABLE  # gone between the two passes
        return result

    if dies_on == "Forward":
        dying.fail = grpc.StatusCode.UNAVAILABLE
    else:
        dying.Forward = forward_then_die
    got = run(swarm)
    assert swarm.banned == ["b"]
    for g, e in zip(got, expected, strict=True):
        assert torch.equal(g, e)
    # the replacement chain: after a failed backward, a forward through c for d's input, then both backwards
    assert nodes["c"].calls == ["Forward", "Backward"]
    assert nodes["d"].calls == (["Backward"] if dies_on == "Backward" else ["Forward", "Backward"])


def test_a_replacement_found_on_backward_serves_the_next_steps():
    dying = FakeNode()
    nodes = {"a": FakeNode(), "b": dying, "c": FakeNode(), "d": FakeNode()}
    swarm = FakeSwarm(nodes, {(0, 4): [[("a", 0, 2), ("b", 2, 4)]], (2, 4): [[("c", 2, 3), ("d", 3, 4)]]})
    blocks = RemoteBlocks(swarm, swarm, ClientConfig(max_failovers=3))
    hidden = torch.randn(1, 3, 3, requires_grad=True)
    RemoteBlocksFunction.apply(hidden, None, blocks).sum().backward()  # b healthy on forward and backward
    original = dying.Forward

    def forward_then_die(request, timeout):  # noqa: ANN001, ANN202
        result = original(request, timeout)
        dying.fail = grpc.StatusCode.UNAVAILABLE
        return result

    dying.Forward = forward_then_die
    RemoteBlocksFunction.apply(hidden, None, blocks).sum().backward()  # b dies between the passes
    assert blocks.failovers == 1
    dying.calls.clear()
    for _ in range(2):  # later steps go through the replacement: no second failover, no call to b
        RemoteBlocksFunction.apply(hidden, None, blocks).sum().backward()
    assert blocks.failovers == 1 and dying.calls == [] and swarm.banned == ["b"]
    assert [(h.peer_id, h.start, h.end) for h in blocks._route] == [("a", 0, 2), ("c", 2, 3), ("d", 3, 4)]


def test_invalid_argument_raises_at_once():
    swarm = FakeSwarm({"a": FakeNode(grpc.StatusCode.INVALID_ARGUMENT), "b": FakeNode()},
                      {(0, 4): [[("a", 0, 2), ("b", 2, 4)]]})
    with pytest.raises(TrainingError, match="refused the Forward request"):
        run(swarm)
    assert swarm.banned == []


def test_too_many_failures_give_up():
    dead = {name: FakeNode(grpc.StatusCode.UNAVAILABLE) for name in "xyz"}
    swarm = FakeSwarm({"a": FakeNode(), **dead},
                      {(0, 4): [[("a", 0, 2), ("x", 2, 4)]], (2, 4): [[("y", 2, 4)], [("z", 2, 4)]]})
    with pytest.raises(TrainingError, match="gave up after 3 node failures"):
        run(swarm, ClientConfig(max_failovers=2))


def test_model_call_checks_and_one_dimensional_ids(tmp_path):
    from homeswarm.client.training import causal_lm_forward, causal_lm_loss
    from homeswarm.model import load_head
    from tests.helpers.checkpoints import make_checkpoint

    head = load_head(make_checkpoint(tmp_path / "llama3", "llama3", num_layers=4, seed=6))
    swarm = healthy()
    blocks = RemoteBlocks(swarm, swarm, ClientConfig())
    with pytest.raises(ValueError, match="exactly one of input_ids and inputs_embeds"):
        causal_lm_forward(head, blocks, None)
    with pytest.raises(ValueError, match="padded batches"):
        causal_lm_forward(head, blocks, None, input_ids=torch.ones(1, 3, dtype=torch.long),
                          attention_mask=torch.tensor([[1, 1, 0]]))
    with pytest.raises(ValueError, match="inputs_embeds must be"):
        causal_lm_forward(head, blocks, None, inputs_embeds=torch.zeros(1, 3, 5))
    ids = torch.tensor([3, 1, 4, 1, 5])
    out = causal_lm_forward(head, blocks, None, input_ids=ids, labels=ids)
    assert out.logits.shape == (1, 5, 256)
    assert torch.equal(out.loss, causal_lm_loss(out.logits, ids[None]))
