"""Only your slice of the model on disk: real daemons on 127.0.0.1 serving a sharded checkpoint from folders
that hold only their own shards, and from a fake hub on 127.0.0.1 (tests/helpers/fake_hub.py) that records
every request: a node downloads only its blocks' shards and, restarted, none; a client only the head's;
greedy output equals transformers' on the full checkpoint.

One swarm for the module: a bootstrap peer, and nodes for blocks 0..1 and 2..3 from partial folders, all
under the model name ``test/tiny`` (the hub repository's id, which a node or client given the id uses).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.model.digest import block_digests, span_digest
from homeswarm.model.hub import HubSnapshot, fetch_checkpoint_info, fetch_span_files, head_files, span_files
from homeswarm.routing.dht import SwarmDHT
from tests.helpers.checkpoints import make_checkpoint, reference_greedy
from tests.helpers.fake_hub import FakeHub

pytestmark = pytest.mark.timeout(300)

REPO = "test/tiny"
INDEX = "model.safetensors.index.json"
NUM_LAYERS = 4
PROMPT = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
NEW_TOKENS = 12
# one compute thread per daemon (2 cores here); progress bars off in the daemons' logs
NODE_ARGS = ("--compute-threads", "1", "--throughput", "100")
HUB_ENV = {"HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    # 80 KB shards: 12 files, some holding two blocks' tensors (or block 3 and the final norm)
    return make_checkpoint(tmp_path_factory.mktemp("full") / "tiny", "llama2", num_layers=NUM_LAYERS,
                           max_shard_size="80KB", seed=3)


def partial_copy(full: Path, dest: Path, files: list[str]) -> Path:
    dest.mkdir(parents=True)
    for name in ("config.json", INDEX, *files):
        shutil.copy2(full / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def folders(full, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("partial")
    return {"a": partial_copy(full, root / "a", span_files(full, 0, 2)),
            "b": partial_copy(full, root / "b", span_files(full, 2, 4)),
            "client": partial_copy(full, root / "client", [*head_files(full), "generation_config.json"])}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def expected(full) -> list[int]:
    return reference_greedy(full, PROMPT, NEW_TOKENS)[0].tolist()


@pytest.fixture(scope="module")
def hub(full):
    with FakeHub({REPO: full}) as hub:
        yield hub


@pytest.fixture(scope="module")
def swarm(hub, folders, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm"), env={**HUB_ENV, "HF_ENDPOINT": hub.endpoint}) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(folders[part], "--blocks", blocks, "--model-name", REPO, *NODE_ARGS, wait=False)
                 for part, blocks in (("a", "0:2"), ("b", "2:4"))]
        for node in nodes:
            swarm.wait_ready(node, timeout=180)
        yield swarm


def announced_weights(swarm: LocalSwarm) -> dict[tuple[int, int], set[str]]:
    dht = SwarmDHT.create(swarm.initial_peers, client_mode=True)
    try:
        records = dht.get_servers(REPO, 0, NUM_LAYERS)
    finally:
        dht.shutdown()
    out: dict[tuple[int, int], set[str]] = {}
    for r in records:
        out.setdefault((r.start, r.end), set()).add(r.weights)
    return out


def test_partial_folders_serve_and_generate_like_transformers(swarm, full, folders, expected, caplog):
    assert sorted(p.name for p in folders["client"].glob("*.safetensors")) == head_files(full)
    with caplog.at_level("INFO", logger="homeswarm.client.route"):
        model = AutoDistributedModelForCausalLM.from_pretrained(folders["client"], initial_peers=swarm.initial_peers,
                                                                model_name=REPO, config=ClientConfig())
    try:
        assert model.routes.weights == {}  # the client's shards hold no block in full
        assert sum("holds no block's tensors" in r.getMessage() for r in caplog.records) == 1
        got = model.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert got[0].tolist() == expected
        with model.inference_session(max_length=8) as session:
            assert [(a, b) for _, a, b in session.route] == [(0, 2), (2, 4)]
    finally:
        model.close()
    # each node announced the digest of its blocks as the full checkpoint has them
    digests = block_digests(full)
    assert announced_weights(swarm) == {(0, 2): {span_digest(digests, 0, 2)}, (2, 4): {span_digest(digests, 2, 4)}}


def error_line(result: subprocess.CompletedProcess[str], prog: str) -> str:
    """Exit code 2, no traceback, and exactly one ``PROG: error: ...`` line: that line."""
    assert result.returncode == 2, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if re.match(rf"{prog}( \w+)?: error: ", line)]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


def run_together(*argvs: list[str], env: dict[str, str] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Run the commands at once (each is mostly Python starting up), each bounded by a timeout."""
    processes = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                                  stdin=subprocess.DEVNULL) for argv in argvs]
    results = []
    try:
        for argv, process in zip(argvs, processes, strict=True):
            out, err = process.communicate(timeout=120)
            results.append(subprocess.CompletedProcess(argv, process.returncode, out, err))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait()
    return results


