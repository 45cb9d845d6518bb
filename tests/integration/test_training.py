"""Training through real daemons on 127.0.0.1: backward passes, prompt tuning, failover mid-training.

Against transformers on the same tiny random float32 checkpoint, for a dense (Llama 3) and a MoE
(Qwen3-MoE) family: the loss and logits of ``model(inputs_embeds=..., labels=...)`` and the gradients
with respect to ``inputs_embeds`` equal transformers' (its own ``labels=`` loss); with deep prompt tuning,
the gradients of the prompts, the deep prompts and the inputs equal local autograd through transformers
with the same prompts (hooks add each block's prompt). The MoE router's choice is discontinuous, but at a
given input the gradient goes through the chosen experts, the same on both sides.

30 Adam steps of prompt tuning lower the loss, and killing the node that serves a span mid-training (a
second server of it present) gives exactly the parameters of an uninterrupted run. A node serving int8
weights refuses Backward (FAILED_PRECONDITION); malformed Backward requests get INVALID_ARGUMENT. Greedy
generation with a ptune prompt gives transformers' tokens with the prompt before the sequence.

One bootstrap peer for the module; for Llama a chain of two nodes, a spare of the second span and an int8
node under another model name; one node serving every block of Qwen3-MoE.
"""

from __future__ import annotations

import grpc
import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from homeswarm.client.local_swarm import LocalSwarm, split_blocks
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc, serialize_tensor
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.moe_checkpoints import make_moe_checkpoint
from tests.helpers.reference import reference_in, rel_err

pytestmark = pytest.mark.timeout(300)

NUM_LAYERS = 4
CHAIN = split_blocks(NUM_LAYERS, 2)
FAMILIES = ("llama3", "qwen3_moe")
GRAD_TOL = 1e-5  # relative (Frobenius norm), float32 on both sides
PREFIX = 3
ROUTES = {"llama3": CHAIN, "qwen3_moe": [(0, NUM_LAYERS)]}


@pytest.fixture(scope="module")
def swarm(tmp_path_factory):
    root = tmp_path_factory.mktemp("training")
    paths = {"llama3": make_checkpoint(root / "llama3", "llama3", num_layers=NUM_LAYERS, seed=31),
             "qwen3_moe": make_moe_checkpoint(root / "qwen3_moe", "qwen3_moe", seed=32)}
    with LocalSwarm(root / "swarm") as swarm:
        swarm.start_bootstrap()

        def node(path, a, b, *args):
            return swarm.start_node(path, "--blocks", f"{a}:{b}", "--compute-threads", "1", *args, wait=False)

        daemons = {f"llama3:{a}": node(paths["llama3"], a, b) for a, b in CHAIN}
        daemons["spare"] = node(paths["llama3"], *CHAIN[1])
        daemons["qwen3_moe"] = node(paths["qwen3_moe"], 0, NUM_LAYERS)
        daemons["int8"] = node(paths["llama3"], *CHAIN[0], "--quant", "int8", "--model-name", "llama3-int8")
        for daemon in daemons.values():
            swarm.wait_ready(daemon, timeout=180)
        swarm.paths, swarm.daemons = paths, daemons
        yield swarm


def client(swarm, family: str, **kwargs) -> AutoDistributedModelForCausalLM:
    return AutoDistributedModelForCausalLM.from_pretrained(swarm.paths[family], initial_peers=swarm.initial_peers,
                                                           **kwargs)


def random_batch(seed: int, batch: int = 2, length: int = 20, hidden: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, length, hidden, generator=gen), torch.randint(0, 256, (batch, length), generator=gen)


def frozen_reference(path):
    reference = reference_in(path, torch.float32)
    reference.requires_grad_(False)
    return reference


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_logits_and_input_gradients_match_transformers(swarm, family):
    embeds, labels = random_batch(seed=1)
    labels[0, :4] = -100  # ignored positions count as transformers counts them
    reference = frozen_reference(swarm.paths[family])
    theirs_in = embeds.clone().requires_grad_(True)
    theirs = reference(inputs_embeds=theirs_in, labels=labels)
    theirs.loss.backward()
    with client(swarm, family) as model:
        ours_in = embeds.clone().requires_grad_(True)
        ours = model(inputs_embeds=ours_in, labels=labels)
        ours.loss.backward()
        assert [(h.start, h.end) for h in model.remote_blocks._route] == ROUTES[family]
    assert rel_err(ours.logits, theirs.logits) < GRAD_TOL
    assert abs(ours.loss.item() - theirs.loss.item()) < GRAD_TOL * theirs.loss.item()
    assert ours_in.grad is not None and float(ours_in.grad.norm()) > 0
    assert rel_err(ours_in.grad, theirs_in.grad) < GRAD_TOL


