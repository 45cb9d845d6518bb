"""Run by test_harness.py in a pytest of its own, never collected by the suite (its name is not test_*):
starts daemons as the suite does, reports them, then finishes or hangs until it is killed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.node.process_memory import descendants
from homeswarm.routing.dht import p2pd_sockets


def test_daemons(tmp_path):
    report = Path(os.environ["HARNESS_REPORT"])
    with LocalSwarm(tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        # a daemon started as tests/e2e/test_cli.py starts its own: a session of its own, no hook given
        raw = subprocess.Popen([*console_script("homeswarm"), "dht", "--port", "0", "--ready-file",
                                str(tmp_path / "raw.json")], start_new_session=True, stdin=subprocess.DEVNULL,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while not (tmp_path / "raw.json").exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            assert (tmp_path / "raw.json").exists()
            daemons = [swarm.bootstrap.process.pid, raw.pid]
            tree = [pid for daemon in daemons for pid in [daemon, *descendants(daemon)]]
            sockets = [path for pid in tree for path in p2pd_sockets(pid)]
            assert sockets  # each daemon's p2pd
            report.write_text(json.dumps({"pids": tree, "sockets": sockets, "tmpdir": os.environ["TMPDIR"]}))
            if os.environ.get("HARNESS_HANG"):
                time.sleep(600)  # until test_harness.py kills this pytest
        finally:
            raw.terminate()
            raw.wait(30)
