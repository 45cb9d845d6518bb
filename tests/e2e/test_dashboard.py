"""`homeswarm dashboard` against real daemons: its JSON state, history, page, metrics, and outages.

Real processes on 127.0.0.1: a bootstrap peer, three `join-swarm` nodes of a tiny Llama (blocks 0:2,
2:4 and 0:4, the last with --metrics-port), and the dashboard, refreshing every second and sampling
its history every second. The tests run in order: the swarm as started, the page in headless Chromium,
metrics, bad requests, then a node killed (it must turn unreachable, never shown nor counted as online,
or leave within 60 s, and the history must show before and after), then the bootstrap peer and every node killed (the dashboard must
keep serving its last good state and say how old it is), then SIGTERM (exit 0). Every wait is a poll
bounded by a timeout; every process started here is stopped, whatever happens.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from homeswarm.client.local_swarm import Daemon, LocalSwarm, console_script
from homeswarm.client.transport import HopFailed, HopStream
from homeswarm.protocol.ready_file import read_ready_file
from tests.helpers.checkpoints import make_checkpoint

pytestmark = pytest.mark.timeout(180)

MODEL = "tiny"
NUM_BLOCKS = 4
HIDDEN = 64
SPANS = {"alpha": "0:2", "beta": "2:4", "gamma": "0:4"}  # gamma serves metrics; alpha is killed first
ISSUE_SERVER_KEYS = {"peer_id", "public_name", "blocks", "state", "throughput", "cache_tokens_left", "version",
                     "reachable", "rtt_ms"}
MARK = "HOMESWARM_DASHBOARD_TEST"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
T = TypeVar("T")


# --- helpers -------------------------------------------------------------------------------------


def poll(check: Callable[[], T | None], timeout: float, what: str, interval: float = 0.2) -> T:
    """``check()``'s first truthy result, trying until ``timeout`` s have passed."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = check()
        except (OSError, ValueError, KeyError) as e:  # not up yet, a refused connection
            last = e
        if last:
            return last
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s (last: {last!r})")
        time.sleep(interval)


def get(url: str) -> tuple[int, str, bytes]:
    """(status, content type, body) of a GET, 4xx and 5xx included."""
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status, response.headers.get("Content-Type", ""), response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read()


def get_json(url: str) -> Any:
    status, _, body = get(url)
    assert status == 200, (status, body)
    return json.loads(body)


def metrics(url: str) -> dict[str, dict[tuple, float]]:
    """name -> {sorted labels: value}, parsed as a Prometheus scraper parses it."""
    status, content_type, body = get(url)
    assert status == 200 and content_type.startswith("text/plain")
    out: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def state_if(url: str, predicate: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    state = get_json(url + "api/v1/state")
    return state if predicate(state) else None


def servers_by_name(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    model = next((m for m in state["models"] if m["name"] == MODEL), None)
    return {s["public_name"]: s for s in model["servers"]} if model else {}


def chromium(tmp_path: Path, *args: str, timeout: float = 60) -> str:
    """Run headless Chromium with a fresh profile; its stdout. Killed with its children on timeout."""
    profile = tmp_path / f"chromium-{uuid.uuid4().hex[:8]}"
    argv = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", *args]
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               text=True, start_new_session=True)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise AssertionError(f"chromium {args[-1]} did not finish within {timeout:g} s") from None
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)  # its zygote and renderers, if any are left
    assert process.returncode == 0, err[-2000:]
    return out


def kill_marked(mark: str) -> None:
    """SIGKILL, by pid, whatever still runs with ``MARK=mark`` in its environment (orphaned p2pd daemons)."""
    needle = f"{MARK}={mark}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if needle in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            continue


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mark() -> str:
    return uuid.uuid4().hex


@pytest.fixture(scope="module")
def swarm(tmp_path_factory, mark):
    workdir = tmp_path_factory.mktemp("dashboard-swarm")
    checkpoint = make_checkpoint(workdir / MODEL, "llama3", num_layers=NUM_BLOCKS, hidden_size=HIDDEN)
    swarm = LocalSwarm(workdir, env={MARK: mark})
    try:
        swarm.start_bootstrap()
        for name, blocks in SPANS.items():
            extra = ["--metrics-port", "0"] if name == "gamma" else []
            swarm.start_node(checkpoint, "--blocks", blocks, "--public-name", name, "--compute-threads", "1",
                             "--announce-ttl", "10", *extra, wait=False)
        yield swarm
    finally:
        swarm.close()
        kill_marked(mark)


