"""Weights from peers without sockets: the block file's canonical layout and checks, the fetch planner, the
upload token bucket, the uploader, the fetch loop against fake peers (honest, lying, dying mid-transfer), and
a client's choice of the files it fetches."""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time

import grpc
import pytest
import torch
from safetensors.torch import load_file, save_file

from homeswarm.client.peer_files import _agreed
from homeswarm.client.peer_files import needs_peers as client_needs_peers
from homeswarm.model.digest import block_digests, file_block_digest
from homeswarm.node import peer_fetch
from homeswarm.node.config import ConfigError
from homeswarm.node.peer_fetch import PeerFetchError, fetch_blocks
from homeswarm.node.peer_fetch_plan import FetchPlan, PeerOffer, agreed_digests
from homeswarm.node.peer_folder import held_blocks, needs_peers, peer_folder, trusted_digests, write_digests
from homeswarm.node.preflight import check_model_path
from homeswarm.node.weight_stream import WeightStreamError, block_layout, check_header, read_range
from homeswarm.node.weight_upload import TokenBucket, WeightUploader
from homeswarm.protocol import node_pb2

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def checkpoint(tmp_path):
    """Two shards; block 1's tensors split across them, with a non-block tensor in each."""
    g = torch.Generator().manual_seed(0)
    t = {f"model.layers.{b}.{n}": torch.randn(s, generator=g) for b in range(3)
         for n, s in (("mlp.up.weight", (8, 4)), ("input_layernorm.weight", (4,)))}
    t["model.layers.1.mlp.down.weight"] = torch.randn(4, 8, generator=g).to(torch.bfloat16)
    first = {k: v for k, v in t.items() if ".0." in k or "up" in k and ".1." in k}
    first["model.embed_tokens.weight"] = torch.randn(16, 4, generator=g)
    second = {k: v for k, v in t.items() if k not in first}
    second["lm_head.weight"] = torch.randn(16, 4, generator=g)
    folder = tmp_path / "ckpt"
    folder.mkdir()
    save_file(first, folder / "a.safetensors")
    save_file(second, folder / "b.safetensors")
    weight_map = {k: "a.safetensors" for k in first} | {k: "b.safetensors" for k in second}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "config.json").write_text("{}")
    return folder, t


def block_bytes(folder, block) -> bytes:
    layout = block_layout(folder, block)
    return read_range(layout, 0, layout.total_bytes)


def test_the_block_file_holds_the_blocks_tensors_and_has_their_digest(checkpoint, tmp_path):
    folder, tensors = checkpoint
    digests = block_digests(folder, cache_path=tmp_path / "digests.json")
    for block in range(3):
        data = block_bytes(folder, block)
        path = tmp_path / f"block{block}.safetensors"
        path.write_bytes(data)
        loaded = load_file(path)
        assert sorted(loaded) == sorted(k for k in tensors if f".{block}." in k)
        assert all(torch.equal(loaded[k], tensors[k]) for k in loaded)
        assert file_block_digest(path, block) == digests[block]
        assert check_header(data, block, len(data)) == json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    layout = block_layout(folder, 1)
    assert len(layout.segments) == 3  # from both shards
    # any range reads the same bytes as the whole
    whole = block_bytes(folder, 1)
    assert b"".join(read_range(layout, o, 37) for o in range(0, len(whole), 37)) == whole
    assert block_layout(folder, 7) is None
    (folder / "b.safetensors").unlink()
    assert block_layout(folder, 1) is None and block_layout(folder, 2) is None and block_layout(folder, 0) is not None