def reference_with_prompts(reference, prompts: torch.Tensor, deep: torch.Tensor, embeds: torch.Tensor,
                           labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of transformers with the prompts prepended and deep[i] added to the first positions
    before block i (forward pre-hooks), logits of the sequence's own positions."""
    def hook(i):
        def add(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            hidden = torch.cat([hidden[:, :PREFIX] + deep[i], hidden[:, PREFIX:]], dim=1)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return add

    handles = [layer.register_forward_pre_hook(hook(i), with_kwargs=True)
               for i, layer in enumerate(reference.model.layers)]
    try:
        inputs = torch.cat([prompts[None].expand(embeds.shape[0], -1, -1), embeds], dim=1)
        logits = reference(inputs_embeds=inputs).logits[:, PREFIX:].contiguous()
    finally:
        for handle in handles:
            handle.remove()
    return ForCausalLMLoss(logits, labels, logits.shape[-1]), logits


@pytest.mark.parametrize("family", FAMILIES)
def test_deep_prompt_gradients_match_local_autograd(swarm, family):
    embeds, labels = random_batch(seed=2)
    with client(swarm, family, tuning_mode="deep_ptune", pre_seq_len=PREFIX) as model:
        tuning = model.tuning
        with torch.no_grad():  # away from their zero start, so that every block's prompt matters
            tuning.deep_prompts.copy_(0.5 * torch.randn(tuning.deep_prompts.shape,
                                                        generator=torch.Generator().manual_seed(3)))
        prompts = tuning.prompts.detach().clone().requires_grad_(True)
        deep = tuning.deep_prompts.detach().clone().requires_grad_(True)
        theirs_in = embeds.clone().requires_grad_(True)
        loss, logits = reference_with_prompts(frozen_reference(swarm.paths[family]), prompts, deep, theirs_in,
                                              labels)
        loss.backward()
        ours_in = embeds.clone().requires_grad_(True)
        ours = model(inputs_embeds=ours_in, labels=labels)
        ours.loss.backward()
    assert rel_err(ours.logits, logits) < GRAD_TOL
    assert abs(ours.loss.item() - loss.item()) < GRAD_TOL * loss.item()
    for got, expected in [(ours_in.grad, theirs_in.grad), (tuning.prompts.grad, prompts.grad),
                          (tuning.deep_prompts.grad, deep.grad)]:
        assert got is not None and float(expected.norm()) > 0
        assert rel_err(got, expected) < GRAD_TOL
    assert all(float(g.norm()) > 0 for g in tuning.deep_prompts.grad)  # every block's prompt got its gradient


@torch.no_grad()
def test_generation_with_a_tuned_prompt_is_transformers_greedy_after_it(swarm):
    """ptune: the prompt goes before the sequence in generation too; deep prompts are refused there."""
    ids = torch.randint(0, 256, (2, 7), generator=torch.Generator().manual_seed(5))
    reference = frozen_reference(swarm.paths["llama3"])
    with client(swarm, "llama3", tuning_mode="ptune", pre_seq_len=PREFIX) as model:
        got = model.generate(ids, max_new_tokens=6)
        prompts = model.tuning.prompts.detach()
    expected = ids
    for _ in range(6):
        embeds = torch.cat([prompts[None].expand(2, -1, -1), reference.get_input_embeddings()(expected)], dim=1)
        expected = torch.cat([expected, reference(inputs_embeds=embeds).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got.tolist() == expected.tolist()
    with client(swarm, "llama3", tuning_mode="deep_ptune", pre_seq_len=PREFIX) as model:
        with pytest.raises(NotImplementedError, match="deep prompts"):
            model.generate(ids, max_new_tokens=2)


def train(swarm, steps: int, kill_at: int | None = None) -> tuple[list[float], list[torch.Tensor], list[str]]:
    """Deep prompt tuning of Llama on one fixed batch: the losses, the final parameters, and the peer ids
    the second span ran on (``kill_at``: before that step, kill the node serving it)."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(4))
    losses, used = [], []
    with client(swarm, "llama3", tuning_mode="deep_ptune", pre_seq_len=PREFIX) as model:
        optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
        for step in range(steps):
            if step == kill_at:
                peer = model.remote_blocks._route[-1].peer_id
                victim = next(d for d in swarm.daemons.values() if d.info["peer_id"] == peer)
                LocalSwarm.kill(victim)
            optimizer.zero_grad()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            used.append(model.remote_blocks._route[-1].peer_id)
        failovers = model.remote_blocks.failovers
        params = [p.detach().clone() for p in model.tuning.parameters()]
    assert failovers == (0 if kill_at is None else 1)
    return losses, params, used


def test_prompt_tuning_lowers_the_loss_and_a_killed_node_changes_nothing(swarm):
    losses, params, used = train(swarm, 30)
    assert losses[-1] < 0.8 * losses[0], losses
    killed_losses, killed_params, killed_used = train(swarm, 30, kill_at=15)
    assert killed_used[14] != killed_used[15]  # the second span moved to the other server
    assert killed_losses == losses
    for got, expected in zip(killed_params, params, strict=True):
        assert torch.equal(got, expected)


def backward_request(start: int = 0, end: int = 2, **changes) -> node_pb2.BackwardRequest:
    hidden = torch.randn(1, 5, 64)
    fields = dict(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                  grad_output=serialize_tensor(torch.randn(1, 5, 64)), start_block=start, end_block=end)
    fields.update(changes)
    return node_pb2.BackwardRequest(**fields)


def test_a_quantized_node_refuses_backward(swarm):
    with LocalSwarm.channel(swarm.daemons["int8"]) as channel, pytest.raises(grpc.RpcError) as caught:
        node_pb2_grpc.NodeStub(channel).Backward(backward_request(*CHAIN[0]), timeout=30)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "int8" in caught.value.details() and "unquantized" in caught.value.details()


FLOAT64 = node_pb2.Tensor(buffer=bytes(5 * 64 * 8), shape=[1, 5, 64], dtype="float64")


@pytest.mark.parametrize("changes, message", [
    ({"grad_output": serialize_tensor(torch.randn(1, 4, 64))}, "output gradients must have"),
    ({"grad_output": serialize_tensor(torch.randn(1, 5, 64, dtype=torch.float16))}, "output gradients must have"),
    ({"hidden": FLOAT64, "grad_output": FLOAT64}, "hidden states must be float32"),
    ({"start_block": 1, "end_block": 3}, "not within this node's span"),
    ({"start_block": 2, "end_block": 2}, "not within this node's span"),
    ({"prompts": serialize_tensor(torch.randn(2, 6, 64))}, "deep prompts must be"),
    ({"prompts": serialize_tensor(torch.randn(3, 2, 64))}, "deep prompts must be"),
    ({"grad_output": serialize_tensor(torch.full((1, 5, 64), float("nan")))}, "NaN"),
])
def test_bad_backward_requests_are_invalid_arguments(swarm, changes, message):
    with LocalSwarm.channel(swarm.daemons["llama3:0"]) as channel, pytest.raises(grpc.RpcError) as caught:
        node_pb2_grpc.NodeStub(channel).Backward(backward_request(**changes), timeout=30)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details()


def test_malformed_and_old_backward_requests_and_bad_forward_prompts(swarm):
    with LocalSwarm.channel(swarm.daemons["llama3:0"]) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            channel.unary_unary("/homeswarm.v1.Node/Backward")(b"\x00", timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "malformed BackwardRequest" in caught.value.details()
        stub = node_pb2_grpc.NodeStub(channel)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Backward(backward_request(protocol_version=PROTOCOL_VERSION + 100), timeout=30)
        assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        forward = node_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(torch.randn(1, 5, 64)),
                                          start_block=0, end_block=2, prompts=serialize_tensor(torch.randn(1, 2, 64)))
        with pytest.raises(grpc.RpcError) as caught:
            stub.Forward(forward, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "deep prompts must be [2, prefix <= 5, 64]" in caught.value.details()
