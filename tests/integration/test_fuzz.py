"""Fuzzing a running node: random bytes and random, mostly malformed messages to every RPC.

Every call must end with OK or a deliberate status (never UNKNOWN, which is what an exception escaping
a handler becomes), the node must keep running, release every session it opened (its whole cache budget
is free again), not grow in memory from one fuzzing round to the next, and still generate exactly what
transformers generates. Examples are bounded (a fixed number per RPC, derandomized) so the module takes
well under a minute on top of starting its node.
"""

from __future__ import annotations

import collections
import time

import grpc
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc, serialize_tensor
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

pytestmark = pytest.mark.timeout(600)

HIDDEN = 64
NUM_LAYERS = 2
EXAMPLES = 30  # per RPC and round
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))
EXPECTED = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.NOT_FOUND,
            grpc.StatusCode.RESOURCE_EXHAUSTED}  # deliberate statuses
OUTCOMES: collections.Counter = collections.Counter()  # (rpc, status name): calls
METHODS = ("Info", "Forward", "Push")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("fuzz") / "qwen2", "qwen2", num_layers=NUM_LAYERS, seed=8)


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        swarm.start_node(checkpoint, "--compute-threads", "1", "--max-requests-per-peer", "0",
                         "--max-session-length", "256", "--max-batch-size", "4")
        yield swarm


@pytest.fixture(scope="module")
def channel(swarm):
    channel = swarm.channel(swarm.nodes[0])
    yield channel
    channel.close()


# --- strategies: near the valid shape often, anywhere sometimes ------------------------------------------

dims = st.one_of(st.integers(0, 4), st.sampled_from([HIDDEN, HIDDEN - 1, 2**31, 2**62, -1]))
shapes = st.one_of(st.just([1, 1, HIDDEN]), st.just([2, 3, HIDDEN]), st.lists(dims, max_size=10))
dtypes = st.sampled_from(["float32", "bfloat16", "float16", "int64", "", "float64", "x" * 300])


@st.composite
def tensors(draw) -> node_pb2.Tensor:
    shape = draw(shapes)
    dtype = draw(dtypes)
    width = {"float32": 4, "int64": 8}.get(dtype, 2)
    count = 1
    for d in shape:
        count *= max(d, 0)
    if 0 < count <= 4096 and draw(st.booleans()):
        size = count * width  # right size: the values decide (random bytes: NaN and inf included)
    else:
        size = draw(st.integers(0, 64))
    return node_pb2.Tensor(buffer=draw(st.binary(min_size=size, max_size=size)), shape=shape, dtype=dtype,
                           compression=draw(st.integers(0, 5)), scales=draw(st.binary(max_size=16)),
                           block_size=draw(st.sampled_from([0, 0, 1, 64, 2**32 - 1])))


@st.composite
def valid_tensors(draw, batch: int | None = None) -> node_pb2.Tensor:
    """A well-formed hidden state of random values (so calls also get past every check and compute)."""
    shape = (batch or draw(st.integers(1, 2)), draw(st.integers(1, 3)), HIDDEN)
    values = torch.randn(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**32))))
    return serialize_tensor(values, draw(st.sampled_from([0, 1, 2, 3])))


session_ids = st.one_of(st.text(max_size=40), st.just("0" * 32), st.from_regex(r"[0-9a-f]{32}", fullmatch=True))
next_hops = st.lists(st.builds(node_pb2.NextHop, address=st.one_of(st.text(max_size=30),
                                                                   st.just("127.0.0.1:1")),
                               session_id=session_ids), max_size=3)
versions = st.sampled_from([PROTOCOL_VERSION, PROTOCOL_VERSION, 0, PROTOCOL_VERSION + 1, 2**32 - 1])
blocks = st.integers(0, NUM_LAYERS + 2)
steps = st.builds(node_pb2.Step, step_id=st.integers(0, 4), hidden=tensors(), next=next_hops)
opens = st.builds(node_pb2.OpenSession, model=st.sampled_from(["", "qwen2", "other"]), start_block=blocks,
                  end_block=blocks, batch_size=st.integers(0, 5), max_length=st.integers(0, 300),
                  response_compression=st.integers(0, 5))
stream_messages = st.one_of(
    st.builds(node_pb2.InferenceRequest, protocol_version=versions, open=opens),
    st.builds(node_pb2.InferenceRequest, protocol_version=versions, step=steps),
)


@st.composite
def sessions(draw) -> list[node_pb2.InferenceRequest]:
    """A well-formed session (open, then steps 1, 2, ...), a random message sometimes put in its way."""
    batch = draw(st.integers(1, 2))
    messages = [node_pb2.InferenceRequest(protocol_version=PROTOCOL_VERSION, open=node_pb2.OpenSession(
        start_block=0, end_block=NUM_LAYERS, batch_size=batch, max_length=16))]
    for step_id in range(1, draw(st.integers(1, 3)) + 1):
        messages.append(node_pb2.InferenceRequest(protocol_version=PROTOCOL_VERSION, step=node_pb2.Step(
            step_id=step_id, hidden=draw(valid_tensors(batch)))))
    if draw(st.booleans()):
        messages.insert(draw(st.integers(0, len(messages))), draw(stream_messages))
    return messages
