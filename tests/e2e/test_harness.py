"""The test harness itself: a run leaves nothing in the temporary folder, and a killed run (a CI
time-out, SIGKILL) leaves no daemon behind, and no folder that the next run does not remove.

Each test runs tests/e2e/harness_victim.py in a pytest of its own with TMPDIR set to a fresh folder:
the victim starts a bootstrap peer through LocalSwarm and a `homeswarm dht` in a session of its own,
as suite tests do, and reports their processes (p2pd included) and sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.helpers.scratch import remove_stale

pytestmark = pytest.mark.timeout(150)

ROOT = Path(__file__).resolve().parents[2]
VICTIM = "tests/e2e/harness_victim.py"


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.fixture
def scratch():
    """The victim's TMPDIR: short, as unix socket paths under it must be (torch's shared-memory manager,
    p2pd), so in this run's scratch folder rather than tmp_path."""
    folder = Path(tempfile.mkdtemp(prefix="v"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def start_victim(tmp_path: Path, scratch: Path, *, hang: bool) -> tuple[subprocess.Popen, Path]:
    report = tmp_path / "report.json"
    env = {**os.environ, "TMPDIR": str(scratch), "HARNESS_REPORT": str(report), "HARNESS_HANG": "1" if hang else ""}
    process = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'base'}",
         VICTIM], cwd=ROOT, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    return process, report


def wait_gone(pids: list[int], paths: list[str], timeout: float) -> tuple[list[int], list[str]]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [p for p in pids if alive(p)], [p for p in paths if os.path.exists(p)]
        if not any(left):
            return left
        time.sleep(0.1)
    return [p for p in pids if alive(p)], [p for p in paths if os.path.exists(p)]


def test_a_run_leaves_nothing_in_the_temporary_folder(tmp_path, scratch):
    process, report = start_victim(tmp_path, scratch, hang=False)
    out, _ = process.communicate(timeout=120)
    assert process.returncode == 0, out[-3000:]
    started = json.loads(report.read_text())
    assert Path(started["tmpdir"]).parent == scratch  # the run's scratch folder, in TMPDIR
    assert list(scratch.iterdir()) == []  # removed, with what the run and its daemons put there
    assert wait_gone(started["pids"], started["sockets"], 10) == ([], [])


def test_a_killed_run_leaves_no_daemon_and_its_folder_goes_with_the_next_run(tmp_path, scratch):
    process, report = start_victim(tmp_path, scratch, hang=True)
    try:
        deadline = time.monotonic() + 120
        while not report.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert report.exists(), process.communicate(timeout=10)[0][-3000:] if process.poll() is not None else ""
        started = json.loads(report.read_text())
        assert all(alive(pid) for pid in started["pids"])
        process.send_signal(signal.SIGKILL)  # no teardown, no atexit: what a CI time-out does
        process.wait(10)
        # each daemon gets SIGTERM from the kernel and stops as it would on its own: p2pd and sockets too
        assert wait_gone(started["pids"], started["sockets"], 30) == ([], [])
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()
    assert [p.name for p in scratch.iterdir()] == [Path(started["tmpdir"]).name]  # nothing ran its cleanup
    assert remove_stale(scratch) == [Path(started["tmpdir"])]  # what the next run does first
    assert list(scratch.iterdir()) == []
