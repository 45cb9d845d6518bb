"""Quantized nodes through real daemons on 127.0.0.1, serving the bundled demo model.

One swarm for the module: a bootstrap peer; a `--quant int8` node and a `--quant int4` node, each the
only node of its model name; and, under a third name, an int4 node beside an unquantized one. Greedy
generation through the quantized nodes is compared with float32 (the agreement is printed and held to
a floor below what was measured on this prompt: 32 of 32 tokens for int8 and for int4 in groups of 32,
the default; 25 in groups of 64 or 128); a client
demanding exact weights (ClientConfig(exact=True), `homeswarm generate --exact`) is refused, naming the
blocks, where only quantized nodes serve them, and otherwise routes through the unquantized node only,
getting exactly float32's tokens.

A Kimi K2 checkpoint shipped with 4-bit routed experts (as Kimi K2 Thinking is) serves under a fourth
name: blocks 1-3 under `--quant int8` (its attention and shared experts quantized beside the 4-bit
experts), block 0 (dense, no 4-bit layer) as shipped. The first announces `int4`, the second `none`; an
exact client is refused, naming blocks 1-3; through both, a prefill and decoding steps give the hidden
states of the same spans loaded here (within 1e-4 of the largest value: the same code, other threads).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.tokenizer import TextCodec
from homeswarm.client.transport import ping
from homeswarm.model import DEMO_MODEL_DIR, LocalModel
from homeswarm.model.loader import load_head, load_span
from homeswarm.routing.planner import QuantizedOnlyError
from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint
from tests.helpers.prequant_checkpoints import write_prequantized

PROMPT = "First Citizen:\nBefore we proceed any further, hear me speak.\n"
NEW_TOKENS = 32
FLOOR = {"int8": 28, "int4": 16}  # tokens equal to float32's, of 32
MIXED = "demo-mixed"


K2 = "k2-thinking"


@pytest.fixture(scope="module")
def k2_checkpoint(tmp_path_factory):
    """A tiny Kimi K2 checkpoint (block 0 dense, 1-3 MoE) with its routed experts alone stored 4-bit."""
    root = tmp_path_factory.mktemp("k2")
    source = make_deepseek_checkpoint(root / "float", "kimi_k2", moe_intermediate_size=32)
    packed, _ = write_prequantized(source, root / "packed", root / "plain", "compressed", experts_only=True)
    return packed


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, k2_checkpoint):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        nodes = [(DEMO_MODEL_DIR, "demo-int8", "int8", "0:4"), (DEMO_MODEL_DIR, "demo-int4", "int4", "0:4"),
                 (DEMO_MODEL_DIR, MIXED, "int4", "0:4"), (DEMO_MODEL_DIR, MIXED, "none", "0:4"),
                 (k2_checkpoint, K2, "int8", "1:4"), (k2_checkpoint, K2, "none", "0:1")]
        daemons = [swarm.start_node(path, "--model-name", name, "--quant", quant, "--blocks", blocks,
                                    "--compute-threads", "1", wait=False) for path, name, quant, blocks in nodes]
        for daemon in daemons:
            swarm.wait_ready(daemon, timeout=180)
        yield swarm


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    codec = TextCodec.for_model(DEMO_MODEL_DIR)
    assert codec is not None
    return codec.encode(PROMPT)


@pytest.fixture(scope="module")
def float32_tokens(prompt_ids) -> list[int]:
    ids = LocalModel(DEMO_MODEL_DIR).generate_greedy(torch.tensor([prompt_ids]), NEW_TOKENS)
    return ids[0, len(prompt_ids):].tolist()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_greedy_through_quantized_nodes_stays_close_to_float32(fmt, swarm, prompt_ids, float32_tokens):
    with AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, initial_peers=swarm.initial_peers,
                                                         model_name=f"demo-{fmt}") as model:
        got = model.generate([prompt_ids], max_new_tokens=NEW_TOKENS)[0, len(prompt_ids):].tolist()
        with model.inference_session(max_length=8) as session:
            hops = session.hops
        assert [(h.start, h.end, h.server.quant) for h in hops] == [(0, 4, fmt)]
        _, info = ping(model.pool, hops[0].peer_id, hops[0].address, timeout=10)
        assert info.quant == fmt
    # a stop on EOS would leave the positions after it unequal
    equal = sum(a == b for a, b in zip(got, float32_tokens, strict=False))
    print(f"\n{fmt}: {equal} of {NEW_TOKENS} greedy tokens equal to float32's")
    assert equal >= FLOOR[fmt]


def test_exact_client_refuses_a_route_of_quantized_nodes(swarm, prompt_ids):
    with AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, initial_peers=swarm.initial_peers,
                                                         model_name="demo-int8",
                                                         config=ClientConfig(exact=True)) as model:
        with pytest.raises(QuantizedOnlyError) as caught:
            model.generate([prompt_ids], max_new_tokens=2)
    assert caught.value.blocks == [0, 1, 2, 3]
    assert "block(s) 0:4 of model 'demo-int8' are served only by quantized nodes (int8)" in str(caught.value)


def test_exact_client_routes_through_the_unquantized_node(swarm, prompt_ids, float32_tokens):
    with AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, initial_peers=swarm.initial_peers,
                                                         model_name=MIXED, exact=True) as model:
        assert model.config.exact
        with model.inference_session(max_length=len(prompt_ids) + NEW_TOKENS) as session:
            assert [h.server.quant for h in session.hops] == ["none"]
            tokens = list(model.generate_stream([prompt_ids], max_new_tokens=NEW_TOKENS, session=session))
            got = [int(t[0]) for t in tokens]
    assert got == float32_tokens[: len(got)] and len(got) >= 8  # exact weights: float32's very tokens


def generate_cli(swarm: LocalSwarm, prompt_ids: list[int], *args: str) -> subprocess.CompletedProcess[str]:
    argv = [*console_script("homeswarm"), "generate", str(DEMO_MODEL_DIR), "--initial-peers", *swarm.initial_peers,
            "--prompt-ids", ",".join(map(str, prompt_ids)), "--max-new-tokens", str(NEW_TOKENS), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                          env={**os.environ, "HOMESWARM_LOG_LEVEL": "WARNING"})


def test_generate_exact_fails_in_one_line_where_only_quantized_nodes_serve(swarm, prompt_ids):
    result = generate_cli(swarm, prompt_ids, "--model-name", "demo-int4", "--exact")
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("homeswarm: error: ")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "block(s) 0:4 of model 'demo-int4' are served only by quantized nodes (int4)" in errors[0]


def test_generate_exact_verbose_shows_an_unquantized_route(swarm, prompt_ids, float32_tokens):
    result = generate_cli(swarm, prompt_ids, "--model-name", MIXED, "--exact", "--verbose", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert [(hop["blocks"], hop["quant"], hop["dtype"]) for hop in out["route"]] == [([0, 4], "none", "float32")]
    assert out["token_ids"] == float32_tokens[: len(out["token_ids"])]
    route = result.stderr[result.stderr.index("route:"):].splitlines()
    assert len(route) == 2 and "blocks 0:4" in route[1] and "weights float32" in route[1], result.stderr
    print(result.stderr[result.stderr.index("route:"):], file=sys.stderr)


def test_quant_over_4_bit_experts_announces_int4_and_exact_clients_avoid_it(swarm, k2_checkpoint):
    with AutoDistributedModelForCausalLM.from_pretrained(k2_checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name=K2) as model:
        with model.inference_session(max_length=8) as session:
            hops = session.hops
        assert [(h.start, h.end, h.server.quant) for h in hops] == [(0, 1, "none"), (1, 4, "int4")]
        assert [ping(model.pool, h.peer_id, h.address, timeout=10)[1].quant for h in hops] == ["none", "int4"]
    with AutoDistributedModelForCausalLM.from_pretrained(k2_checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name=K2, exact=True) as model:
        with pytest.raises(QuantizedOnlyError) as caught:
            model.generate([[1, 2, 3]], max_new_tokens=2)
    assert caught.value.blocks == [1, 2, 3]
    assert f"block(s) 1:4 of model '{K2}' are served only by quantized nodes (int4)" in str(caught.value)


def test_quant_over_4_bit_experts_computes_the_quantized_span(swarm, k2_checkpoint):
    head = load_head(k2_checkpoint)
    spans = [load_span(k2_checkpoint, 0, 1), load_span(k2_checkpoint, 1, 4, quant="int8")]
    ids = torch.randint(0, 256, (1, 14), generator=torch.Generator().manual_seed(3))
    caches = [span.new_cache(1, 14) for span in spans]
    with AutoDistributedModelForCausalLM.from_pretrained(k2_checkpoint, initial_peers=swarm.initial_peers,
                                                         model_name=K2) as model:
        with model.inference_session(max_length=14) as session:
            # an 8-token prefill, then decoding steps: every product on the kernels (up to 8 rows), whose
            # path does not depend on what a process measures at start (the dense products' dtype does)
            for chunk in (ids[:, :8], *(ids[:, i : i + 1] for i in range(8, 14))):
                got = session.step(head.embed(chunk))
                want = head.embed(chunk)
                for span, cache in zip(spans, caches, strict=True):
                    want = span(want, cache)
                assert ((got - want).abs().max() / want.abs().max()).item() < 1e-4
