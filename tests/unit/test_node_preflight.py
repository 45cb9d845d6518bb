"""node.preflight: join-swarm's checks of its files and settings before torch, hivemind and the DHT start."""

from __future__ import annotations

import json

import pytest

from homeswarm.node.config import ConfigError, NodeConfig
from homeswarm.node.preflight import check, check_model_path

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWBGeVDU6RWjU62wSHBu8SxcPN7iTm4V8PdZLu2sjXWcx9"


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "tiny"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "model.safetensors").write_bytes(b"")
    return folder


def config(*argv: str) -> NodeConfig:
    return NodeConfig.from_args(list(argv))


def test_a_good_folder_passes(model):
    assert check(config(str(model), "--initial-peers", PEER)) == config(str(model), "--initial-peers", PEER)


@pytest.mark.parametrize("case", ["missing", "misspelt", "file", "no_config", "bad_config", "no_weights"])
def test_model_folders_that_cannot_serve(case, model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path, expected = {
        "missing": (str(tmp_path / "nothing"), "model directory not found"),
        "misspelt": ("tinyy", "model directory not found"),
        "file": (str(model / "config.json"), "is not a folder"),
        "no_config": (str(model), "no config.json"),
        "bad_config": (str(model), "is not a checkpoint config"),
        "no_weights": (str(model), "holds no block's weights"),
    }[case]
    if case == "no_config":
        (model / "config.json").unlink()
    if case == "bad_config":
        (model / "config.json").write_text("[1, 2")
    if case == "no_weights":
        (model / "model.safetensors").unlink()
    with pytest.raises(ConfigError, match=expected):
        check_model_path(path)


def test_gguf_files(tmp_path):
    with pytest.raises(ConfigError, match="GGUF file not found"):
        check_model_path(str(tmp_path / "model.gguf"))
    (tmp_path / "junk.gguf").write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(ConfigError, match="is not a GGUF file"):
        check_model_path(str(tmp_path / "junk.gguf"))
    (tmp_path / "model-00001-of-00002.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    check_model_path(str(tmp_path / "model-00001-of-00002.gguf"))  # its parts are checked once torch loads


def test_hub_ids_and_snapshots_are_left_to_the_download(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    check_model_path("owner/name")  # no folder "owner" here: a repository id
    (tmp_path / "owner").mkdir()
    with pytest.raises(ConfigError, match="not found"):
        check_model_path("owner/name")  # a folder "owner" here: a mistyped path
    snapshot = tmp_path / "models--owner--name" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    check_model_path(str(snapshot))  # downloads the shards it lacks


@pytest.mark.parametrize(("argv", "expected"), [
    (["--max-memory", "1MiB"], r"--max-memory 1MiB is less than the node's runtime alone"),
    (["--max-memory", "4"], r"a number without a unit is bytes"),
    (["--identity", "/nonexistent-folder/id.key"], r"--identity .*cannot create it"),
])  # fmt: skip
def test_settings_that_cannot_work(argv, expected, model):
    with pytest.raises(ConfigError, match=expected):
        check(config(str(model), "--new-swarm", *argv))


def test_small_budgets_with_a_stated_runtime_pass(model):
    check(config(str(model), "--new-swarm", "--max-memory", "64MiB", "--fixed-cost", "0"))



def test_the_model_folder_may_follow_the_peers(model):
    c = config("--initial-peers", PEER, str(model), "--blocks", "0:1")
    assert c.model_dir == str(model) and c.initial_peers == (PEER,)
    assert config("--initial-peers", f"{PEER},{PEER}", str(model)).initial_peers == (PEER, PEER)



def test_the_cli_copies_of_model_and_routing_constants_agree():
    from homeswarm.model import quant
    from homeswarm.node import config as node_config
    from homeswarm.routing import block_chooser

    assert node_config.QUANT_FORMATS == quant.QUANT_FORMATS
    assert node_config.INT4_GROUP_SIZES == quant.INT4_GROUP_SIZES
    assert node_config.DEFAULT_INT4_GROUP_SIZE == quant.DEFAULT_INT4_GROUP_SIZE
    assert node_config.DEFAULT_IMBALANCE == block_chooser.DEFAULT_IMBALANCE


def test_an_identity_file_keeps_the_peer_id(tmp_path):
    from homeswarm.routing.signing import NodeKey

    path = tmp_path / "node.key"
    first = NodeKey.load_or_create(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert NodeKey.load_or_create(path).peer_id == first.peer_id
    path.write_bytes(b"not a key")
    with pytest.raises(ValueError, match="is not a peer identity file"):
        NodeKey.load_or_create(path)


def test_help_groups_the_options():
    text = NodeConfig.parser().format_help()
    sections = {title: text.index(f"\n{title}:\n") for title in
                ("the swarm and the network", "the model", "blocks and memory", "serving only while the PC is idle",
                 "compute", "sessions and limits")}
    assert list(sections.values()) == sorted(sections.values())
    swarm = text[sections["the swarm and the network"]:sections["the model"]]
    assert "--initial-peers" in swarm and "--identity" in swarm and "--max-memory" not in swarm
    compute = text[sections["compute"]:sections["sessions and limits"]]
    assert "--max-threads" in compute and "--compute-threads" in compute
