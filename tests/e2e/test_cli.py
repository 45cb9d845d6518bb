"""The interface contract of DESIGN.md, driven through the console scripts as a user would.

`homeswarm dht`, `join-swarm` and `homeswarm generate` run as real subprocesses on 127.0.0.1: ready
files, `generate --json` against transformers, text prompts through tokenizer.json, exit codes and
messages for bad input, gRPC reflection, a one-node `--new-swarm`, SIGINT. One swarm (a bootstrap
peer and two nodes) serves the whole module; every subprocess carries a marker in its environment,
so a test can check that nothing it started (p2pd included) outlives it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from pathlib import Path

import grpc
import pytest
import torch
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from homeswarm.client.local_swarm import LocalSwarm, console_script
from tests.helpers.checkpoints import make_checkpoint, reference_greedy, reference_model

NUM_LAYERS = 4
VOCAB = 256
MODEL_NAME = "e2e-served"  # the swarm's nodes serve under this name, not the folder's
PROMPT_IDS = [5, 17, 42, 99, 3, 250, 128, 7]
MARK = "HOMESWARM_E2E_MARK"
CONTRACT_KEYS = {"peer_id", "dht_maddrs", "address", "model", "blocks"}


# --- helpers -------------------------------------------------------------------------------------


def processes_marked(mark: str) -> list[str]:
    """Command lines of live processes (zombies excluded) whose environment carries ``MARK=mark``."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle not in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                continue
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            if state != "Z":
                found.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            continue
    return found


def reap_marked(mark: str, grace: float = 5.0) -> list[str]:
    """Wait up to ``grace`` s for the processes carrying ``mark`` to end; kill (by pid) and name any left."""
    deadline = time.monotonic() + grace
    while (left := processes_marked(mark)) and time.monotonic() < deadline:
        time.sleep(0.1)
    if left:
        # a daemon SIGKILLed by a timeout orphans hivemind's DHT process and p2pd: never leave them running
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if f"{MARK}={mark}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
            except OSError:
                continue
    return left


def run_cli(script: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a console script to completion; assert it left no process (p2pd included) behind.

    The test fails if it has not exited within ``timeout``: a hang fails, a slow start does not (with one
    core kept busy by another process, a usage error took up to 5 s, an unreachable peer up to 9 s)."""
    mark = uuid.uuid4().hex
    argv = [*console_script(script), *map(str, args)]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, MARK: mark, "HOMESWARM_LOG_LEVEL": "WARNING"}, start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.terminate()  # SIGTERM first, so that the daemon stops its own children
        try:
            stdout, stderr = process.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            stdout, stderr = process.communicate()
        reap_marked(mark)
        pytest.fail(f"{script} {' '.join(map(str, args))} still running after {timeout} s:\n{stderr[-3000:]}")
    left = reap_marked(mark)
    assert not left, f"{script} {' '.join(map(str, args))} left processes behind: {left}"
    return subprocess.CompletedProcess(argv, process.returncode, stdout, stderr)


def assert_usage_error(result: subprocess.CompletedProcess[str], prog: str, pattern: str) -> None:
    """Exit code 2, no traceback, and exactly one `PROG: error: ...` line, matching ``pattern``.

    argparse's own errors name the subcommand too (`homeswarm generate: error: ...`)."""
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if re.match(rf"{prog}( \w+)?: error: ", line)]
    assert len(errors) == 1, result.stderr
    assert re.search(pattern, errors[0]), errors[0]
    assert result.stdout == ""


def generate_json(model_dir: Path, peers: list[str], *args: str, timeout: float = 90) -> dict:
    result = run_cli("homeswarm", "generate", model_dir, "--initial-peers", *peers, "--json", *args, timeout=timeout)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1, result.stdout
    out = json.loads(lines[0])
    speculative = {"acceptance_rate"} if "--speculative" in args else set()
    assert set(out) == {"token_ids", "text", "seconds", "tokens_per_s"} | speculative
    assert isinstance(out["seconds"], float) and out["seconds"] > 0
    assert isinstance(out["tokens_per_s"], float) and out["tokens_per_s"] > 0
    return out