requests = {
    "Info": st.builds(node_pb2.InfoRequest, protocol_version=versions),
    "Forward": st.one_of(
        st.builds(node_pb2.ForwardRequest, protocol_version=versions, hidden=tensors(), start_block=blocks,
                  end_block=blocks, response_compression=st.integers(0, 5)),
        st.builds(node_pb2.ForwardRequest, protocol_version=st.just(PROTOCOL_VERSION), hidden=valid_tensors(),
                  start_block=st.integers(0, 1), end_block=st.integers(1, NUM_LAYERS),
                  response_compression=st.integers(0, 3)),
    ),
    "Push": st.builds(node_pb2.PushRequest, protocol_version=versions, session_id=session_ids, step=steps),
}


def _expect_handled(rpc: str, call) -> None:  # noqa: ANN001
    try:
        call()
    except grpc.RpcError as e:
        OUTCOMES[rpc, e.code().name] += 1
        assert e.code() in EXPECTED, f"{e.code()}: {e.details()}"
    else:
        OUTCOMES[rpc, "OK"] += 1


def _fuzz_unary(rpc: str, typed, raw, strategy) -> None:  # noqa: ANN001
    """One unary RPC: structured messages through its typed stub, then random bytes."""

    @FUZZ
    @given(request=strategy)
    def structured(request) -> None:  # noqa: ANN001
        _expect_handled(rpc, lambda: typed(request, timeout=30))

    @FUZZ
    @given(data=st.binary(max_size=200))
    def random_bytes(data: bytes) -> None:
        _expect_handled(rpc, lambda: raw(data, timeout=30))

    structured()
    random_bytes()


def fuzz_round(channel: grpc.Channel) -> None:
    stub = node_pb2_grpc.NodeStub(channel)
    raw = {m: channel.unary_unary(f"/homeswarm.v1.Node/{m}") for m in METHODS}
    raw_stream = channel.stream_stream("/homeswarm.v1.Node/Inference")

    for method in METHODS:
        _fuzz_unary(method, getattr(stub, method), raw[method], requests[method])

    @FUZZ
    @given(messages=st.one_of(st.lists(stream_messages, max_size=4), sessions()))
    def session(messages) -> None:  # noqa: ANN001
        _expect_handled("Inference", lambda: list(stub.Inference(iter(messages), timeout=30)))

    @FUZZ
    @given(chunks=st.lists(st.binary(max_size=100), max_size=3))
    def session_bytes(chunks) -> None:  # noqa: ANN001
        _expect_handled("Inference", lambda: list(raw_stream(iter(chunks), timeout=30)))

    session()
    session_bytes()


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def info(channel: grpc.Channel) -> node_pb2.InfoResponse:
    return node_pb2_grpc.NodeStub(channel).Info(node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION), timeout=10)


def wait_until_idle(channel: grpc.Channel) -> node_pb2.InfoResponse:
    deadline = time.monotonic() + 20
    while (current := info(channel)).active_sessions:
        assert time.monotonic() < deadline, "sessions stay open on the node"
        time.sleep(0.05)
    return current


def test_fuzzing_every_rpc_leaves_the_node_exact_and_bounded(swarm, channel, checkpoint):
    node = swarm.nodes[0]
    free_tokens = info(channel).cache_tokens_left
    fuzz_round(channel)  # the first round also warms up allocations the second one reuses
    assert wait_until_idle(channel).cache_tokens_left == free_tokens
    after_first = rss_bytes(node.process.pid)
    fuzz_round(channel)
    assert wait_until_idle(channel).cache_tokens_left == free_tokens
    growth = rss_bytes(node.process.pid) - after_first
    assert growth < 64 * 2**20, f"the node grew by {growth / 2**20:.0f} MiB in the second fuzzing round"
    assert node.process.poll() is None
    assert OUTCOMES["Push", "INVALID_ARGUMENT"] and OUTCOMES["Push", "NOT_FOUND"], OUTCOMES
    # the messages reached past the first checks: some calls succeeded, others were refused
    for rpc in ("Forward", "Inference"):
        assert OUTCOMES[rpc, "OK"] and OUTCOMES[rpc, "INVALID_ARGUMENT"], (rpc, OUTCOMES)

    prompt = torch.randint(0, 256, (1, 10), generator=torch.Generator().manual_seed(4))
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers) as model:
        got = model.generate(prompt, max_new_tokens=8)
    assert got.tolist() == reference_greedy(checkpoint, prompt, 8).tolist()