@pytest.fixture(scope="module")
def dashboard(swarm, tmp_path_factory, mark):
    """The dashboard process, started while the nodes load; (its Daemon, its base URL)."""
    workdir = tmp_path_factory.mktemp("dashboard")
    ready, log_path = workdir / "ready.json", workdir / "dashboard.log"
    argv = [*console_script("homeswarm"), "dashboard", "--initial-peers", *swarm.initial_peers, "--port", "0",
            "--db", str(workdir / "history.sqlite3"), "--refresh-interval", "1", "--history-interval", "1",
            "--probe-timeout", "2", "--dht-timeout", "5", "--ready-file", str(ready)]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, MARK: mark}, start_new_session=True)
    daemon = Daemon(process, ready, log_path)
    try:
        info = poll(lambda: read_ready_file(ready) or process.poll() is not None, 60, "the dashboard's ready file")
        assert process.poll() is None, f"the dashboard exited with {process.returncode}:\n{daemon.log()[-3000:]}"
        for node in swarm.nodes:
            swarm.wait_ready(node, timeout=90)
        yield daemon, info["url"]
    finally:
        LocalSwarm.stop(daemon, timeout=30)


@pytest.fixture(scope="module")
def url(dashboard) -> str:
    return dashboard[1]


@pytest.fixture(scope="module")
def first_state(url) -> dict[str, Any]:
    """The state once the three nodes are seen answering."""
    def ready() -> dict[str, Any] | None:
        state = get_json(url + "api/v1/state")
        servers = servers_by_name(state)
        return state if len(servers) == 3 and all(s["reachable"] for s in servers.values()) else None

    return poll(ready, 60, "three reachable servers in /api/v1/state")


# --- the swarm as started ------------------------------------------------------------------------


def test_state_shows_the_model_its_coverage_and_servers(swarm, first_state):
    assert set(first_state) >= {"updated", "models"} and first_state["dht"]["ok"] is True
    assert abs(first_state["updated"] - time.time()) < 30
    (model,) = [m for m in first_state["models"] if m["name"] == MODEL]
    assert model["num_blocks"] == NUM_BLOCKS and model["healthy"] is True
    assert model["coverage"] == [2, 2, 2, 2]
    servers = servers_by_name(first_state)
    version = servers["alpha"]["version"]
    assert version and all(s["version"] == version for s in servers.values())
    nodes = {n.info["peer_id"]: n.info for n in swarm.nodes}
    for name, server in servers.items():
        assert ISSUE_SERVER_KEYS <= set(server)
        start, end = map(int, SPANS[name].split(":"))
        assert server["blocks"] == [start, end] and server["state"] == "online"
        assert nodes[server["peer_id"]]["blocks"] == [start, end]
        assert server["address"] == nodes[server["peer_id"]]["address"]
        assert server["throughput"] > 0 and isinstance(server["cache_tokens_left"], int)
        assert server["cache_tokens_left"] > 0
        assert server["reachable"] is True and 0 < server["rtt_ms"] < 5000
        assert server["quant"] == "none" and server["connection"] == "direct"
        assert server["uptime_seconds"] > 0 and server["active_sessions"] == 0


def test_page_in_headless_chromium(url, first_state, tmp_path):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)")
    dom = chromium(tmp_path, "--dump-dom", url)
    text = " ".join(dom.split())
    assert f'id="model-{MODEL}"' in dom
    assert MODEL in text and "healthy" in text and "3 servers online" in text
    assert "4 of 4 blocks covered" in text and "alpha" in text and "gamma" in text
    screenshot = tmp_path / "dashboard.png"
    chromium(tmp_path, f"--screenshot={screenshot}", "--window-size=1200,900", url)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000


def test_page_is_complete_without_javascript(url, first_state):
    status, content_type, body = get(url)
    html = body.decode()
    assert status == 200 and content_type.startswith("text/html")
    assert "3 servers online" in html and "healthy" in html and html.count("<svg") == 4
    # nothing to fetch from elsewhere: every link and source is a path of the dashboard's own
    links = re.findall(r'(?:src|href|action)\s*=\s*"([^"]*)"', html)
    assert links and all(link.startswith("/") and not link.startswith("//") for link in links), links
    assert "<link" not in html and "url(" not in html and "@import" not in html