def byte_level_tokenizer() -> Tokenizer:
    """A byte-level BPE with no merges: exactly 256 tokens, one per byte, so any text encodes."""
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    assert len(vocab) == VOCAB
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llama3", "llama3", num_layers=NUM_LAYERS, seed=11)


@pytest.fixture(scope="module")
def ref(ckpt):
    return reference_model(ckpt)


@pytest.fixture(scope="module")
def swarm(ckpt, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        nodes = [swarm.start_node(ckpt, "--model-name", MODEL_NAME, "--blocks", blocks, "--compute-threads", "1",
                                  wait=False)
                 for blocks in ("0:2", "2:4")]
        for node in nodes:
            swarm.wait_ready(node, timeout=180)
        yield swarm


@pytest.fixture(scope="module")
def tokenized_ckpt(ckpt, tmp_path_factory) -> Path:
    """A copy of the checkpoint with a tokenizer.json (same weights, so the swarm serves it)."""
    path = tmp_path_factory.mktemp("tok") / "with-tokenizer"
    shutil.copytree(ckpt, path)
    byte_level_tokenizer().save(str(path / "tokenizer.json"))
    return path


# --- ready files ---------------------------------------------------------------------------------


def test_dht_ready_file_has_peer_id_and_maddrs(swarm):
    info = json.loads(swarm.bootstrap.ready_file.read_text())
    assert set(info) == {"peer_id", "dht_maddrs"}
    assert isinstance(info["peer_id"], str) and info["peer_id"]
    assert info["dht_maddrs"] and all(
        m.startswith("/ip4/127.0.0.1/tcp/") and m.endswith("/p2p/" + info["peer_id"]) for m in info["dht_maddrs"]
    )


def test_node_ready_files_follow_the_contract(swarm):
    infos = [json.loads(node.ready_file.read_text()) for node in swarm.nodes[:2]]
    for info, blocks in zip(infos, ([0, 2], [2, 4]), strict=True):
        assert set(info) == CONTRACT_KEYS
        assert info["model"] == MODEL_NAME  # --model-name overrides the folder's name
        assert info["blocks"] == blocks
        host, _, port = info["address"].rpartition(":")
        assert host == "127.0.0.1" and 0 < int(port) < 65536
        assert info["dht_maddrs"] and all(m.endswith("/p2p/" + info["peer_id"]) for m in info["dht_maddrs"])
    assert len({i["peer_id"] for i in infos}) == 2
    assert len({i["address"] for i in infos}) == 2
    assert swarm.bootstrap.info["peer_id"] not in {i["peer_id"] for i in infos}


# --- generate ------------------------------------------------------------------------------------


def test_generate_json_matches_transformers(swarm, ckpt, ref):
    expected = reference_greedy(ckpt, torch.tensor([PROMPT_IDS]), 12, model=ref)[0, len(PROMPT_IDS):].tolist()
    out = generate_json(ckpt, swarm.initial_peers, "--model-name", MODEL_NAME,
                        "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "12")
    assert out["token_ids"] == expected
    assert out["text"] == ""  # no tokenizer.json


@pytest.mark.parametrize("speculative", ["prompt-lookup", "draft:{ckpt}"])
def test_generate_speculative_matches_transformers(swarm, ckpt, ref, speculative):
    expected = reference_greedy(ckpt, torch.tensor([PROMPT_IDS]), 12, model=ref)[0, len(PROMPT_IDS):].tolist()
    out = generate_json(ckpt, swarm.initial_peers, "--model-name", MODEL_NAME, "--max-new-tokens", "12",
                        "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--speculative", speculative.format(ckpt=ckpt))
    assert out["token_ids"] == expected
    assert 0 <= out["acceptance_rate"] <= 1


def test_generate_through_a_nodes_maddrs(swarm, ckpt, ref):
    # any node's dht_maddrs work as --initial-peers, not only the bootstrap peer's
    peers = swarm.nodes[1].info["dht_maddrs"]
    expected = reference_greedy(ckpt, torch.tensor([[1, 2, 3]]), 5, model=ref)[0, 3:].tolist()
    out = generate_json(ckpt, peers, "--model-name", MODEL_NAME, "--prompt-ids", "1, 2, 3", "--max-new-tokens", "5")
    assert out["token_ids"] == expected


def test_sampling_is_seeded_and_within_top_k(swarm, ckpt, ref):
    args = ("--model-name", MODEL_NAME, "--prompt-ids", ",".join(map(str, PROMPT_IDS)), "--max-new-tokens", "10",
            "--temperature", "0.8", "--top-k", "5", "--seed", "3")
    a = generate_json(ckpt, swarm.initial_peers, *args)["token_ids"]
    b = generate_json(ckpt, swarm.initial_peers, *args)["token_ids"]
    assert a == b
    assert len(a) == 10 and all(0 <= t < VOCAB for t in a)
    full = torch.tensor([PROMPT_IDS + a])
    with torch.no_grad():
        logits = ref(full).logits[0, len(PROMPT_IDS) - 1 : -1]
    top5 = logits.topk(5, dim=-1).indices.tolist()
    assert all(t in top5[i] for i, t in enumerate(a))


def test_prompt_text_through_tokenizer_json(swarm, tokenized_ckpt, ref):
    tokenizer = Tokenizer.from_file(str(tokenized_ckpt / "tokenizer.json"))
    prompt = "ROMEO:\n"
    ids = tokenizer.encode(prompt).ids
    assert ids == [tokenizer.token_to_id(ch) for ch in "ROMEO:\u010a"]  # one token per byte; \n is 'Ċ'
    expected = reference_greedy(tokenized_ckpt, torch.tensor([ids]), 12, model=ref)[0, len(ids):].tolist()
    text = tokenizer.decode(expected)
    # the new bytes include a character split across tokens (its prefix decodes to U+FFFD), so printing
    # each step's text as it comes would show garbage the final text does not contain
    prefixes = [tokenizer.decode(expected[:k]) for k in range(1, len(expected) + 1)]
    assert any(not text.startswith(p) for p in prefixes), "this checkpoint no longer exercises split characters"

    out = generate_json(tokenized_ckpt, swarm.initial_peers, "--model-name", MODEL_NAME, "--prompt", prompt,
                        "--max-new-tokens", "12")
    assert out["token_ids"] == expected
    assert out["text"] == text

    # without --json the text is streamed to stdout, then a newline; the stats go to stderr
    result = run_cli("homeswarm", "generate", tokenized_ckpt, "--initial-peers", *swarm.initial_peers,
                     "--model-name", MODEL_NAME, "--prompt", prompt, "--max-new-tokens", "12", timeout=90)
    assert result.returncode == 0, result.stderr
    assert result.stdout == text + "\n"
    assert re.search(r"\[12 tokens in [\d.]+ s, [\d.]+ tokens/s\]", result.stderr), result.stderr


def test_prompt_without_tokenizer_json_asks_for_ids(swarm, ckpt):
    result = run_cli("homeswarm", "generate", ckpt, "--initial-peers", *swarm.initial_peers, "--prompt", "hi")
    assert_usage_error(result, "homeswarm", r"tokenizer\.json.*--prompt-ids")


def test_unserved_model_name_exits_1_naming_the_blocks(swarm, ckpt):
    result = run_cli("homeswarm", "generate", ckpt, "--initial-peers", *swarm.initial_peers, "--model-name", "nope",
                     "--prompt-ids", "1,2,3", "--max-new-tokens", "2")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        f"homeswarm: error: no server in the swarm serves block(s) 0:{NUM_LAYERS} of model 'nope'"
    )


def test_unreachable_peer_exits_1_without_traceback(ckpt):
    # a well-formed multiaddr where nobody listens
    dead = "/ip4/127.0.0.1/tcp/1/p2p/12D3KooWBGeVDU6RWjU62wSHBu8SxcPN7iTm4V8PdZLu2sjXWcx9"
    result = run_cli("homeswarm", "generate", ckpt, "--initial-peers", dead, "--prompt-ids", "1")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(
        "homeswarm: error: could not join the swarm through --initial-peers: "
    ), result.stderr


def test_default_model_name_is_the_folder_name(swarm, ckpt):
    # the swarm serves MODEL_NAME, so without --model-name the client looks for 'tiny-llama3' and finds nothing
    result = run_cli("homeswarm", "generate", ckpt, "--initial-peers", *swarm.initial_peers,
                     "--prompt-ids", "1", "--max-new-tokens", "1", timeout=30)
    assert result.returncode == 1, result.stderr
    assert "of model 'tiny-llama3'" in result.stderr


# --- bad input -----------------------------------------------------------------------------------

GENERATE_BAD_INPUT = {
    "missing_model_dir": (["{missing}", "--prompt-ids", "1,2"], r"no config\.json"),
    "malformed_ids": (["{ckpt}", "--prompt-ids", "1,x"], r"--prompt-ids must be comma-separated integers"),
    "empty_ids": (["{ckpt}", "--prompt-ids", ","], r"--prompt-ids is empty"),
    "id_out_of_vocab": (["{ckpt}", "--prompt-ids", f"1,{VOCAB}"], rf"prompt ids must be in 0\.\.{VOCAB - 1}"),
    "negative_id": (["{ckpt}", "--prompt-ids", "1,-3"], rf"prompt ids must be in 0\.\.{VOCAB - 1}"),
    "zero_new_tokens": (["{ckpt}", "--prompt-ids", "1", "--max-new-tokens", "0"], r"--max-new-tokens"),
    "top_p_above_1": (["{ckpt}", "--prompt-ids", "1", "--top-p", "2"], r"--top-p"),
    "top_k_zero": (["{ckpt}", "--prompt-ids", "1", "--top-k", "0"], r"--top-k"),
    "negative_temperature": (["{ckpt}", "--prompt-ids", "1", "--temperature", "-0.5"], r"--temperature"),
    "prompt_and_ids": (["{ckpt}", "--prompt", "a", "--prompt-ids", "1"], r"not allowed with"),
    "no_weights": (["{no_weights}", "--prompt-ids", "1"], r"no model\.safetensors"),
    "bad_speculative": (["{ckpt}", "--prompt-ids", "1", "--speculative", "guess"],
                        r"--speculative takes prompt-lookup or draft:DIR"),
    "missing_draft_model": (["{ckpt}", "--prompt-ids", "1", "--speculative", "draft:{missing}"], r"no config\.json"),
    "malformed_peer": (["{ckpt}", "--prompt-ids", "1", "--initial-peers", "garbage"], r"--initial-peers.*'garbage'"),
}


@pytest.mark.parametrize("case", GENERATE_BAD_INPUT, ids=list(GENERATE_BAD_INPUT))
def test_generate_bad_input_exits_2(case, swarm, ckpt, tmp_path):
    args, pattern = GENERATE_BAD_INPUT[case]
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(ckpt / "config.json", no_weights)
    args = [a.format(missing=tmp_path / "missing", ckpt=ckpt, no_weights=no_weights) for a in args]
    if "--initial-peers" not in args:
        args += ["--initial-peers", *swarm.initial_peers]
    result = run_cli("homeswarm", "generate", *args)
    assert_usage_error(result, "homeswarm", pattern)


JOIN_BAD_INPUT = {
    "neither_new_swarm_nor_peers": (["{ckpt}"], r"exactly one of --new-swarm or --initial-peers"),
    "both_new_swarm_and_peers": (["{ckpt}", "--new-swarm", "--initial-peers", "{peer}"],
                                 r"exactly one of --new-swarm or --initial-peers"),
    "reversed_blocks": (["{ckpt}", "--initial-peers", "{peer}", "--blocks", "5:2"], r"--blocks A:B needs 0 <= A < B"),
    "malformed_blocks": (["{ckpt}", "--initial-peers", "{peer}", "--blocks", "1-3"], r"--blocks must be A:B"),
    "blocks_beyond_model": (["{ckpt}", "--initial-peers", "{peer}", "--blocks", "0:99"],
                            rf"the model has only {NUM_LAYERS} blocks"),
    "blocks_and_num_blocks": (["{ckpt}", "--initial-peers", "{peer}", "--blocks", "0:2", "--num-blocks", "2"],
                              r"at most one of --blocks"),
    "zero_num_blocks": (["{ckpt}", "--initial-peers", "{peer}", "--num-blocks", "0"],
                        r"--num-blocks must be at least 1"),
    "missing_model_dir": (["{missing}", "--new-swarm"], r"not found|no config\.json|does not exist"),
    "bad_dtype": (["{ckpt}", "--new-swarm", "--dtype", "float8"], r"argument --dtype: invalid choice"),
    "bad_public_address": (["{ckpt}", "--new-swarm", "--public-address", "nohost"], r"--public-address"),
    "bad_port": (["{ckpt}", "--new-swarm", "--port", "70000"], r"ports must be in"),
    "quant_of_ternary_weights": (["{bitnet}", "--new-swarm", "--quant", "int8"], r"ternary already.*--quant none"),
}


@pytest.mark.parametrize("case", JOIN_BAD_INPUT, ids=list(JOIN_BAD_INPUT))
def test_join_swarm_bad_input_exits_2(case, swarm, ckpt, tmp_path):
    args, pattern = JOIN_BAD_INPUT[case]
    if "{bitnet}" in args:
        from tests.helpers.bitnet_checkpoints import make_bitnet_checkpoint

        make_bitnet_checkpoint(tmp_path / "bitnet", num_layers=2)
    args = [a.format(missing=tmp_path / "missing", ckpt=ckpt, peer=swarm.initial_peers[0], bitnet=tmp_path / "bitnet")
            for a in args]
    ready = tmp_path / "ready.json"
    result = run_cli("join-swarm", *args, "--ready-file", ready)
    assert_usage_error(result, "join-swarm", pattern)
    assert not ready.exists()


# --- the daemons themselves ----------------------------------------------------------------------


def test_grpc_reflection_lists_the_node_service(swarm):
    with swarm.channel(swarm.nodes[0]) as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        services = ProtoReflectionDescriptorDatabase(channel).get_services()
    assert "homeswarm.v1.Node" in services
    assert "grpc.reflection.v1alpha.ServerReflection" in services


def test_new_swarm_single_node_serves_all_blocks_and_exits_0_on_sigint(ckpt, ref, tmp_path):
    mark = uuid.uuid4().hex
    ready = tmp_path / "solo.ready.json"
    log = tmp_path / "solo.log"
    with open(log, "wb") as log_file:
        process = subprocess.Popen(
            [*console_script("join-swarm"), str(ckpt), "--new-swarm", "--host", "127.0.0.1", "--port", "0",
             "--compute-threads", "1", "--shutdown-grace", "3", "--ready-file", str(ready)],
            stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, MARK: mark}, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        info = json.loads(ready.read_text())
        assert set(info) == CONTRACT_KEYS
        assert info["model"] == "tiny-llama3"  # the checkpoint folder's name
        assert info["blocks"] == [0, NUM_LAYERS]

        expected = reference_greedy(ckpt, torch.tensor([PROMPT_IDS]), 12, model=ref)[0, len(PROMPT_IDS):].tolist()
        out = generate_json(ckpt, info["dht_maddrs"], "--prompt-ids", ",".join(map(str, PROMPT_IDS)),
                            "--max-new-tokens", "12")
        assert out["token_ids"] == expected

        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=60) == 0, log.read_text()
        assert "Traceback" not in log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    left = reap_marked(mark)
    assert not left, f"join-swarm left processes behind: {left}"


def test_dht_exits_0_on_sigint_and_stops_p2pd(tmp_path):
    mark = uuid.uuid4().hex
    ready = tmp_path / "dht.ready.json"
    process = subprocess.Popen(
        [*console_script("homeswarm"), "dht", "--ready-file", str(ready)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True,
        env={**os.environ, MARK: mark}, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ready.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert set(json.loads(ready.read_text())) == {"peer_id", "dht_maddrs"}
        assert len(processes_marked(mark)) >= 2  # the CLI and its p2pd
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=15) == 0
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        process.stderr.close()
    left = reap_marked(mark)
    assert not left, f"homeswarm dht left processes behind: {left}"
