"""LoRA adapters served by real node daemons on 127.0.0.1, against transformers + PEFT in float32.

One swarm for the module, over a tiny random Llama 3 checkpoint and a random adapter made with peft
(q_proj, v_proj and the MLP's down_proj; B nonzero so it matters): two nodes serve blocks 0-1 and 2-3
with `--adapters DIR`, a third serves all four blocks without it (faster on paper: one hop). A session
with `adapter=` routes through the first two only, and its greedy tokens and every step's hidden states
(leaving the last block, before the final norm) equal transformers + PEFT's within FLOAT32_TOL relative;
without it, the base model's. A node without the adapter answers NOT_FOUND naming it; a swarm that does
not serve an adapter fails with an error naming it; `homeswarm generate --adapter` gives PEFT's tokens;
a bad adapter folder stops `join-swarm` at start with one line and exit code 2.

Training: through the served adapter, the loss, logits and input gradients equal PEFT's; a client's own
LoRA matrices (model.add_lora) get PEFT's gradients, an SGD step lowers the loss, saved in PEFT's format
they give PEFT's logits, and generation with them (sessions send them when they open) PEFT's tokens and
hidden states; bad matrices get INVALID_ARGUMENT. The last test kills the node that ran
the forward pass's last hop before the backward pass: the gradients are those of an uninterrupted pass.
A fourth node serves a tiny Qwen3-MoE with an adapter on attention: a session with it, and a client's own
LoRA's gradients, equal PEFT's too.
"""

from __future__ import annotations

import json
import os
import subprocess

import grpc
import pytest
import torch

from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.protocol import PROTOCOL_VERSION, deserialize_tensor, node_pb2, node_pb2_grpc, serialize_tensor
from homeswarm.routing.adapter_routes import AdapterNotServedError
from tests.helpers.checkpoints import make_checkpoint, reference_greedy, reference_model
from tests.helpers.lora_adapters import edit_config, make_lora_adapter, peft_reference
from tests.helpers.moe_checkpoints import make_moe_checkpoint
from tests.helpers.reference import FLOAT32_TOL, check_against, greedy_steps, last_hidden_states, rel_err

pytestmark = pytest.mark.timeout(300)

ADAPTER = "style"
NEW_TOKENS = 8
PROMPT = torch.tensor([[5, 17, 200, 3, 99, 42, 7, 128, 64, 31]])


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    checkpoint = make_checkpoint(root / "tiny-lora", "llama3", num_layers=4)
    adapter = make_lora_adapter(checkpoint, root / ADAPTER, target_modules=("q_proj", "v_proj", "down_proj"))
    return checkpoint, adapter


@pytest.fixture(scope="module")
def moe_files(tmp_path_factory):
    """A tiny Qwen3-MoE checkpoint (layer 1 dense) and an adapter on its attention."""
    root = tmp_path_factory.mktemp("lora-moe")
    checkpoint = make_moe_checkpoint(root / "tiny-moe", "qwen3_moe", num_layers=2)
    return checkpoint, make_lora_adapter(checkpoint, root / "moe-attn", target_modules=("q_proj", "v_proj"))


@pytest.fixture(scope="module")
def references(files):
    """(transformers + PEFT, transformers alone), float32, one torch thread."""
    torch.set_num_threads(1)
    checkpoint, adapter = files
    return peft_reference(checkpoint, adapter).base_model.model, reference_model(checkpoint)


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, files, moe_files):
    checkpoint, adapter = files
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        daemons = [swarm.start_node(checkpoint, "--blocks", blocks, *extra, "--compute-threads", "1", wait=False)
                   for blocks, extra in (("0:2", ("--adapters", str(adapter))), ("2:4", ("--adapters", str(adapter))),
                                         ("0:4", ()))]
        daemons.append(swarm.start_node(moe_files[0], "--adapters", str(moe_files[1]), "--compute-threads", "1",
                                        wait=False))
        for daemon in daemons:
            swarm.wait_ready(daemon, timeout=180)
        yield swarm


