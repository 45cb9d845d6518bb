"""Bad input never hurts a node: every kind of malformed request gets its gRPC status and message, the
per-peer limits answer RESOURCE_EXHAUSTED, and afterwards the nodes still generate exactly.

One swarm for the module: a bootstrap peer and two real daemons ([0, 2) and [2, 4) of a 4-block model)
with tight per-peer limits, so the limits can be reached in a few calls.
"""

from __future__ import annotations

import queue
import time

import grpc
import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc, serialize_tensor
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

pytestmark = pytest.mark.timeout(300)

HIDDEN = 64
MAX_SESSIONS = 3
RATE = 40  # requests per second per host, bursts of twice that
GOOD_ID = "0" * 32  # well-formed, but no session has it


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("bad") / "llama", "llama3", num_layers=4, seed=5)


@pytest.fixture(scope="module")
def swarm(checkpoint, tmp_path_factory):
    limits = ("--max-sessions-per-peer", str(MAX_SESSIONS), "--max-requests-per-peer", str(RATE))
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(checkpoint, "--blocks", span, "--compute-threads", "1", *limits, wait=False)
                 for span in ("0:2", "2:4")]
        for node in nodes:
            swarm.wait_ready(node)
        yield swarm


@pytest.fixture(scope="module")
def stubs(swarm):
    channels = [swarm.channel(n) for n in swarm.nodes]
    yield [node_pb2_grpc.NodeStub(c) for c in channels]
    for channel in channels:
        channel.close()


def tensor(shape=None, **overrides) -> node_pb2.Tensor:
    """A valid [1, 2, HIDDEN] float32 tensor message, with ``shape`` (declared only) and fields overridden."""
    message = serialize_tensor(torch.randn(1, 2, HIDDEN))
    if shape is not None:
        del message.shape[:]
        message.shape.extend(shape)
    for key, value in overrides.items():
        setattr(message, key, value)
    return message


def open_request(start=0, end=2, version=PROTOCOL_VERSION, max_length=64) -> node_pb2.InferenceRequest:
    return node_pb2.InferenceRequest(protocol_version=version, open=node_pb2.OpenSession(
        start_block=start, end_block=end, batch_size=1, max_length=max_length))


def step_request(step_id=1, hidden=None, next_hops=(), version=PROTOCOL_VERSION) -> node_pb2.InferenceRequest:
    return node_pb2.InferenceRequest(protocol_version=version, step=node_pb2.Step(
        step_id=step_id, hidden=hidden if hidden is not None else tensor(),
        next=[node_pb2.NextHop(address=a, session_id=s) for a, s in next_hops]))


def session_error(stub, *requests) -> grpc.RpcError:
    """Send ``requests`` on one Inference stream; the status that ends it (the test fails if none does)."""
    with pytest.raises(grpc.RpcError) as error:
        for _ in stub.Inference(iter(requests), timeout=30):
            pass
    return error.value


def assert_status(error: grpc.RpcError, code: grpc.StatusCode, text: str) -> None:
    assert error.code() == code, (error.code(), error.details())
    assert text in error.details(), error.details()


def wait_until_idle(stub) -> None:
    """Until the node holds no session (streams ended by an error close on the node a moment later)."""
    deadline = time.monotonic() + 20
    while stub.Info(node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION), timeout=10).active_sessions:
        assert time.monotonic() < deadline, "sessions stay open on the node"
        time.sleep(0.05)


