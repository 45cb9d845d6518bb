"""Real daemons (subprocesses through the console scripts) on 127.0.0.1: greedy generation through a
3-node swarm equals transformers for every family, the cache budget, and shutdown on SIGTERM.

One swarm is started for the whole module: a bootstrap peer and 3 nodes per family, each family
under its own model name. Clients hand off (forced: on loopback a ping would choose relaying), except
where a test relays on purpose; test_swarm_numerics.py compares the numbers in both modes.
"""

from __future__ import annotations

import signal
import time

import grpc
import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, split_blocks
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.route import RouteManager
from homeswarm.client.session import InferenceSession
from homeswarm.client.transport import ChannelPool, HopFailed, HopStream
from homeswarm.protocol import node_pb2
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.planner import MissingBlocksError
from tests.helpers.checkpoints import FAMILIES, make_checkpoint, reference_greedy, reference_model
from tests.helpers.reference import node_counters, steps_in

NUM_LAYERS = 6
HANDOFF = ClientConfig(handoff_min_rtt=0.0)
RELAY = ClientConfig(handoff=False)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_checkpoint(root / family, family, num_layers=NUM_LAYERS, seed=i)
            for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def swarm(checkpoints, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        daemons = []
        for path in checkpoints.values():
            for start, end in split_blocks(NUM_LAYERS, 3):
                daemons.append(swarm.start_node(path, "--blocks", f"{start}:{end}", "--compute-threads", "1",
                                                wait=False))
        for daemon in daemons:
            swarm.wait_ready(daemon, timeout=180)
        yield swarm


@pytest.fixture(scope="module")
def client_models(swarm, checkpoints):
    models = {family: AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                      config=HANDOFF)
              for family, path in checkpoints.items()}
    yield models
    for model in models.values():
        model.close()


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_long_prompt_matches_transformers(family, checkpoints, client_models):
    model = client_models[family]
    assert model.head.prepare_greedy(min_entries=0)  # what a client does for heads of 4M weights and more
    prompt = torch.randint(0, 256, (1, 210), generator=torch.Generator().manual_seed(1))
    expected = reference_greedy(checkpoints[family], prompt, 24)
    got = model.generate(prompt, max_new_tokens=24)
    assert got.shape == expected.shape
    assert got.tolist() == expected.tolist()
    # the client chose those tokens from the int8 copy of its head
    assert model.head.bounded_argmax is not None
    assert model.head.bounded_argmax.candidates > 0 and model.head.bounded_argmax.fallbacks == 0
    # the route really spans 3 nodes
    with model.inference_session(max_length=8) as session:
        assert [(a, b) for _, a, b in session.route] == split_blocks(NUM_LAYERS, 3)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_of_two_matches_transformers(family, checkpoints, client_models):
    """A batch of two, the client relaying every hop's output: transformers' greedy tokens."""
    prompt = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(2))
    expected = reference_greedy(checkpoints[family], prompt, 16)
    model = client_models[family]
    with InferenceSession(model.routes, model.pool, RELAY, batch_size=2, max_length=40 + 16) as session:
        assert not session.uses_handoff
        got = model.generate(prompt, max_new_tokens=16, session=session)
    assert got.tolist() == expected.tolist()


def test_sampling_is_seeded_and_within_top_k(checkpoints, client_models):
    model = client_models["llama3"]
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(3))
    a = model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=5, seed=7)
    b = model.generate(prompt, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=5, seed=7)
    assert a.tolist() == b.tolist()
    # every sampled token is among the reference model's top 5 at its position
    ref = reference_model(checkpoints["llama3"])
    with torch.no_grad():
        logits = ref(a).logits[0, prompt.shape[1] - 1 : -1]
    top5 = logits.topk(5, dim=-1).indices
    new = a[0, prompt.shape[1] :]
    assert all(int(t) in top5[i].tolist() for i, t in enumerate(new))