def peers(swarm) -> dict[str, str]:
    """'a' (0-1, adapter), 'b' (2-3, adapter), 'c' (0-3, none) -> peer id (the fourth node serves the MoE)."""
    return {name: node.info["peer_id"] for name, node in zip("abc", swarm.nodes[:3], strict=True)}


def distributed(files, swarm, **kwargs) -> AutoDistributedModelForCausalLM:
    return AutoDistributedModelForCausalLM.from_pretrained(files[0], initial_peers=swarm.initial_peers, **kwargs)


def test_an_adapter_session_routes_through_its_nodes_and_equals_peft(files, swarm, references):
    peft, base = references
    expected_ids = reference_greedy(files[0], PROMPT, NEW_TOKENS, model=peft)
    with distributed(files, swarm) as model:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS, adapter=ADAPTER) as session:
            ids, outputs = greedy_steps(model, session, PROMPT, NEW_TOKENS)
            route = [(h.peer_id, h.start, h.end) for h in session.hops]
        logits = model.head.logits(outputs[0])
    names = peers(swarm)
    assert route == [(names["a"], 0, 2), (names["b"], 2, 4)]
    assert torch.equal(ids, expected_ids)
    errors = check_against(peft, ids, outputs, FLOAT32_TOL)
    with torch.no_grad():
        expected_logits = peft(PROMPT).logits
    assert rel_err(logits, expected_logits) < FLOAT32_TOL
    print(f"\nadapter through the swarm: step errors up to {max(errors):.1e}, prompt logits "
          f"{rel_err(logits, expected_logits):.1e}")
    # the adapter changes the outputs: the base model's tokens or hidden states differ
    base_hidden, _ = last_hidden_states(base, ids[:, :-1])
    assert rel_err(torch.cat(outputs, dim=1), base_hidden) > 0.05


def test_the_model_wide_adapter_and_generate(files, swarm, references):
    peft, _ = references
    expected = reference_greedy(files[0], PROMPT, NEW_TOKENS, model=peft)
    with distributed(files, swarm, adapter=ADAPTER) as model:
        assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW_TOKENS), expected)


def test_without_an_adapter_the_output_is_the_base_models(files, swarm, references):
    _, base = references
    expected_ids = reference_greedy(files[0], PROMPT, NEW_TOKENS, model=base)
    with distributed(files, swarm) as model:
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            ids, outputs = greedy_steps(model, session, PROMPT, NEW_TOKENS)
    assert torch.equal(ids, expected_ids)
    check_against(base, ids, outputs, FLOAT32_TOL)


def test_forward_with_and_without_the_adapter_on_an_adapter_node(swarm, references):
    """Node 'a' serves the base weights to requests that name no adapter, and the adapter to those that do."""
    peft, base = references
    hidden = base.get_input_embeddings()(PROMPT).detach()
    with torch.no_grad():
        expected = {ADAPTER: peft(PROMPT, output_hidden_states=True).hidden_states[2],
                    "": base(PROMPT, output_hidden_states=True).hidden_states[2]}
    with swarm.channel(swarm.nodes[0]) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        for adapter, want in expected.items():
            request = node_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                                              start_block=0, end_block=2, adapter=adapter)
            got = deserialize_tensor(stub.Forward(request, timeout=30).hidden)
            assert rel_err(got, want) < FLOAT32_TOL, adapter