STEP_CASES = {
    # name: (the bad step, expected status, text in the message)
    "oversized declared tensor": (step_request(hidden=tensor(shape=(1, 10**9, HIDDEN), buffer=b"")),
                                  grpc.StatusCode.INVALID_ARGUMENT, "at most batch"),
    "declared size beyond the buffer": (step_request(hidden=tensor(shape=(1, 3, HIDDEN))),
                                        grpc.StatusCode.INVALID_ARGUMENT, "buffer has"),
    "wrong width": (step_request(hidden=tensor(shape=(1, 2, HIDDEN - 1), buffer=b"\0" * 4 * 2 * (HIDDEN - 1))),
                    grpc.StatusCode.INVALID_ARGUMENT, f"[batch, tokens, {HIDDEN}]"),
    "wrong rank": (step_request(hidden=tensor(shape=(2, HIDDEN))), grpc.StatusCode.INVALID_ARGUMENT,
                   "[batch, tokens"),
    "wrong batch": (step_request(hidden=serialize_tensor(torch.randn(2, 1, HIDDEN))),
                    grpc.StatusCode.INVALID_ARGUMENT, "opened for batch 1"),
    "integer dtype": (step_request(hidden=serialize_tensor(torch.ones(1, 2, HIDDEN, dtype=torch.int64))),
                      grpc.StatusCode.INVALID_ARGUMENT, "got dtype 'int64'"),
    "unknown dtype": (step_request(hidden=tensor(dtype="complex64")), grpc.StatusCode.INVALID_ARGUMENT,
                      "got dtype 'complex64'"),
    "NaN": (step_request(hidden=serialize_tensor(torch.full((1, 2, HIDDEN), float("nan")))),
            grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite"),
    "infinity": (step_request(hidden=serialize_tensor(torch.full((1, 1, HIDDEN), float("inf")))),
                 grpc.StatusCode.INVALID_ARGUMENT, "NaN or infinite"),
    "first step not 1": (step_request(step_id=2), grpc.StatusCode.INVALID_ARGUMENT, "out of order"),
    "wrong version mid-stream": (step_request(version=PROTOCOL_VERSION + 1), grpc.StatusCode.FAILED_PRECONDITION,
                                 "protocol version"),
    "hand-off to a non-node address": (step_request(next_hops=[("127.0.0.1:1", GOOD_ID)]),
                                       grpc.StatusCode.INVALID_ARGUMENT, "is not a node serving block 2"),
    "malformed hand-off address": (step_request(next_hops=[("evil host:80", GOOD_ID)]),
                                   grpc.StatusCode.INVALID_ARGUMENT, "bad next hop address"),
    "malformed hand-off session id": (step_request(next_hops=[("127.0.0.1:1", "x" * 10)]),
                                      grpc.StatusCode.INVALID_ARGUMENT, "bad next hop session id"),
    "more hand-off hops than blocks": (step_request(next_hops=[("127.0.0.1:1", GOOD_ID)] * 3),
                                       grpc.StatusCode.INVALID_ARGUMENT, "blocks follow"),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_bad_step_gets_its_status(stubs, case):
    request, code, text = STEP_CASES[case]
    assert_status(session_error(stubs[0], open_request(), request), code, text)


def test_out_of_order_step(stubs):
    error = session_error(stubs[0], open_request(), step_request(1), step_request(3))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "step 3 is out of order: the session is at step 1")


def test_repeated_step_after_a_newer_one(stubs):
    error = session_error(stubs[0], open_request(), step_request(1), step_request(2), step_request(1))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "step 1 is out of order")


def test_hand_off_to_a_node_that_does_not_serve_the_next_block(swarm, stubs):
    own = swarm.nodes[0].info["address"]  # a node, but of blocks 0..1, not of block 2
    error = session_error(stubs[0], open_request(), step_request(next_hops=[(own, GOOD_ID)]))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, f"{own} is not a node serving block 2")


def test_hand_off_past_the_last_block(swarm, stubs):
    error = session_error(stubs[1], open_request(2, 4), step_request(next_hops=[(swarm.nodes[0].info["address"],
                                                                                  GOOD_ID)]))
    assert_status(error, grpc.StatusCode.INVALID_ARGUMENT, "0 blocks follow")


def test_wrong_version_at_open(stubs):
    error = session_error(stubs[0], open_request(version=PROTOCOL_VERSION + 1))
    assert_status(error, grpc.StatusCode.FAILED_PRECONDITION, "protocol version")


