"""DashboardConfig: every setting of `homeswarm dashboard`, each with its help text; the CLI is built from it.

``DashboardConfig.from_args`` is the only place that turns command-line strings into a validated
config; bad values raise ``ConfigError``, whose message the CLI prints before exiting with code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A setting that cannot work; the message says which and why."""


def _opt(default, help: str, **argparse_kwargs):  # noqa: ANN001, ANN202, A002
    return field(default=default, metadata={"help": help, **argparse_kwargs})


def default_db_path() -> Path:
    """$XDG_STATE_HOME/homeswarm/dashboard.sqlite3 (~/.local/state/... when unset)."""
    state_home = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state_home) / "homeswarm" / "dashboard.sqlite3"


@dataclass(frozen=True)
class DashboardConfig:
    initial_peers: tuple[str, ...] = _opt((), "multiaddrs of peers already in the swarm", nargs="+",
                                          required=True, metavar="MADDR")
    host: str = _opt("127.0.0.1", "address to listen on (0.0.0.0: all)", metavar="HOST")
    port: int = _opt(8080, "port to listen on (0 picks a free one)", metavar="PORT")
    db: str | None = _opt(None, "SQLite database of the history (default: $XDG_STATE_HOME/homeswarm/"
                          "dashboard.sqlite3, or ~/.local/state/...)", metavar="PATH")
    refresh_interval: float = _opt(5.0, "seconds between two reads of the DHT and probes of the nodes")
    history_interval: float = _opt(60.0, "seconds between two samples of the history")
    probe_timeout: float = _opt(3.0, "seconds a node has to answer its probe")
    dht_timeout: float = _opt(10.0, "seconds one DHT read may take before the refresh counts as failed")
    dht_port: int = _opt(0, "DHT (libp2p) port of the dashboard's own DHT peer (0 picks a free port)")
    ready_file: str | None = _opt(None, "once serving, write {address, url} here (atomically)", metavar="PATH")
    verbose: bool = _opt(False, "log requests and what the refresher does")

    def validate(self) -> DashboardConfig:
        for peer in self.initial_peers:
            if not peer.startswith("/"):
                raise ConfigError(f"--initial-peers takes multiaddrs (/ip4/HOST/tcp/PORT/p2p/PEER_ID), got {peer!r}")
        if not self.initial_peers:
            raise ConfigError("give --initial-peers MADDR [MADDR ...]")
        for name in ("port", "dht_port"):
            if not 0 <= getattr(self, name) < 65536:
                raise ConfigError(f"--{name.replace('_', '-')} must be in 0..65535, got {getattr(self, name)}")
        for name in ("refresh_interval", "history_interval", "probe_timeout", "dht_timeout"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive number of seconds, got {value}")
        return self

    @property
    def db_path(self) -> Path:
        return Path(self.db) if self.db else default_db_path()

    @classmethod
    def parser(cls, prog: str = "homeswarm dashboard") -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(
            prog=prog, description="Serve the swarm's health: a web page, a JSON API and Prometheus metrics."
        )
        for f in dataclasses.fields(cls):
            meta = dict(f.metadata)
            help_text = meta.pop("help")
            flag = "--" + f.name.replace("_", "-")
            if f.type in ("bool", bool):
                parser.add_argument(flag, action="store_true", help=help_text)
                continue
            kind = {"int": int, "float": float}.get(str(f.type), str)
            default_text = "" if f.default in (None, (), "") else f" (default: {f.default})"
            parser.add_argument(flag, type=kind, default=f.default, help=help_text + default_text, **meta)
        return parser

    @classmethod
    def from_args(cls, argv: Sequence[str] | None = None) -> DashboardConfig:
        args = vars(cls.parser().parse_args(argv))
        args["initial_peers"] = tuple(args["initial_peers"])
        return cls(**args).validate()
