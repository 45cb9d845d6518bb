"""Weights from peers, with real daemons on 127.0.0.1: two nodes seed a tiny checkpoint; a node started with
only its config.json fetches every block from them and serves, and greedy output through it equals
transformers' (also once the seeders stop), as through a client whose folder holds only config.json too
(Python and the command line: its head and generation config from the seeders); a peer sending wrong tensor
bytes (the uploader's corrupt-weights fault, served in this process) is caught by the digest and banned; a
throttled source killed mid-transfer leaves a partial file that another peer resumes at its offset; bad
Weights requests get a status and a message.

One swarm for the module: a bootstrap peer, the two seeders and the throttled one. The ban and resume tests
fetch in this process (node.peer_fetch against the swarm's DHT); the last test runs the whole join-swarm
path and stops the seeders, so it comes last.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import grpc
import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.model.digest import block_digests
from homeswarm.node.peer_fetch import discover, fetch_blocks
from homeswarm.node.peer_fetch_plan import PeerOffer
from homeswarm.node.peer_folder import block_file, held_blocks
from homeswarm.node.peers import PeerChannels
from homeswarm.node.weight_upload import WeightUploader
from homeswarm.node.wire import add_node_service
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc
from homeswarm.routing.dht import SwarmDHT
from tests.helpers.checkpoints import make_checkpoint, reference_greedy

pytestmark = pytest.mark.timeout(300)

MODEL = "tiny-from-peers"
NUM_LAYERS = 4
PROMPT = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(11))
NEW_TOKENS = 10
NODE_ARGS = ("--model-name", MODEL, "--blocks", f"0:{NUM_LAYERS}", "--compute-threads", "1", "--throughput", "100")
SLOW = "20KB"  # a block (about 150 KB) takes the throttled source 7 s


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("full") / "tiny", "llama2", num_layers=NUM_LAYERS, seed=4)


@pytest.fixture(scope="module")
def digests(full, tmp_path_factory) -> dict[int, str]:
    return block_digests(full, cache_path=tmp_path_factory.mktemp("digests") / "digests.json")


@pytest.fixture(scope="module")
def swarm(full, tmp_path_factory):
    """The two seeders and a slow one (--upload-limit 20KB, ``swarm.slow``), started at once."""
    work = tmp_path_factory.mktemp("swarm")
    env = {"OMP_NUM_THREADS": "1", "XDG_CACHE_HOME": str(work / "xdg")}  # digests, peer weights: none in ~
    with LocalSwarm(work, env=env) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(full, *NODE_ARGS, wait=False) for _ in range(2)]
        swarm.slow = swarm.start_node(full, *NODE_ARGS, "--upload-limit", SLOW, wait=False)
        for node in [*nodes, swarm.slow]:
            swarm.wait_ready(node, timeout=180)
        yield swarm


class Liar(node_pb2_grpc.NodeServicer):
    """A peer whose Weights rpc flips tensor bytes (the uploader's fault mode, HOMESWARM_FAULT=corrupt-weights in a
    node), served in this process: one daemon fewer on a loaded machine."""

    def __init__(self, folder: Path) -> None:
        self.uploads = WeightUploader(folder, MODEL, rate=float("inf"), corrupt=True)

    async def Weights(self, request, context):  # noqa: ANN001, ANN201, N802
        async for chunk in self.uploads.stream(request, context):
            yield chunk


async def fetch(swarm: LocalSwarm, dest: Path, *, without: str = "", liar: PeerOffer | None = None,
                on_progress=None):  # noqa: ANN001, ANN201
    """Fetch every block into ``dest`` from the swarm's nodes but peer ``without`` (and ``liar``), as a joining
    node does; ``on_progress`` runs beside it."""
    dht = SwarmDHT.create(swarm.initial_peers, client_mode=True)
    channels = PeerChannels()
    try:
        offers = [o for o in await discover(dht, channels, MODEL, 0, NUM_LAYERS) if o.peer_id != without]
        offers += [liar] if liar is not None else []
        work = fetch_blocks(dest, MODEL, list(range(NUM_LAYERS)), offers,
                            lambda o: channels.stub(o.address, o.peer_id, o.relays, o.tls_cert),
                            max_block_bytes=1 << 24, stall_timeout=20)
        if on_progress is None:
            return offers, await work
        watcher = asyncio.create_task(on_progress())
        try:
            return offers, await work
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
    finally:
        await channels.close()
        dht.shutdown()


def test_a_peer_sending_wrong_bytes_is_banned_and_the_fetch_completes(swarm, full, digests, tmp_path):
    async def with_liar():  # noqa: ANN202
        server = grpc.aio.server()
        add_node_service(Liar(full), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:  # it announces the honest digests, as a liar would
            return await fetch(swarm, tmp_path, without=swarm.slow.info["peer_id"],
                               liar=PeerOffer("liar", f"127.0.0.1:{port}", dict(digests)))
        finally:
            await server.stop(None)

    offers, report = asyncio.run(with_liar())
    assert [o.peer_id for o in offers].count("liar") == 1 and len(offers) == 3
    # three peers, four blocks: each took one at first, so the liar sent one whole block
    assert report.banned == {"liar"} and "liar" not in report.blocks.values()
    assert held_blocks(tmp_path) == list(range(NUM_LAYERS)) and not list(tmp_path.glob("*.part"))
    assert block_digests(tmp_path, cache_path=tmp_path / "d.json") == digests


def test_a_fetch_resumes_elsewhere_when_its_source_dies_mid_transfer(swarm, full, digests, tmp_path):
    slow = swarm.slow
    killed_at: dict[str, int] = {}  # the slow one's partial file -> its size when its source was killed

    async def kill_mid_transfer() -> None:
        # the seeders send a block in milliseconds: a partial file that lasts a second is the slow one's
        seen: dict[str, float] = {}
        while True:
            now = time.monotonic()
            sizes = {p.name: p.stat().st_size for p in tmp_path.glob("*.part")}
            seen = {name: seen.get(name, now) for name in sizes}
            lasting = [name for name, since in seen.items() if now - since >= 1.0 and sizes[name] >= 8192]
            if lasting:
                LocalSwarm.kill(slow)
                killed_at[lasting[0]] = tmp_path.joinpath(lasting[0]).stat().st_size
                return
            await asyncio.sleep(0.05)

    try:
        offers, report = asyncio.run(fetch(swarm, tmp_path, on_progress=kill_mid_transfer))
    finally:
        LocalSwarm.kill(slow)
        swarm.nodes.remove(slow)
    assert killed_at, "the slow source was never caught mid-transfer"
    assert slow.info["peer_id"] in {o.peer_id for o in offers} and len(offers) == 3
    slow_id = slow.info["peer_id"]
    ((part, size),) = killed_at.items()
    resumed = [(block, offset) for block, offset, peer in report.resumed if peer != slow_id]
    # resumed once, by an honest peer, at the bytes the slow one had sent (it may have sent one more chunk)
    assert len(resumed) == 1 and part == f"{block_file(resumed[0][0])}.part", (report.resumed, killed_at)
    assert size <= resumed[0][1] < size + 8192 < 140_000, (report.resumed, killed_at)
    assert report.blocks[resumed[0][0]] != slow_id and not report.banned
    assert held_blocks(tmp_path) == list(range(NUM_LAYERS)) and not list(tmp_path.glob("*.part"))
    assert block_digests(tmp_path, cache_path=tmp_path / "d.json") == digests


@pytest.mark.parametrize(("request_fields", "code", "text"), [
    ({"block": 1, "protocol_version": 0}, grpc.StatusCode.FAILED_PRECONDITION, "protocol"),
    ({"block": NUM_LAYERS}, grpc.StatusCode.NOT_FOUND, f"block {NUM_LAYERS}"),
    ({"block": 1, "model": "another"}, grpc.StatusCode.NOT_FOUND, "not 'another'"),
    ({"block": 1, "offset": 1 << 40}, grpc.StatusCode.OUT_OF_RANGE, "past the end"),
    (b"\xff\xff", grpc.StatusCode.INVALID_ARGUMENT, "malformed WeightsRequest"),
])
def test_bad_weight_requests_get_a_status_and_a_message(swarm, request_fields, code, text):
    seeder = swarm.nodes[0]
    with LocalSwarm.channel(seeder) as channel:
        if isinstance(request_fields, bytes):
            call = channel.unary_stream("/homeswarm.v1.Node/Weights")(request_fields, timeout=10)
        else:
            fields = {"protocol_version": PROTOCOL_VERSION, "model": MODEL, **request_fields}
            call = node_pb2_grpc.NodeStub(channel).Weights(node_pb2.WeightsRequest(**fields), timeout=10)
        with pytest.raises(grpc.RpcError) as error:
            list(call)
    assert error.value.code() == code and text in error.value.details(), error.value


def test_a_node_with_only_a_config_fetches_its_blocks_serves_and_outlives_its_seeders(swarm, full, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy2(full / "config.json", bare / "config.json")
    cache = tmp_path / "cache"
    node = swarm.start_node(bare, *NODE_ARGS, "--cache-dir", str(cache), timeout=180)
    log = node.log()
    assert re.search(r"fetched block\(s\) 0, 1, 2, 3 from 2 peer\(s\)", log), log[-3000:]
    folder = next((cache / "peer-weights").iterdir())
    assert held_blocks(folder) == list(range(NUM_LAYERS))
    expected = reference_greedy(full, PROMPT, NEW_TOKENS)[0].tolist()
    # a client with only config.json too: its head and generation config from the seeders
    client_cache = tmp_path / "client-cache"
    with AutoDistributedModelForCausalLM.from_pretrained(bare, initial_peers=swarm.initial_peers, model_name=MODEL,
                                                         cache_dir=client_cache, config=ClientConfig()) as model:
        assert model.model_dir.parent == client_cache / "peer-weights"
        assert sorted(p.name for p in model.model_dir.iterdir()) == [
            "config.json", "generation_config.json", "head.safetensors", "model.safetensors.index.json"]
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0].tolist() == expected
    # and the command line, its cache under XDG_CACHE_HOME
    result = subprocess.run(
        [*console_script("homeswarm"), "generate", str(bare), "--initial-peers", *swarm.initial_peers, "--model-name",
         MODEL, "--prompt-ids", ",".join(map(str, PROMPT[0].tolist())), "--max-new-tokens", str(NEW_TOKENS), "--json"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
        env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg"), "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout)["token_ids"] == expected[PROMPT.shape[1]:]
    assert (next((tmp_path / "xdg" / "homeswarm" / "peer-weights").iterdir()) / "head.safetensors").is_file()
    seeders = [n for n in swarm.nodes if n is not node]
    for seeder in seeders:  # from here on only the node that fetched its blocks serves them
        assert LocalSwarm.stop(seeder) == 0
        swarm.nodes.remove(seeder)
    model = AutoDistributedModelForCausalLM.from_pretrained(full, initial_peers=swarm.initial_peers,
                                                            model_name=MODEL, config=ClientConfig())
    try:
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0].tolist() == expected
        with model.inference_session(max_length=8) as session:
            assert [(a, b, c) for a, b, c in session.route] == [(node.info["address"], 0, NUM_LAYERS)]
    finally:
        model.close()