def test_a_node_without_the_adapter_answers_not_found(swarm):
    hidden = torch.zeros(1, 2, 64)
    with swarm.channel(swarm.nodes[2]) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        request = node_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                                          start_block=0, end_block=4, adapter=ADAPTER)
        with pytest.raises(grpc.RpcError) as caught:
            stub.Forward(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == f"this node does not serve LoRA adapter {ADAPTER!r} (it serves none)"
        open_session = node_pb2.InferenceRequest(protocol_version=PROTOCOL_VERSION, open=node_pb2.OpenSession(
            start_block=0, end_block=4, batch_size=1, max_length=8, adapter=ADAPTER))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Inference(iter([open_session]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
    with swarm.channel(swarm.nodes[0]) as channel:
        request = node_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                                          start_block=0, end_block=2, adapter="other")
        with pytest.raises(grpc.RpcError) as caught:
            node_pb2_grpc.NodeStub(channel).Forward(request, timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        assert caught.value.details() == f"this node does not serve LoRA adapter 'other' (adapters served here: {ADAPTER})"


def test_an_adapter_nobody_serves_is_named(files, swarm):
    with distributed(files, swarm) as model:
        with pytest.raises(AdapterNotServedError) as caught:
            model.inference_session(max_length=8, adapter="missing")
    assert str(caught.value) == (f"no server in the swarm serves LoRA adapter 'missing' for block(s) 0:4 of model "
                                 f"'tiny-lora' (adapters announced: {ADAPTER})")


def generate_cli(files, swarm, *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*console_script("homeswarm"), "generate", str(files[0]), "--initial-peers", *swarm.initial_peers,
            "--prompt-ids", ",".join(map(str, PROMPT[0].tolist())), "--max-new-tokens", str(NEW_TOKENS), "--json",
            *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "HOMESWARM_LOG_LEVEL": "WARNING"})


def test_generate_cli_with_an_adapter(files, swarm, references):
    peft, _ = references
    expected = reference_greedy(files[0], PROMPT, NEW_TOKENS, model=peft)[0, PROMPT.shape[1]:].tolist()
    result = generate_cli(files, swarm, "--adapter", ADAPTER)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["token_ids"] == expected
    # an adapter nobody serves fails as missing blocks do (exit 1, one line): the library's error, tested above


def test_join_swarm_refuses_a_bad_adapter_folder_in_one_line(files, swarm, tmp_path):
    checkpoint, adapter = files
    bad = tmp_path / "dora"
    bad.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (bad / name).write_bytes((adapter / name).read_bytes())
    edit_config(bad, use_dora=True)
    argv = [*console_script("join-swarm"), str(checkpoint), "--initial-peers", *swarm.initial_peers,
            "--blocks", "0:2", "--adapters", str(bad)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"join-swarm: error: --adapters: adapter 'dora': {bad}/adapter_config.json: DoRA (use_dora) is not supported"]


def peft_loss(model, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' (loss, logits) of ``embeds`` with labels PROMPT."""
    out = model(inputs_embeds=embeds, labels=PROMPT)
    return out.loss, out.logits


def test_training_through_a_served_adapter_equals_peft(files, swarm, references):
    peft, _ = references
    for param in peft.parameters():
        param.requires_grad_(False)
    with distributed(files, swarm, adapter=ADAPTER) as model:
        embeds = model.head.embed(PROMPT).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, labels=PROMPT)
        out.loss.backward()
        route = {hop.peer_id for hop in model.remote_blocks._route}
    assert route == {peers(swarm)["a"], peers(swarm)["b"]}  # the adapter's nodes only
    expected_embeds = embeds.detach().clone().requires_grad_(True)
    loss, logits = peft_loss(peft, expected_embeds)
    loss.backward()
    assert rel_err(out.loss.detach(), loss.detach()) < FLOAT32_TOL
    assert rel_err(out.logits.detach(), logits.detach()) < FLOAT32_TOL
    assert rel_err(embeds.grad, expected_embeds.grad) < FLOAT32_TOL


def check_client_lora(model, checkpoint, targets: tuple[str, ...], num_blocks: int):  # noqa: ANN001, ANN201
    """Give ``model`` its own LoRA matrices (B made nonzero: PEFT's init sets it to zero, which would leave A's
    gradients zero) and assert that one backward pass through the swarm gives PEFT's loss and gradients.
    Returns (the matrices, the model's output)."""
    from peft import LoraConfig, get_peft_model

    lora = model.add_lora(r=4, lora_alpha=8.0, target_modules=targets)
    with torch.no_grad():
        for b in lora.lora_B:
            b.normal_(std=0.05)
    reference = get_peft_model(reference_model(checkpoint), LoraConfig(r=4, lora_alpha=8.0,
                                                                       target_modules=list(targets)))
    params = dict(reference.named_parameters())
    pairs = []
    for (block, path), a, b in zip(lora.targets, lora.lora_A, lora.lora_B, strict=True):
        key = f"base_model.model.model.layers.{block}.{path}"
        ref_a, ref_b = params[f"{key}.lora_A.default.weight"], params[f"{key}.lora_B.default.weight"]
        with torch.no_grad():
            ref_a.copy_(a)
            ref_b.copy_(b)
        pairs.append(((a, b), (ref_a, ref_b)))
    assert len(pairs) == len(targets) * num_blocks
    out = model(input_ids=PROMPT, labels=PROMPT)
    out.loss.backward()
    loss, _ = peft_loss(reference, reference.get_input_embeddings()(PROMPT))
    loss.backward()
    assert rel_err(out.loss.detach(), loss.detach()) < FLOAT32_TOL
    for (a, b), (ref_a, ref_b) in pairs:
        assert rel_err(a.grad, ref_a.grad) < FLOAT32_TOL and rel_err(b.grad, ref_b.grad) < FLOAT32_TOL
    return lora, out


def test_a_client_owned_lora_trains_through_the_swarm_as_peft_computes(files, swarm, tmp_path):
    """The client's own LoRA matrices: sent with each request, gradients back; equal to PEFT's autograd."""
    from peft import PeftModel

    checkpoint, _ = files
    torch.manual_seed(3)
    with distributed(files, swarm) as model:
        lora, out = check_client_lora(model, checkpoint, ("q_proj", "v_proj", "down_proj"), 4)
        # a step of a standard optimizer, then the matrices saved in PEFT's format give PEFT's logits
        optimizer = torch.optim.SGD(list(lora.parameters()), lr=0.5)
        before = out.loss.item()
        optimizer.step()
        with torch.no_grad():
            after = model(input_ids=PROMPT, labels=PROMPT)
        assert after.loss.item() < before
        saved = lora.save_pretrained(tmp_path / "trained")
        loaded = PeftModel.from_pretrained(reference_model(checkpoint), str(saved)).eval().base_model.model
        with torch.no_grad():
            assert rel_err(after.logits, loaded(PROMPT).logits) < FLOAT32_TOL
        # generation: sessions send the matrices when they open
        with model.inference_session(max_length=PROMPT.shape[1] + NEW_TOKENS) as session:
            ids, outputs = greedy_steps(model, session, PROMPT, NEW_TOKENS)
        assert torch.equal(ids, reference_greedy(checkpoint, PROMPT, NEW_TOKENS, model=loaded))
        check_against(loaded, ids, outputs, FLOAT32_TOL)
        assert torch.equal(model.generate(PROMPT, max_new_tokens=NEW_TOKENS), ids)


def test_moe_family_served_adapter_and_client_lora_equal_peft(moe_files, swarm):
    """Qwen3-MoE: a served adapter on attention, and a client's own LoRA on attention, as PEFT computes."""
    checkpoint, adapter = moe_files
    peft = peft_reference(checkpoint, adapter).base_model.model
    torch.manual_seed(5)
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=PROMPT.shape[1] + 4, adapter=adapter.name) as session:
            assert [hop.peer_id for hop in session.hops] == [swarm.nodes[3].info["peer_id"]]
            ids, outputs = greedy_steps(model, session, PROMPT, 4)
        assert torch.equal(ids, reference_greedy(checkpoint, PROMPT, 4, model=peft))
        check_against(peft, ids, outputs, FLOAT32_TOL)
        check_client_lora(model, checkpoint, ("q_proj", "o_proj"), 2)


def test_bad_lora_matrices_get_invalid_argument(swarm):
    hidden = torch.randn(1, 3, 64)
    a, b = torch.zeros(4, 64), torch.zeros(64, 4)

    def request(*entries, **fields):
        return node_pb2.ForwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                                       start_block=0, end_block=2, lora=list(entries), **fields)

    def entry(block=0, module="self_attn.q_proj", a=a, b=b, scale=2.0):
        return node_pb2.LoraMatrices(block=block, module=module, a=serialize_tensor(a), b=serialize_tensor(b),
                                     scale=scale)

    cases = [
        (request(entry(block=2)), "LoRA matrices for block 2, outside blocks [0, 2)"),
        (request(entry(module="self_attn.w9")), "block 0: the blocks have no linear layer 'self_attn.w9' to adapt"),
        (request(entry(b=torch.zeros(63, 4))), "do not fit the layer's 64 -> 64 features at rank 4"),
        (request(entry(), entry()), "LoRA matrices for block 0 self_attn.q_proj given twice"),
        (request(entry(a=torch.zeros(300, 64), b=torch.zeros(64, 300))), "a [r <= 256, in] and b [out, r]"),
        (request(entry(a=torch.full((4, 64), float("nan")))), "contain NaN or infinite values"),
        (request(entry(a=a.long())), "LoRA matrices must be float32, bfloat16, float16, got 'int64'"),
        (request(entry(scale=float("inf"))), "LoRA scale must be finite"),
        (request(node_pb2.LoraMatrices(block=0, module="self_attn.q_proj", a=node_pb2.Tensor(shape=[4, -1],
                                       dtype="float32"), b=serialize_tensor(b))), "a [r <= 256, in] and b [out, r]"),
        (request(*[entry(module=f"x{i}") for i in range(65)]), "at most 32 LoRA matrices per block, got 65"),
    ]
    with swarm.channel(swarm.nodes[0]) as channel:
        stub = node_pb2_grpc.NodeStub(channel)
        for message, expected in cases:
            with pytest.raises(grpc.RpcError) as caught:
                stub.Forward(message, timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
            assert expected in caught.value.details(), caught.value.details()
        backward = node_pb2.BackwardRequest(protocol_version=PROTOCOL_VERSION, hidden=serialize_tensor(hidden),
                                            grad_output=serialize_tensor(hidden), start_block=0, end_block=2,
                                            lora=[entry(block=3)])
        with pytest.raises(grpc.RpcError) as caught:
            stub.Backward(backward, timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "LoRA matrices for block 3, outside blocks [0, 2)" in caught.value.details()
        backward.ClearField("lora")
        backward.adapter = "other"
        with pytest.raises(grpc.RpcError) as caught:
            stub.Backward(backward, timeout=30)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        open_session = node_pb2.InferenceRequest(protocol_version=PROTOCOL_VERSION, open=node_pb2.OpenSession(
            start_block=0, end_block=2, batch_size=1, max_length=8, lora=[entry(b=torch.zeros(63, 4))]))
        with pytest.raises(grpc.RpcError) as caught:
            list(stub.Inference(iter([open_session]), timeout=30))
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "do not fit the layer's 64 -> 64 features at rank 4" in caught.value.details()


def test_a_node_killed_before_the_backward_pass_leaves_the_lora_gradients_unchanged(files, swarm):
    """Runs last: it kills a node. The forward pass's last hop dies before the backward pass; its blocks'
    backward runs on a replacement (a chain of two hops when the dead one served all four blocks)."""
    torch.manual_seed(4)
    with distributed(files, swarm) as model:
        lora = model.add_lora(r=2, lora_alpha=4.0, target_modules=("v_proj", "down_proj"))
        with torch.no_grad():
            for b in lora.lora_B:
                b.normal_(std=0.05)
        out = model(input_ids=PROMPT, labels=PROMPT)
        out.loss.backward()
        expected = [p.grad.clone() for p in lora.parameters()]
        lora.zero_grad()
        out = model(input_ids=PROMPT, labels=PROMPT)
        last = model.remote_blocks._route[-1]
        victim = next(node for node in swarm.nodes if node.info["peer_id"] == last.peer_id)
        swarm.kill(victim)
        out.loss.backward()
        assert model.remote_blocks.failovers >= 1 and model.routes.is_banned(last.peer_id)
        for got, want in zip(lora.parameters(), expected, strict=True):
            assert rel_err(got.grad, want) < FLOAT32_TOL
