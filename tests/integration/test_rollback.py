"""Cache rollback (Step.keep_length) with real daemons: every hop keeps only the first L positions of its
cache, then appends, so rejected draft tokens leave no trace; with hand-off and without, with two sessions
stepping at once on the same nodes (batched), and through failover replay. Each step's output is held
against transformers over the tokens the caches should hold, and every hop's cache length is read from
its results (``HopStream.last_cache_length``, the node's ``StepResult.cache_length``).
"""

from __future__ import annotations

import threading
import traceback

import grpc
import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.transport import ping
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc, serialize_tensor
from tests.helpers.checkpoints import make_checkpoint, reference_model
from tests.helpers.reference import FLOAT32_TOL, last_hidden_states, rel_err

NUM_LAYERS = 6
SPANS = [(0, 3), (3, 6), (3, 6)]  # the second node of blocks 3..5 replaces the first when it is killed
MODES = {"handoff": ClientConfig(handoff_min_rtt=0.0), "relay": ClientConfig(handoff=False)}

# (keep_length or None, new tokens): drafts appended, rejected, appended again; keep == length; back to 0
REFERENCE_LOCK = threading.Lock()
SCRIPT = [(None, 12), (None, 4), (13, 3), (16, 2), (14, 1), (15, 5), (0, 3), (3, 1)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("rb") / "llama3", "llama3", num_layers=NUM_LAYERS, seed=13)


@pytest.fixture(scope="module")
def reference(checkpoint):
    return reference_model(checkpoint)


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(checkpoint, "--blocks", f"{a}:{b}", "--compute-threads", "1",
                                  "--batch-wait-ms", "20", wait=False) for a, b in SPANS]
        for node in nodes:
            swarm.wait_ready(node)
        yield swarm


def batching(swarm: LocalSwarm) -> list[tuple[int, int]]:
    """(forward passes, steps they ran) of every node."""
    pool = swarm.pool()
    try:
        infos = [ping(pool, n.info["peer_id"], n.info["address"], 5)[1] for n in swarm.nodes]
    finally:
        pool.close()
    return [(i.forward_passes, i.batched_steps) for i in infos]


def run_script(model, session, reference, seed: int, before_step=None) -> None:
    """Step SCRIPT through ``session``, checking outputs and every hop's cache length after each step."""
    gen = torch.Generator().manual_seed(seed)
    held = torch.zeros(1, 0, dtype=torch.long)  # the tokens the caches should hold
    for n, (keep, count) in enumerate(SCRIPT):
        if before_step is not None:
            before_step(n, session)
        new = torch.randint(0, 256, (1, count), generator=gen)
        out = session.step(model.head.embed(new), keep_length=keep)
        held = torch.cat([held if keep is None else held[:, :keep], new], dim=1)
        assert session.length == held.shape[1]
        assert [h.stream.last_cache_length for h in session._hops] == [held.shape[1]] * len(session._hops)
        with REFERENCE_LOCK:  # its hook sees every forward pass of the shared model
            expected, _ = last_hidden_states(reference, held)
        error = rel_err(out, expected[:, -count:])
        assert error < FLOAT32_TOL, f"step {n}: relative error {error:g}"


@pytest.mark.parametrize("mode", list(MODES))
def test_rollback_on_every_hop(swarm, checkpoint, reference, mode):
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=MODES[mode]) as model:
        with model.inference_session(max_length=32) as session:
            assert len(session.route) == 2
            assert session.uses_handoff == (mode == "handoff")
            run_script(model, session, reference, seed=1)


def test_rollback_in_concurrent_sessions(swarm, checkpoint, reference):
    """Two sessions step at once (the nodes batch steps that arrive together, --batch-wait-ms): a barrier
    before every step sends both sessions' steps together, and the pair runs again (at most 3 times,
    every run checked) until some node's forward pass held steps of both, which arriving together makes
    likely, not certain."""
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=MODES["relay"]) as model:
        for _attempt in range(3):
            errors: list[str] = []
            before = batching(swarm)
            barrier = threading.Barrier(2)

            def worker(seed: int, barrier: threading.Barrier = barrier, errors: list[str] = errors) -> None:
                try:
                    with model.inference_session(max_length=32) as session:
                        run_script(model, session, reference, seed=seed,
                                   before_step=lambda n, session: barrier.wait(60))
                except BaseException:  # noqa: BLE001 - reported below
                    barrier.abort()  # the other session must not wait for this one
                    errors.append(traceback.format_exc())

            threads = [threading.Thread(target=worker, args=(seed,)) for seed in (2, 3)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert not any(thread.is_alive() for thread in threads)
            assert not errors, "\n".join(errors)
            after = batching(swarm)
            # some forward pass ran steps of both sessions
            if any(a[1] - b[1] > a[0] - b[0] for a, b in zip(after, before, strict=True)):
                break
        else:
            raise AssertionError(f"no forward pass held steps of both sessions in 3 runs: {before} -> {after}")


def test_rollback_value_checked_by_client(swarm, checkpoint):
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=16) as session:
            session.step(model.head.embed(torch.tensor([[1, 2, 3]])))
            for keep in (4, -1):
                with pytest.raises(ValueError, match="keep_length"):
                    session.step(model.head.embed(torch.tensor([[4]])), keep_length=keep)
            with pytest.raises(ValueError, match="do not fit"):
                session.step(model.head.embed(torch.zeros(1, 15, dtype=torch.long)), keep_length=2)


def _open(version: int = PROTOCOL_VERSION) -> node_pb2.InferenceRequest:
    return node_pb2.InferenceRequest(protocol_version=version, open=node_pb2.OpenSession(
        start_block=0, end_block=3, batch_size=1, max_length=16))


def _step(step_id: int, tokens: int, keep: int | None = None) -> node_pb2.InferenceRequest:
    return node_pb2.InferenceRequest(protocol_version=PROTOCOL_VERSION, step=node_pb2.Step(
        step_id=step_id, hidden=serialize_tensor(torch.randn(1, tokens, 64)), keep_length=keep))


@pytest.mark.parametrize(("keep", "tokens", "text"), [
    (6, 1, "keep_length 6 is outside 0..5"),
    (-1, 1, "keep_length -1 is outside 0..5"),
    (2**40, 1, "is outside 0..5"),
    (3, 14, "more do not fit"),
])
def test_bad_rollback_is_invalid_argument(swarm, keep, tokens, text):
    channel = swarm.channel(swarm.nodes[0])
    try:
        stub = node_pb2_grpc.NodeStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            for _ in stub.Inference(iter([_open(), _step(1, 5), _step(2, tokens, keep)]), timeout=30):
                pass
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert text in error.value.details()
    finally:
        channel.close()


def test_failover_replays_rollbacks(swarm, checkpoint, reference):
    """Last in the module: it kills the node serving blocks 3..5; its replacement rebuilds the cache from the
    replayed inputs, rollbacks included, and the script's later steps still match."""

    def kill_at(n: int, session) -> None:
        if n == 5:
            address = next(addr for addr, a, b in session.route if (a, b) == (3, 6))
            LocalSwarm.kill(next(d for d in swarm.nodes if d.info["address"] == address))

    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=MODES["handoff"]) as model:
        with model.inference_session(max_length=32) as session:
            run_script(model, session, reference, seed=4, before_step=kill_at)
            assert session.failovers == 1
