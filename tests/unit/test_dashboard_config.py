"""DashboardConfig.from_args: the `homeswarm dashboard` flags and every way to get them wrong."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest

from homeswarm.dashboard.config import ConfigError, DashboardConfig, default_db_path

PEER = "/ip4/127.0.0.1/tcp/4000/p2p/QmPeer"
ROOT = Path(__file__).resolve().parents[2]


def test_contract_flags_and_defaults(monkeypatch, tmp_path):
    c = DashboardConfig.from_args(["--initial-peers", PEER, PEER, "--host", "0.0.0.0", "--port", "0",
                                   "--db", "h.sqlite3"])
    assert c.initial_peers == (PEER, PEER) and c.host == "0.0.0.0" and c.port == 0
    assert c.db_path == Path("h.sqlite3")
    d = DashboardConfig.from_args(["--initial-peers", PEER])
    assert (d.host, d.port, d.refresh_interval, d.history_interval) == ("127.0.0.1", 8080, 5.0, 60.0)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert d.db_path == default_db_path() == tmp_path / "homeswarm" / "dashboard.sqlite3"


def test_intervals_are_settings():
    c = DashboardConfig.from_args(["--initial-peers", PEER, "--refresh-interval", "0.5", "--history-interval", "1"])
    assert c.refresh_interval == 0.5 and c.history_interval == 1.0


@pytest.mark.parametrize(("argv", "match"), [
    (["--initial-peers", "127.0.0.1:4000"], "multiaddrs"),
    (["--initial-peers", PEER, "--port", "65536"], "--port"),
    (["--initial-peers", PEER, "--refresh-interval", "0"], "--refresh-interval"),
    (["--initial-peers", PEER, "--history-interval", "nan"], "--history-interval"),
    (["--initial-peers", PEER, "--probe-timeout", "-1"], "--probe-timeout"),
])
def test_bad_values(argv, match):
    with pytest.raises(ConfigError, match=match):
        DashboardConfig.from_args(argv)


def test_missing_peers_is_a_usage_error():
    with pytest.raises(SystemExit) as e:
        DashboardConfig.from_args([])
    assert e.value.code == 2


def test_the_compose_file_runs_the_dashboard_with_flags_it_takes():
    yaml = pytest.importorskip("yaml")
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    script = compose["services"]["dashboard"]["entrypoint"][-1].replace("\\\n", " ")
    (command,) = [line for line in script.splitlines() if line.strip().startswith("exec homeswarm dashboard")]
    config = DashboardConfig.from_args(shlex.split(command)[3:])
    assert config.initial_peers[0].startswith("/dns4/bootstrap/tcp/31331/p2p/")
    assert (config.host, config.port) == ("0.0.0.0", 8080)
    assert config.db_path.parent == Path("/var/lib/homeswarm/dashboard") and "dashboard" in compose["volumes"]