def test_headers_that_are_not_a_blocks_canonical_one_are_refused(checkpoint):
    folder, _ = checkpoint
    data = block_bytes(folder, 0)
    length = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8 : 8 + length])
    with pytest.raises(WeightStreamError, match="not of block 1"):
        check_header(data, 1, len(data))
    with pytest.raises(WeightStreamError, match="fill"):
        check_header(data, 0, len(data) + 1)
    with pytest.raises(WeightStreamError, match="not a block's"):
        check_header(struct.pack("<Q", 1 << 40) + data[8:], 0, len(data))
    name = next(iter(header))
    for bad in ({"dtype": "F99"}, {"shape": [-1]}, {"data_offsets": [1, 2]}, {"data_offsets": "x"}):
        changed = {**header, name: {**header[name], **bad}}
        text = json.dumps(changed, sort_keys=True, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        with pytest.raises(WeightStreamError, match="bad entry"):
            check_header(struct.pack("<Q", len(text)) + text, 0, len(data))
    spaced = json.dumps(header, sort_keys=True).encode()  # valid JSON, not canonical
    spaced += b" " * (-len(spaced) % 8)
    with pytest.raises(WeightStreamError, match="canonical"):
        check_header(struct.pack("<Q", len(spaced)) + spaced, 0, len(data) - length + len(spaced))


def offer(peer, blocks, digest="d"):
    return PeerOffer(peer, f"127.0.0.1:{len(peer)}", {b: f"{digest}{b}" for b in blocks})


def test_a_digest_counts_only_with_two_distinct_peers_and_a_majority():
    offers = [offer("a", [0, 1, 2]), offer("b", [0, 1]), offer("c", [1], "x"), offer("d", [1], "x"),
              offer("e", [2], "x")]
    assert agreed_digests(offers, [0, 1, 2, 3]) == {0: "d0"}  # 1: a tie; 2: one peer each; 3: nobody
    assert agreed_digests([offer("a", [0]), offer("a", [0])], [0]) == {}  # one peer id twice is one peer
    assert agreed_digests([*offers, offer("f", [1])], [1]) == {1: "d1"}


def test_blocks_spread_over_peers_and_failures_mean_what_they_should():
    offers = [offer("a", range(4)), offer("b", range(4)), offer("c", [2, 3], "x")]
    plan = FetchPlan([0, 1, 2, 3], offers, agreed_digests(offers, range(4)))
    assert plan.take(offers[2]) is None  # it announces another digest
    assert (plan.take(offers[0]), plan.take(offers[1])) == (0, 1)
    plan.received(0, "a", 10)
    plan.broke(0, "a")  # a drops out; its bytes stay
    assert plan.take(offers[0]) is None and plan.partial == {0: 10}
    assert plan.take(offers[1]) == 0 and plan.resumed == [(0, 10, "b")]  # the broken one first, resumed
    plan.received(0, "b", 5)
    assert plan.mismatched(0) is None and plan.partial == {}  # two senders: nobody banned, fetched afresh
    plan.received(1, "b", 5)
    assert plan.mismatched(1) == "b" and plan.banned == {"b"}
    assert plan.stranded() == [0, 1, 2, 3] and not plan.complete
    plan.finished(2)
    assert 2 in plan.done and plan.stranded() == [0, 1, 3]


def test_the_token_bucket_holds_uploads_to_the_rate():
    bucket = TokenBucket(rate=1000, burst=500, now=0.0)
    assert bucket.reserve(500, 0.0) == 0.0
    assert bucket.reserve(250, 0.0) == pytest.approx(0.25)
    assert bucket.reserve(250, 1.0) == 0.0  # 0.75 s refilled 750: 500 left after
    assert bucket.reserve(1000, 1.0) == pytest.approx(0.75)


def test_a_folder_with_only_a_config_needs_peers_and_gets_a_cache_folder(checkpoint, tmp_path):
    folder, _ = checkpoint
    assert not needs_peers(folder, 3)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text('{"a": 1}')
    (bare / "tokenizer.json").write_text("{}")
    assert needs_peers(bare, 3)
    cache = peer_folder(bare, "org/model name", tmp_path / "cache")
    assert cache.parent == tmp_path / "cache" / "peer-weights" and cache.name.startswith("org_model_name-")
    assert sorted(p.name for p in cache.iterdir()) == ["config.json", "model.safetensors.index.json", "tokenizer.json"]
    assert held_blocks(cache) == []


class Call:
    """What a gRPC stream call offers the fetcher: iteration and cancel()."""

    def __init__(self, stream):  # noqa: ANN001
        self.stream, self.cancelled = stream, False

    def __aiter__(self):  # noqa: ANN204
        return self.stream.__aiter__()

    def cancel(self) -> None:
        self.cancelled = True


class FakePeer:
    """A Weights stream from ``folder``: honest, with flipped tensor bytes, or dying after ``die_after`` bytes."""

    def __init__(self, folder, *, corrupt=False, die_after=None):
        self.folder, self.corrupt, self.die_after, self.requests = folder, corrupt, die_after, []

    def Weights(self, request):  # noqa: N802
        self.requests.append((request.block, request.offset))
        return Call(self._stream(request))

    async def _stream(self, request):
        layout = block_layout(self.folder, request.block)
        offset, sent = request.offset, 0
        while offset < layout.total_bytes:
            if self.die_after is not None and sent >= self.die_after:
                raise ConnectionError("the peer died")
            data = bytearray(read_range(layout, offset, 64))
            if self.corrupt and offset + len(data) > len(layout.header):
                data[-1] ^= 1
            yield node_pb2.WeightsChunk(offset=offset, data=bytes(data), total_bytes=layout.total_bytes)
            offset += len(data)
            sent += len(data)
            await asyncio.sleep(0)


def run_fetch(dest, peers, blocks, digests):
    offers = [PeerOffer(name, "x:1", dict(digests)) for name in peers]

    async def stub_of(o):
        return peers[o.peer_id]

    return asyncio.run(fetch_blocks(dest, "m", blocks, offers, stub_of, max_block_bytes=1 << 20, stall_timeout=5))


def test_fetching_bans_a_liar_resumes_after_a_death_and_needs_agreement(checkpoint, tmp_path):
    folder, _ = checkpoint
    digests = block_digests(folder, cache_path=tmp_path / "digests.json")
    dest = tmp_path / "dest"
    dest.mkdir()
    peers = {"liar": FakePeer(folder, corrupt=True), "dying": FakePeer(folder, die_after=128),
             "honest": FakePeer(folder)}
    report = run_fetch(dest, peers, [0, 1, 2], digests)
    assert report.banned == {"liar"} and set(report.blocks.values()) == {"honest"}
    assert [(b, o) for b, o, p in report.resumed if p == "honest"] == [(1, 128)]  # dying's block, at its offset
    assert held_blocks(dest) == [0, 1, 2] and not list(dest.glob("*.part"))
    assert block_digests(dest, cache_path=tmp_path / "digests.json") == digests  # and the index names them all
    with pytest.raises(PeerFetchError, match="no two peers"):
        run_fetch(dest, {"honest": FakePeer(folder)}, [0], digests)
    # a digest list given with the config: one peer is enough, and a peer announcing other digests is not asked
    (tmp_path / "dest3").mkdir()
    offers = [PeerOffer("honest", "x:1", digests), PeerOffer("other", "x:2", {0: "0" * 64})]
    report = asyncio.run(fetch_blocks(tmp_path / "dest3", "m", [0], offers, lambda o: _return(FakePeer(folder)),
                                      max_block_bytes=1 << 20, trusted={0: digests[0], 5: "f" * 64}))
    assert report.blocks == {0: "honest"} and held_blocks(tmp_path / "dest3") == [0]
    (tmp_path / "dest2").mkdir()
    with pytest.raises(PeerFetchError, match="no peer left"):
        run_fetch(tmp_path / "dest2", {"liar": FakePeer(folder, corrupt=True), "liar2": FakePeer(folder, corrupt=True)},
                  [2], digests)
    assert held_blocks(tmp_path / "dest2") == [] and not list((tmp_path / "dest2").glob("*.part"))


async def _return(value):
    return value


def test_a_seeders_digest_list_is_read_back_and_bad_ones_refused(checkpoint, tmp_path):
    folder, _ = checkpoint
    path = write_digests(folder, tmp_path / "weight_digests.json", cache_path=tmp_path / "d.json")
    assert trusted_digests(tmp_path) == block_digests(folder, cache_path=tmp_path / "d.json")
    path.write_text('{"blocks": {"0": "abc"}}')
    with pytest.raises(ValueError, match="sha256"):
        trusted_digests(tmp_path)
    path.write_text("[]")
    with pytest.raises(ValueError, match="not a digest list"):
        trusted_digests(tmp_path)


class Aborted(Exception):
    pass


class FakeContext:
    async def abort(self, code, message):  # noqa: ANN001, ANN201
        raise Aborted(code, message)


def upload(uploader, block, offset=0, model="m"):  # noqa: ANN001, ANN201
    async def run():  # noqa: ANN202
        request = node_pb2.WeightsRequest(protocol_version=1, model=model, block=block, offset=offset)
        return [c async for c in uploader.stream(request, FakeContext())]

    return asyncio.run(run())


def test_uploads_send_the_block_file_and_refuse_what_they_cannot(checkpoint):
    folder, _ = checkpoint
    uploader = WeightUploader(folder, "m", rate=float("inf"))
    whole = block_bytes(folder, 1)
    chunks = upload(uploader, 1)
    assert b"".join(c.data for c in chunks) == whole and {c.total_bytes for c in chunks} == {len(whole)}
    assert b"".join(c.data for c in upload(uploader, 1, offset=100)) == whole[100:]
    for kwargs, code in (({"block": 9}, grpc.StatusCode.NOT_FOUND), ({"block": 1, "model": "other"},
                         grpc.StatusCode.NOT_FOUND), ({"block": 1, "offset": len(whole) + 1},
                                                      grpc.StatusCode.OUT_OF_RANGE)):
        with pytest.raises(Aborted) as e:
            upload(uploader, **kwargs)
        assert e.value.args[0] == code
    lying = WeightUploader(folder, "m", rate=float("inf"), corrupt=True)
    bad = b"".join(c.data for c in upload(lying, 1))
    header = block_layout(folder, 1).header
    assert bad[: len(header)] == header and all(a != b for a, b in zip(bad[len(header):], whole[len(header):], strict=True))
    with pytest.raises(Aborted, match="upload-limit 0"):
        upload(WeightUploader(folder, "m", rate=0), 1)
    uploader.stop("the machine is in use")
    with pytest.raises(Aborted, match="stopped uploading: the machine is in use"):
        upload(uploader, 1)


def test_an_upload_waits_while_compute_is_busy_and_keeps_to_its_rate(checkpoint):
    folder, _ = checkpoint
    busy = [3]

    def is_busy() -> bool:
        busy[0] -= 1
        return busy[0] >= 0

    uploader = WeightUploader(folder, "m", rate=float("inf"), busy=is_busy)
    assert b"".join(c.data for c in upload(uploader, 0)) == block_bytes(folder, 0)
    assert busy[0] < 0  # it asked until compute was idle
    big = folder.parent / "big"
    big.mkdir()
    save_file({"model.layers.0.w": torch.zeros(16384)}, big / "model.safetensors")  # 64 KiB
    total = len(block_bytes(big, 0))
    slow = WeightUploader(big, "m", rate=total)  # one block per second, a quarter of it at once: 0.75 s
    start = time.perf_counter()
    assert len(b"".join(c.data for c in upload(slow, 0))) == total
    assert 0.6 < time.perf_counter() - start < 3.0


def test_a_folder_with_only_a_config_passes_preflight_only_when_joining(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    check_model_path(str(tmp_path), from_peers=True)
    with pytest.raises(ConfigError, match="holds no block's weights .* join a swarm"):
        check_model_path(str(tmp_path))


def test_a_joining_node_looks_for_peers_again_until_they_serve(checkpoint, tmp_path, monkeypatch):
    folder, _ = checkpoint
    digests = block_digests(folder, cache_path=tmp_path / "digests.json")
    peers = {"a:1": FakePeer(folder), "b:1": FakePeer(folder), "c:1": FakePeer(folder, corrupt=True)}
    rounds = []

    async def discover(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        rounds.append(len(rounds))
        if len(rounds) == 1:
            return []  # the seeders are still loading
        if len(rounds) == 2:  # the liar and a seeder of block 0 alone: no two peers agree on blocks 1 and 2
            return [PeerOffer("c", "c:1", digests), PeerOffer("a", "a:1", {0: digests[0]})]
        return [PeerOffer(p[0], p, digests) for p in peers]

    class Channels:
        async def stub(self, address, *args):  # noqa: ANN001, ANN002, ANN202
            return peers[address]

    monkeypatch.setattr(peer_fetch, "discover", discover)
    dest = tmp_path / "dest"
    dest.mkdir()
    report = asyncio.run(peer_fetch.fetch_span(dest, None, Channels(), "m", 0, 3, me="x", max_block_bytes=1 << 20,
                                               wait=10, retry_every=0.01))
    assert held_blocks(dest) == [0, 1, 2] and "c" in report.banned and len(rounds) >= 3
    assert "c" not in report.blocks.values() and set(report.blocks) == {0, 1, 2}
    assert asyncio.run(peer_fetch.fetch_span(dest, None, Channels(), "m", 0, 3, me="x", max_block_bytes=1)) is None
    with pytest.raises(PeerFetchError, match="no two peers"):
        asyncio.run(peer_fetch.fetch_span(dest, None, Channels(), "m", 3, 4, me="x", max_block_bytes=1 << 20,
                                          wait=0.05, retry_every=0.01))


def test_partial_files_left_by_an_earlier_run_are_checked_and_resumed(checkpoint, tmp_path):
    folder, _ = checkpoint
    digests = block_digests(folder, cache_path=tmp_path / "digests.json")
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "block-00000.safetensors.part").write_bytes(block_bytes(folder, 0))  # complete, not yet checked
    wrong = bytearray(block_bytes(folder, 1))
    wrong[-1] ^= 1
    (dest / "block-00001.safetensors.part").write_bytes(wrong)  # complete, with a wrong byte
    (dest / "block-00002.safetensors.part").write_bytes(block_bytes(folder, 2)[:50])  # half a header
    peers = {"a": FakePeer(folder), "b": FakePeer(folder)}
    report = run_fetch(dest, peers, [0, 1, 2], digests)
    assert held_blocks(dest) == [0, 1, 2] and not report.banned  # who sent the earlier bytes is unknown
    requests = peers["a"].requests + peers["b"].requests
    assert 0 not in {block for block, _ in requests}  # only hashed
    assert sorted(r for r in requests if r[0] != 0) == [(1, 0), (2, 50)]  # 1 fetched again whole, 2 resumed
    assert block_digests(dest, cache_path=tmp_path / "d.json") == digests


def test_a_clients_files_are_uploaded_and_listed_with_their_digests(checkpoint, tmp_path):
    folder, tensors = checkpoint
    (folder / "tokenizer.json").write_text('{"model": {}}')
    uploader = WeightUploader(folder, "m", rate=float("inf"))
    request = node_pb2.WeightsRequest(protocol_version=1, model="m", file="head")

    async def run(request):  # noqa: ANN001, ANN202
        return b"".join([c.data async for c in uploader.stream(request, FakeContext())])

    head = asyncio.run(run(request))
    (tmp_path / "head.safetensors").write_bytes(head)
    assert sorted(load_file(tmp_path / "head.safetensors")) == ["lm_head.weight", "model.embed_tokens.weight"]
    request.file = "tokenizer.json"
    assert asyncio.run(run(request)) == (folder / "tokenizer.json").read_bytes()
    digests = uploader.file_digests()
    assert digests == {"head": hashlib.sha256(head).hexdigest(),
                       "tokenizer.json": hashlib.sha256((folder / "tokenizer.json").read_bytes()).hexdigest()}
    for name, code in (("config.json", grpc.StatusCode.INVALID_ARGUMENT), ("../x", grpc.StatusCode.INVALID_ARGUMENT),
                       ("generation_config.json", grpc.StatusCode.NOT_FOUND)):
        request.file = name
        with pytest.raises(Aborted) as e:
            asyncio.run(run(request))
        assert e.value.args[0] == code
    listed = json.loads(write_digests(folder, tmp_path / "w.json", cache_path=tmp_path / "d.json").read_text())
    assert listed["files"] == digests and set(listed["blocks"]) == {"0", "1", "2"}


def test_a_client_takes_a_file_only_with_a_digest_two_nodes_agree_on(tmp_path):
    assert _agreed({"a": {"head": "x"}, "b": {"head": "x"}, "c": {"head": "y"}}, "head") == "x"
    assert _agreed({"a": {"head": "x"}, "b": {"head": "y"}}, "head") is None
    assert _agreed({"a": {"head": "x"}}, "head") is None
    assert _agreed({"a": {"head": "x"}, "b": {}}, "tokenizer.json") is None
    (tmp_path / "config.json").write_text("{}")
    assert client_needs_peers(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    assert not client_needs_peers(tmp_path)


def test_upload_limit_on_the_command_line():
    from homeswarm.node.config import NodeConfig

    def rate(*args: str) -> float:
        return NodeConfig.from_args(["model", "--new-swarm", *args]).upload_rate()

    assert rate() == 20e6 and rate("--upload-limit", "0") == 0 and rate("--upload-limit", "500KiB") == 500 * 1024
    for bad in ("fast", "20", "0.5KB!"):
        with pytest.raises(ConfigError, match="--upload-limit"):
            rate("--upload-limit", bad)