def test_stream_yields_each_token_before_the_next_step(swarm, checkpoints, client_models):
    """generate_stream yields token i as soon as its step is done and sends step i + 1 only once the token
    is taken: when token i arrives, every node of the route has received exactly i + 1 steps of this
    generation (their Info counters). The tokens are transformers' greedy ones."""
    model = client_models["qwen2"]
    prompt = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(4))
    peers = {d.info["address"]: d.info for d in swarm.nodes if d.info is not None}
    streamed, steps_seen = [], []
    with model.inference_session(max_length=8 + 6) as session:
        route = [address for address, _, _ in session.route]
        before = node_counters(route, peers)
        for tokens in model.generate_stream(prompt, max_new_tokens=6, session=session):
            streamed.append(int(tokens[0]))
            now = node_counters(route, peers)
            steps_seen.append([steps_in(now[a]) - steps_in(before[a]) for a in route])
    assert steps_seen == [[i + 1] * len(route) for i in range(6)]
    assert streamed == reference_greedy(checkpoints["qwen2"], prompt, 6)[0, 8:].tolist()


def test_missing_blocks_named_within_seconds(swarm, checkpoints):
    """A model nobody serves: generate fails at once with MissingBlocksError naming the blocks, not after
    retries. Timed from the call (joining the DHT before it took up to 7 s with one core kept busy by
    another process; the call itself 0.06-0.15 s)."""
    model = AutoDistributedModelForCausalLM.from_pretrained(
        checkpoints["llama2"], initial_peers=swarm.initial_peers, model_name="nobody-serves-this"
    )
    try:
        t0 = time.monotonic()
        with pytest.raises(MissingBlocksError, match=r"block\(s\) 0:6 of model 'nobody-serves-this'"):
            model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=2)
        assert time.monotonic() - t0 < 15
    finally:
        model.close()


def test_cache_budget_refuses_with_resource_exhausted(swarm, checkpoints):
    path = checkpoints["mistral"]
    node = swarm.start_node(path, "--model-name", "budget-test", "--max-cache-tokens", "100")
    address = node.info["address"]
    pool = swarm.pool()

    def open_session(max_length: int) -> HopStream:
        return HopStream(pool, peer_id=node.info["peer_id"], address=address, model="budget-test", start=0,
                         end=NUM_LAYERS, batch_size=1, max_length=max_length, compression=node_pb2.NONE,
                         connect_timeout=10, step_timeout=30)

    try:
        first = open_session(80)
        with pytest.raises(HopFailed) as refused:
            open_session(40)
        assert refused.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "not enough KV cache memory" in str(refused.value)
        # the admitted session keeps working
        out = first.step(1, torch.randn(1, 10, 64))
        assert out.shape == (1, 10, 64) and torch.isfinite(out).all()
        assert 0 < first.last_compute_seconds < 30  # the node reports its forward pass's time
        first.close()
        # its memory returns to the budget once closed
        deadline = time.monotonic() + 60
        while True:
            try:
                open_session(80).close()
                break
            except HopFailed:
                assert time.monotonic() < deadline, "the closed session's cache was not released"
                time.sleep(0.1)
    finally:
        pool.close()
        LocalSwarm.stop(node)


def test_sigterm_exits_zero_and_blocks_disappear(swarm, checkpoints):
    node = swarm.start_node(checkpoints["qwen3"], "--model-name", "sigterm-test", "--shutdown-grace", "5",
                            "--announce-ttl", "600")
    dht = SwarmDHT.create(swarm.initial_peers, client_mode=True)
    pool = ChannelPool()
    try:
        routes = RouteManager(dht, pool, "sigterm-test", NUM_LAYERS, ClientConfig(records_max_age=0.0))
        assert [h.peer_id for h in routes.plan(0, NUM_LAYERS)] == [node.info["peer_id"]]
        t0 = time.monotonic()
        code = LocalSwarm.stop(node, sig=signal.SIGTERM, timeout=60)
        assert code == 0
        # with no open session it need not wait out its grace: 1.0-1.8 s measured with one core kept busy
        assert time.monotonic() - t0 < 5 + 10
        # the record lives for 600 s, yet the client stops seeing the node right away
        records = routes.records(refresh=True)
        assert [r.state.value for r in records] == ["offline"]
        with pytest.raises(MissingBlocksError):
            routes.plan(0, NUM_LAYERS)
    finally:
        pool.close()
        dht.shutdown()
