"""What `homeswarm demo` tells a new user last: a command that works in the shell they have."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from homeswarm.client.demo import join_hint, script_command, shown_path

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWBGeVDU6RWjU62wSHBu8SxcPN7iTm4V8PdZLu2sjXWcx9"


def test_scripts_are_named_by_path_unless_the_environment_is_active(tmp_path):
    bin_dir = Path(sys.executable).parent
    assert script_command("join-swarm", path=str(bin_dir)) == "join-swarm"  # an activated virtual environment
    other = tmp_path / "bin"
    other.mkdir()
    shown = script_command("join-swarm", path=str(other), cwd=str(bin_dir.parent.parent))
    assert shown == str((bin_dir / "join-swarm").absolute().relative_to(bin_dir.parent.parent.absolute()))
    assert script_command("join-swarm", path=str(other), cwd=str(tmp_path)) == str((bin_dir / "join-swarm").absolute())


def test_model_paths_are_shown_from_the_working_directory(tmp_path):
    assert shown_path(tmp_path / "model" / "demo", cwd=str(tmp_path)) == "model/demo"
    assert shown_path("/elsewhere/model", cwd=str(tmp_path)) == "/elsewhere/model"


def test_the_hint_adds_a_node_only_while_the_swarm_runs():
    running = join_hint(".venv/bin/join-swarm", "model/demo", [PEER], keep_running=True)
    assert f".venv/bin/join-swarm model/demo --initial-peers {PEER} --num-blocks 2" in running
    stopping = join_hint(".venv/bin/join-swarm", "model/demo", [PEER], keep_running=False)
    assert PEER not in stopping
    assert "--keep-running" in stopping and "make demo DEMO_ARGS=--keep-running" in stopping


def test_make_demo_passes_demo_args():
    if shutil.which("make") is None:
        pytest.skip("no make here")
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(["make", "-n", "-C", str(root), "demo", "DEMO_ARGS=--keep-running --nodes 2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert ".venv/bin/homeswarm demo --keep-running --nodes 2" in out.stdout