# --- metrics -------------------------------------------------------------------------------------


def test_metrics_of_the_dashboard_and_of_a_node(swarm, url, first_state):
    gamma = next(n for n in swarm.nodes if n.info["address"] == servers_by_name(first_state)["gamma"]["address"])
    pool = swarm.pool()
    try:
        # two steps of a session, and a request the node refuses
        hop = HopStream(pool, peer_id=gamma.info["peer_id"], address=gamma.info["address"], model=MODEL, start=0,
                        end=NUM_BLOCKS, batch_size=1, max_length=16, compression=0, connect_timeout=30,
                        step_timeout=30)
        try:
            assert hop.step(1, torch.randn(1, 3, HIDDEN)).shape == (1, 3, HIDDEN)
            assert hop.step(2, torch.randn(1, 1, HIDDEN)).shape == (1, 1, HIDDEN)
        finally:
            hop.close()
        with pytest.raises(HopFailed, match="INVALID_ARGUMENT|did not open"):
            HopStream(pool, peer_id=gamma.info["peer_id"], address=gamma.info["address"], model=MODEL, start=0,
                      end=NUM_BLOCKS + 5, batch_size=1, max_length=16, compression=0, connect_timeout=30,
                      step_timeout=30)
    finally:
        pool.close()

    node = metrics(f"http://{gamma.info['metrics_address']}/metrics")
    assert node["homeswarm_node_sessions_opened_total"][()] == 1
    assert node["homeswarm_node_steps_total"][(("source", "client"),)] == 2
    assert node["homeswarm_node_step_seconds_count"][()] == 2
    assert node["homeswarm_node_batch_size_count"][()] >= 2 and node["homeswarm_node_batch_size_sum"][()] >= 2
    assert node["homeswarm_node_received_bytes_total"][()] > 4 * HIDDEN * 4
    assert node["homeswarm_node_sent_bytes_total"][()] > 4 * HIDDEN * 4
    assert node["homeswarm_node_errors_total"][(("kind", "invalid_argument"),)] >= 1
    assert node["homeswarm_node_cache_budget_bytes"][()] > 0
    assert () in node["homeswarm_node_sessions"] and () in node["homeswarm_node_cache_used_bytes"]

    dash = metrics(url + "metrics")
    assert dash["homeswarm_dashboard_servers"][(("model", MODEL), ("state", "online"))] == 3
    assert dash["homeswarm_dashboard_servers_reachable"][(("model", MODEL),)] == 3
    assert dash["homeswarm_dashboard_blocks"][(("model", MODEL),)] == NUM_BLOCKS
    assert dash["homeswarm_dashboard_blocks_covered"][(("model", MODEL),)] == NUM_BLOCKS
    assert dash["homeswarm_dashboard_weakest_block_throughput"][(("model", MODEL),)] > 0
    assert dash["homeswarm_dashboard_model_healthy"][(("model", MODEL),)] == 1
    assert dash["homeswarm_dashboard_dht_ok"][()] == 1


# --- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("query", "status"), [
    ("model=nobody&since=0", 404),
    (f"model={MODEL}&since=yesterday", 400),
    (f"model={MODEL}&since=-1", 400),
    (f"model={MODEL}&since=NaN", 400),
    ("since=0", 400),
])
def test_bad_history_requests_get_json_errors(url, first_state, query, status):
    got, content_type, body = get(f"{url}api/v1/history?{query}")
    assert got == status and content_type == "application/json"
    assert json.loads(body)["error"]["status"] == status


def test_unknown_path_is_a_json_404(url, first_state):
    status, content_type, body = get(url + "api/v2/state")
    assert status == 404 and content_type == "application/json" and "error" in json.loads(body)