@pytest.mark.parametrize(("session_id", "code", "text"), [
    (GOOD_ID, grpc.StatusCode.NOT_FOUND, "no open session"),
    ("../etc/passwd", grpc.StatusCode.INVALID_ARGUMENT, "malformed session id"),
    ("", grpc.StatusCode.INVALID_ARGUMENT, "malformed session id"),
])
def test_push_to_an_unknown_or_malformed_session(stubs, session_id, code, text):
    request = node_pb2.PushRequest(protocol_version=PROTOCOL_VERSION, session_id=session_id,
                                   step=node_pb2.Step(step_id=1, hidden=tensor()))
    with pytest.raises(grpc.RpcError) as error:
        stubs[1].Push(request, timeout=10)
    assert_status(error.value, code, text)


@pytest.mark.parametrize(("request_", "text"), [
    (node_pb2.ForwardRequest(hidden=tensor(shape=(1, 1 << 40, HIDDEN), buffer=b""), end_block=2), "at most batch"),
    (node_pb2.ForwardRequest(hidden=serialize_tensor(torch.full((1, 1, HIDDEN), float("nan"))), end_block=2),
     "NaN"),
    (node_pb2.ForwardRequest(hidden=tensor(), start_block=1, end_block=3), "not within this node's span"),
])
def test_bad_forward(stubs, request_, text):
    request = node_pb2.ForwardRequest()
    request.CopyFrom(request_)
    request.protocol_version = PROTOCOL_VERSION
    with pytest.raises(grpc.RpcError) as error:
        stubs[0].Forward(request, timeout=10)
    assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, text)


def test_open_sessions_per_peer(stubs):
    wait_until_idle(stubs[0])
    streams = []
    try:
        for _ in range(MAX_SESSIONS):
            requests: queue.SimpleQueue = queue.SimpleQueue()
            requests.put(open_request())
            call = stubs[0].Inference(iter(requests.get, None), timeout=30)
            streams.append((requests, call))
            assert next(call).WhichOneof("kind") == "opened"
        error = session_error(stubs[0], open_request())
        assert_status(error, grpc.StatusCode.RESOURCE_EXHAUSTED, f"already has {MAX_SESSIONS} open sessions")
    finally:
        for requests, call in streams:
            requests.put(None)
            call.cancel()
    wait_until_idle(stubs[0])
    for _ in stubs[0].Inference(iter([open_request()]), timeout=30):  # a session opens again
        pass


def test_request_rate_per_peer(stubs):
    info = node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION)
    refused = []
    for _ in range(4 * RATE):
        try:
            stubs[1].Info(info, timeout=10)
        except grpc.RpcError as e:
            refused.append(e)
    assert refused, "no request was refused"
    assert_status(refused[0], grpc.StatusCode.RESOURCE_EXHAUSTED, "too many requests from 127.0.0.1")
    deadline = time.monotonic() + 10
    while True:  # the bucket refills: the peer is served again
        try:
            stubs[1].Info(info, timeout=10)
            break
        except grpc.RpcError as e:
            assert e.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and time.monotonic() < deadline
            time.sleep(1 / RATE)


@pytest.mark.parametrize("handoff", [True, False])
def test_still_exact_after_bad_input(swarm, checkpoint, handoff):
    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(1))
    config = ClientConfig(handoff=handoff, handoff_min_rtt=0.0)
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoint, initial_peers=swarm.initial_peers,
                                                         config=config) as model:
        got = model.generate(prompt, max_new_tokens=6)
    assert got.tolist() == reference_greedy(checkpoint, prompt, 6).tolist()


def test_bytes_that_are_not_a_message(swarm):
    with swarm.channel(swarm.nodes[0]) as channel:
        with pytest.raises(grpc.RpcError) as error:
            channel.unary_unary("/homeswarm.v1.Node/Forward")(b"\x00", timeout=10)
        assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, "malformed ForwardRequest")
        with pytest.raises(grpc.RpcError) as error:
            list(channel.stream_stream("/homeswarm.v1.Node/Inference")(iter([b"\xff\xff"]), timeout=10))
        assert_status(error.value, grpc.StatusCode.INVALID_ARGUMENT, "malformed InferenceRequest")