def test_a_partial_folder_refuses_blocks_it_lacks(folders):
    outside, unchosen = run_together(
        [*console_script("join-swarm"), str(folders["a"]), "--blocks", "1:3", "--new-swarm"],
        [*console_script("join-swarm"), str(folders["a"]), "--new-swarm"])
    line = error_line(outside, "join-swarm")
    assert "block(s) 2" in line and "model-00007-of-00012.safetensors" in line, line
    assert "holds the shards of blocks 0:2 only (of 4)" in error_line(unchosen, "join-swarm")


def test_a_node_downloads_only_its_shards_and_a_restart_nothing(swarm, hub, full, tmp_path):
    hub.clear()
    args = ("--blocks", "2:4", "--cache-dir", str(tmp_path / "hub-cache"), *NODE_ARGS)
    node = swarm.start_node(REPO, *args, timeout=180)
    assert node.info is not None and node.info["model"] == REPO and node.info["blocks"] == [2, 4]
    assert sorted(hub.gets(REPO)) == sorted(["config.json", INDEX, *span_files(full, 2, 4)])
    snapshot = next((tmp_path / "hub-cache").glob("models--test--tiny/snapshots/*"))
    assert sorted(p.name for p in snapshot.iterdir()) == sorted(["config.json", INDEX, *span_files(full, 2, 4)])
    assert LocalSwarm.stop(node) == 0
    swarm.nodes.remove(node)
    hub.clear()
    again = swarm.start_node(REPO, *args, timeout=180)
    assert again.info is not None and again.info["blocks"] == [2, 4]
    assert hub.gets() == []  # nothing downloaded: only a HEAD of config.json (which commit main is at)
    assert {r.file for r in hub.requests} <= {"config.json"}


def test_a_client_from_the_hub_downloads_only_the_head(swarm, hub, full, folders, expected, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    for name, value in HUB_ENV.items():
        monkeypatch.setenv(name, value)
    # blocks 2..3 now only from the node that downloaded its shards from the hub
    for node in [n for n in swarm.nodes if str(folders["b"]) in n.process.args]:
        assert LocalSwarm.stop(node) == 0
        swarm.nodes.remove(node)
    hub.clear()
    cache = tmp_path / "client-cache"
    model = AutoDistributedModelForCausalLM.from_pretrained(REPO, initial_peers=swarm.initial_peers, cache_dir=cache)
    try:
        assert model.model_name == REPO
        assert sorted(hub.gets(REPO)) == sorted(["config.json", INDEX, "generation_config.json", *head_files(full)])
        assert model.generate(PROMPT, max_new_tokens=NEW_TOKENS)[0].tolist() == expected
        hub_node = next(n.info["address"] for n in swarm.nodes if n.process.args[len(console_script("join-swarm"))]
                        == REPO)
        with model.inference_session(max_length=8) as session:
            assert [(address == hub_node, a, b) for address, a, b in session.route] == [(False, 0, 2), (True, 2, 4)]
    finally:
        model.close()
    # the command line, with the files in its cache: the same tokens, nothing downloaded
    hub.clear()
    result = subprocess.run(
        [*console_script("homeswarm"), "generate", REPO, "--cache-dir", str(cache), "--initial-peers",
         *swarm.initial_peers, "--prompt-ids", ",".join(map(str, PROMPT[0].tolist())), "--max-new-tokens",
         str(NEW_TOKENS), "--json"], capture_output=True, text=True, timeout=120, env=swarm.env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)["token_ids"] == expected[PROMPT.shape[1]:]
    assert hub.gets() == []


def test_a_repository_the_hub_lacks_is_one_line_of_error(swarm, hub):
    progs = ("homeswarm", "join-swarm")
    results = run_together(
        [*console_script("homeswarm"), "generate", "nobody/nothing", "--initial-peers", *swarm.initial_peers,
         "--prompt-ids", "1,2"],
        [*console_script("join-swarm"), "nobody/nothing", "--new-swarm"], env=swarm.env)
    for prog, result in zip(progs, results, strict=True):
        line = error_line(result, prog)
        assert "nobody/nothing is neither a folder here nor a repository on http://127.0.0.1:" in line, line


def test_an_interrupted_download_resumes_where_it_stopped(hub, full, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "DOWNLOAD_CHUNK_SIZE", 4096)  # so that a part arrives
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    snapshot = fetch_checkpoint_info(REPO, cache_dir=tmp_path, endpoint=hub.endpoint)
    assert HubSnapshot.of(snapshot) == HubSnapshot(REPO, hub.commits[REPO], tmp_path)
    shard = span_files(full, 1, 2)[-1]
    hub.cut[shard] = 20_000
    hub.clear()
    fetch_span_files(snapshot, 1, 2, endpoint=hub.endpoint)
    ranges = [r.range for r in hub.requests if r.method == "GET" and r.file == shard]
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")
    assert 0 < int(ranges[1][len("bytes="):-1]) <= 20_000
    assert (snapshot / shard).read_bytes() == (full / shard).read_bytes()