def test_bad_command_lines_exit_2(tmp_path):
    # `python -m homeswarm.dashboard` is what `homeswarm dashboard` execs (the fixture above starts it so)
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    peer = "/ip4/127.0.0.1/tcp/1/p2p/QmPeer"
    cases = [(["--initial-peers", "127.0.0.1:1"], "multiaddrs"),
             (["--initial-peers", peer, "--history-interval", "0"], "--history-interval"),
             (["--initial-peers", peer, "--db", str(not_a_folder / "h.sqlite3")], "history database")]
    processes = [subprocess.Popen([sys.executable, "-m", "homeswarm.dashboard", *argv], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
                 for argv, _ in cases]
    try:
        for process, (argv, message) in zip(processes, cases, strict=True):
            _, err = process.communicate(timeout=60)
            assert process.returncode == 2, (argv, err)
            assert "homeswarm dashboard: error: " in err and message in err, err
    finally:
        for process in processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)


# --- outages -------------------------------------------------------------------------------------


def test_a_killed_node_turns_unreachable_and_history_shows_before_and_after(swarm, url, first_state):
    # the dashboard starts while the nodes load: its first samples may show them joining, so the
    # history checked starts at the first sample with all three online
    since_start = f"{url}api/v1/history?model={MODEL}&since={first_state['updated'] - 30}"
    full = poll(lambda: [s for s in get_json(since_start)["samples"] if s["online_servers"] == 3], 30,
                "a history sample with 3 servers online")
    history_url = f"{url}api/v1/history?model={MODEL}&since={full[0]['time']}"
    alpha_id = servers_by_name(first_state)["alpha"]["peer_id"]
    alpha = next(n for n in swarm.nodes if n.info["peer_id"] == alpha_id)
    LocalSwarm.kill(alpha)
    killed = time.time()

    def gone_or_unreachable() -> dict[str, Any] | None:
        state = get_json(url + "api/v1/state")
        alpha_now = servers_by_name(state).get("alpha")
        return state if state["updated"] > killed and (alpha_now is None or not alpha_now["reachable"]) else None

    state = poll(gone_or_unreachable, 60, "the killed node leaving or turning unreachable")
    (model,) = [m for m in state["models"] if m["name"] == MODEL]
    assert model["coverage"] == [1, 1, 2, 2] and model["healthy"] is True and model["online_servers"] == 2
    # killed, it could not announce anything: its record says online until it expires, but nothing calls it so
    alpha_now = servers_by_name(state).get("alpha")
    if alpha_now is not None and alpha_now["state"] == "online":
        assert alpha_now["status"] == "unreachable" and alpha_now["counts"] is False
        html = get(url)[2].decode()
        row = next(r for r in html.split("<tr>") if ">alpha<" in r)
        assert ">unreachable</td>" in row and ">online</td>" not in row, row
    dash = metrics(url + "metrics")
    assert dash["homeswarm_dashboard_servers"][(("model", MODEL), ("state", "online"))] == 2

    after = poll(lambda: [s for s in get_json(history_url)["samples"] if s["time"] > killed
                          and s["online_servers"] == 2], 30, "a history sample with 2 servers online")
    samples = get_json(history_url)["samples"]
    before = [s for s in samples if s["time"] < killed and s["online_servers"] == 3]
    assert before and after and before[-1]["time"] < after[0]["time"]
    assert all(s["healthy"] == 1 and s["covered_blocks"] == NUM_BLOCKS for s in samples), samples


def test_keeps_serving_its_last_state_when_the_dht_is_unreachable(swarm, dashboard, url, first_state):
    for daemon in [swarm.bootstrap, *swarm.nodes]:
        LocalSwarm.kill(daemon)
    down = poll(lambda: state_if(url, lambda s: not s["dht"]["ok"]), 60,
                "the dashboard noticing that the swarm cannot be read")
    assert down["dht"]["error"] and down["age_seconds"] > 0
    assert [m["name"] for m in down["models"]] == [MODEL]  # the last good state, still shown
    later = poll(lambda: state_if(url, lambda s: s["age_seconds"] > down["age_seconds"]), 10,
                 "the state's age growing")
    assert later["updated"] == down["updated"]
    status, _, body = get(url)
    text = " ".join(body.decode().split())
    assert status == 200 and "The swarm cannot be read right now" in text and "Showing the state of" in text
    assert metrics(url + "metrics")["homeswarm_dashboard_dht_ok"][()] == 0

    daemon, _ = dashboard
    daemon.process.send_signal(signal.SIGTERM)
    assert daemon.process.wait(30) == 0, daemon.log()[-3000:]
