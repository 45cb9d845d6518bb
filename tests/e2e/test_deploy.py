"""deploy/: the systemd unit passes `systemd-analyze verify`, the compose file holds together, and the
Dockerfile builds an image whose container serves blocks to a swarm on this machine.

Each check needs a tool of the host; where it is missing the test is skipped, saying which. The image
build takes its --build-arg values from HOMESWARM_DOCKER_BUILD_ARGS (space-separated KEY=VALUE, e.g.
a locally made BASE_IMAGE and a TORCH_INDEX_URL where Docker Hub or torch's index cannot be reached).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from homeswarm import AutoDistributedModelForCausalLM
from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.model import DEMO_MODEL_DIR, ModelConfig
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import ServerState
from tests.helpers.checkpoints import reference_greedy

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


def container_engine() -> str | None:
    """Why no container can run here, or None when one can."""
    if shutil.which("docker") is None:
        return "no docker client on this machine"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "no container engine answers here (docker info timed out)"
    if info.returncode != 0:
        last = (info.stderr.strip().splitlines() or ["?"])[-1]
        return f"no container engine runs here (docker info failed: {last})"
    return None


# --- systemd -------------------------------------------------------------------------------------


def test_the_unit_is_restarted_unprivileged_niced_and_capped():
    unit = (DEPLOY / "join-swarm.service").read_text()
    for setting in ("Restart=on-failure", "User=homeswarm", "Nice=19", "MemoryMax=", "KillMode=mixed",
                    "RestartPreventExitStatus=2", "NoNewPrivileges=yes", "WantedBy=multi-user.target"):
        assert re.search(rf"^{re.escape(setting)}", unit, re.MULTILINE), setting


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_verify_passes(tmp_path):
    # as installed: ExecStart names this environment's join-swarm (verify checks that it exists)
    unit = (DEPLOY / "join-swarm.service").read_text()
    join_swarm = Path(sys.executable).parent / "join-swarm"
    assert join_swarm.exists()
    unit = unit.replace("/opt/homeswarm/bin/join-swarm", str(join_swarm))
    path = tmp_path / "join-swarm.service"
    path.write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # warnings (a value out of range, an unknown key) leave the exit code at 0: none may appear
    assert [line for line in result.stderr.splitlines() if str(path) in line or "join-swarm" in line] == []


HARDENING = ("NoNewPrivileges=yes", "CapabilityBoundingSet=", "ProtectSystem=strict", "ProtectHome=read-only",
             "PrivateTmp=yes", "PrivateDevices=yes", "ProtectKernelTunables=yes", "ProtectControlGroups=yes",
             "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX AF_NETLINK", "RestrictNamespaces=yes",
             "SystemCallFilter=@system-service", "SystemCallArchitectures=native", "UMask=0077",
             "StateDirectory=homeswarm", "CacheDirectory=homeswarm")


def test_the_unit_is_hardened():
    unit = (DEPLOY / "join-swarm.service").read_text()
    for setting in HARDENING:
        assert re.search(rf"^{re.escape(setting)}$", unit, re.MULTILINE), setting
    # the node reads /proc/meminfo to size itself: no ProcSubset=pid; torch's CPU kernels write code at run time
    assert "ProcSubset=" not in unit and not re.search(r"^MemoryDenyWriteExecute=yes", unit, re.MULTILINE)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed here")
def test_systemd_analyze_security_rates_the_unit_ok(tmp_path):
    path = tmp_path / "join-swarm.service"
    path.write_text((DEPLOY / "join-swarm.service").read_text())
    result = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(path)],
                            capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for join-swarm\.service: ([\d.]+) (\w+)", result.stdout)
    assert match, result.stdout[-2000:] + result.stderr[-2000:]
    assert float(match.group(1)) <= 2.0, result.stdout  # 1.5 "OK" (the unhardened unit: 7.7 "EXPOSED")


SANDBOX = r"""
set -e
mount --make-rprivate /
mount -t tmpfs -o mode=1777 tmpfs /tmp        # PrivateTmp=yes
mkdir -m 777 /tmp/state                       # StateDirectory= / CacheDirectory=: the only places it writes
mount --bind / / && mount -o remount,bind,ro /  # ProtectSystem=strict (and ProtectHome=read-only)
if touch "$ROOT/.sandbox-probe" 2>/dev/null; then rm -f "$ROOT/.sandbox-probe"; echo "writable"; exit 3; fi
export HOME=/tmp/state XDG_CACHE_HOME=/tmp/state TMPDIR=/tmp
# NoNewPrivileges=yes, CapabilityBoundingSet= (empty)
setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "$BIN/join-swarm" "$ROOT/model/demo" --new-swarm     --port 0 --compute-threads 1 --ready-file /tmp/state/ready.json & node=$!
i=0; while [ ! -s /tmp/state/ready.json ] && [ $i -lt 900 ]; do sleep 0.1; i=$((i + 1)); done
grep CapEff /proc/$node/status
peers=$("$BIN/python" -c 'import json; print(json.load(open("/tmp/state/ready.json"))["dht_maddrs"][0])')
setpriv --no-new-privs --bounding-set=-all --inh-caps=-all "$BIN/homeswarm" generate "$ROOT/model/demo"     --initial-peers "$peers" --prompt-ids 1,2,3,4 --max-new-tokens 4 --json
kill -TERM $node; wait $node; echo "node exit $?"
"""


def test_the_node_serves_under_the_units_file_system_and_privilege_limits(tmp_path):
    """What the unit's hardening does to the file system and privileges, made here with a mount namespace
    (no systemd runs on these machines): a read-only system, a private /tmp (p2pd's sockets, torch's
    shared-memory folder), writable state and cache folders only, no capabilities, no new privileges.
    The node serves the demo model and a client's greedy tokens are transformers'."""
    if shutil.which("unshare") is None or shutil.which("setpriv") is None:
        pytest.skip("unshare or setpriv is not installed here")
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no mount namespace here: {probe.stderr.decode().strip()}")
    script = tmp_path / "sandbox.sh"
    script.write_text(SANDBOX)
    env = {**os.environ, "ROOT": str(ROOT), "BIN": str(Path(sys.executable).parent), "HOMESWARM_LOG_LEVEL": "WARNING"}
    result = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", str(script)], env=env,
                            capture_output=True, text=True, timeout=150, start_new_session=True)
    out = result.stdout
    assert result.returncode == 0 and "node exit 0" in out, out[-2000:] + result.stderr[-3000:]
    assert re.search(r"^CapEff:\s+0+$", out, re.MULTILINE), out
    generated = json.loads(next(line for line in out.splitlines() if line.startswith("{")))
    prompt = torch.tensor([[1, 2, 3, 4]])
    assert generated["token_ids"] == reference_greedy(DEMO_MODEL_DIR, prompt, 4)[0, 4:].tolist()


# --- compose -------------------------------------------------------------------------------------


def test_the_compose_file_runs_a_bootstrap_peer_and_nodes():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert {"bootstrap", "node"} <= set(services)
    assert services["bootstrap"]["build"] == {"context": "..", "dockerfile": "deploy/Dockerfile"}
    assert services["node"]["image"] == services["bootstrap"]["image"]
    script = "\n".join(services["node"]["entrypoint"])
    assert "exec join-swarm" in script and "--initial-peers" in script and "/dns4/bootstrap/tcp/31331/p2p/" in script
    bootstrap = "\n".join(services["bootstrap"]["entrypoint"])
    assert "homeswarm dht --host 0.0.0.0 --port 31331" in bootstrap
    assert services["node"]["init"] is True  # signals reach join-swarm, which stops its children itself


def test_the_compose_headers_status_command_works_as_written(tmp_path):
    """The shell command the header runs in the bootstrap container, run here: in a folder laid out as the
    container's working directory (shared/dht.json, the bootstrap peer's ready file), with the venv's
    homeswarm on PATH."""
    header = "\n".join(line[1:] for line in (DEPLOY / "compose.yaml").read_text().splitlines()
                       if line.startswith("#"))
    match = re.search(r"docker compose -f deploy/compose\.yaml exec bootstrap \\\n\s*sh -c '([^']+)'", header)
    assert match, header
    (tmp_path / "shared").mkdir()
    with LocalSwarm(tmp_path / "swarm") as swarm:
        swarm.start_bootstrap()
        shutil.copy(swarm.bootstrap.ready_file, tmp_path / "shared" / "dht.json")
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        result = subprocess.run(["sh", "-c", match.group(1)], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=90)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "no model is announced in this swarm", result.stdout


def test_the_build_context_keeps_what_the_install_needs():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    pyproject = (ROOT / "pyproject.toml").read_text()
    folders = set(re.findall(r'^"homeswarm[.\w]*" = "(\w+)"', pyproject, re.MULTILINE))
    assert {"pkg", "protocol", "routing", "model", "node", "client"} <= folders
    assert not (folders | {"pyproject.toml", "README.md"}) & ignored


# --- the image -----------------------------------------------------------------------------------


@pytest.mark.timeout(3600)
def test_the_image_builds_and_its_container_serves_blocks(tmp_path):
    reason = container_engine()
    if reason is not None:
        pytest.skip(reason)
    tag = f"homeswarm-test:{uuid.uuid4().hex[:12]}"
    name = f"homeswarm-test-{uuid.uuid4().hex[:12]}"
    build_args = [arg for pair in os.environ.get("HOMESWARM_DOCKER_BUILD_ARGS", "").split()
                  for arg in ("--build-arg", pair)]
    # the host's network: a package index on this machine's loopback is reachable too
    build = subprocess.run(["docker", "build", "--network", "host", *build_args, "-f", str(DEPLOY / "Dockerfile"),
                            "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=3000)
    assert build.returncode == 0, build.stderr[-5000:]
    num_blocks = ModelConfig.from_dir(DEMO_MODEL_DIR).num_hidden_layers
    try:
        with LocalSwarm(tmp_path) as swarm:
            swarm.start_bootstrap()
            # the host's network: the container's node and this machine's peers reach each other on loopback
            run = subprocess.run(
                ["docker", "run", "-d", "--init", "--name", name, "--network", "host", "--entrypoint", "/bin/sh", tag,
                 "-c", 'exec join-swarm "$(python -c "from homeswarm.model import DEMO_MODEL_DIR as d; print(d)")" '
                 f'--model-name demo --initial-peers {swarm.initial_peers[0]} --host 127.0.0.1 '
                 f'--blocks 0:{num_blocks} --throughput 100'],
                capture_output=True, text=True, timeout=60,
            )
            assert run.returncode == 0, run.stderr
            dht = SwarmDHT.create(swarm.initial_peers, client_mode=True)
            try:
                deadline = time.monotonic() + 300
                while not any(r.state == ServerState.ONLINE for r in dht.get_servers("demo", 0, num_blocks)):
                    logs = subprocess.run(["docker", "logs", name], capture_output=True, text=True).stderr
                    assert time.monotonic() < deadline, f"the container's node did not come online:\n{logs[-3000:]}"
                    time.sleep(1)
            finally:
                dht.shutdown()
            prompt = torch.tensor([[1, 2, 3, 4]])
            with AutoDistributedModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, initial_peers=swarm.initial_peers,
                                                                 model_name="demo") as model:
                out = model.generate(prompt, max_new_tokens=4)
            assert out.tolist() == reference_greedy(DEMO_MODEL_DIR, prompt, 4).tolist()  # the container's blocks
            stop = subprocess.run(["docker", "stop", "-t", "60", name], capture_output=True, text=True, timeout=90)
            assert stop.returncode == 0
            state = subprocess.run(["docker", "inspect", "-f", "{{.State.ExitCode}}", name], capture_output=True,
                                   text=True, timeout=30)
            assert state.stdout.strip() == "0"  # SIGTERM: an orderly stop
    finally:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=60)
        subprocess.run(["docker", "rmi", "-f", tag], capture_output=True, timeout=120)
