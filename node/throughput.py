"""Throughput self-test: how many decoding steps per second one block of this span sustains.

Measured on the real span with a short cache, batch 1: the median of a few steps, after a warm-up
step. The result is announced so that clients can plan routes and joining nodes can choose blocks.

Results are cached in a small JSON file (``$XDG_CACHE_HOME/homeswarm/throughput.json``), keyed by
model (name and a digest of its config), blocks, dtype, weight format, device and threads, so a node
restarting on the same machine skips the test; entries older than ``MAX_AGE`` are measured again (the
machine may have changed). A cache file that cannot be read is ignored, one that cannot be written
only logged: the cache saves time, it is never needed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from homeswarm.model import BlockSpan

logger = logging.getLogger(__name__)

MAX_AGE = 30 * 24 * 3600.0  # seconds a cached result is trusted
SELF_TEST_STEPS = 5


@torch.no_grad()
def measure_block_throughput(span: BlockSpan, *, steps: int = SELF_TEST_STEPS, prefix: int = 16,
                             on_step: Callable[[], None] | None = None) -> float:
    """Steps per second through one block; ``on_step`` is called after each timed step (progress)."""
    cache = span.new_cache(1, prefix + steps + 1)
    hidden = torch.randn(1, prefix, span.config.hidden_size, dtype=span.dtype, device=span.device)
    span.forward(hidden, cache)
    times = []
    step = torch.randn(1, 1, span.config.hidden_size, dtype=span.dtype, device=span.device)
    for _ in range(steps):
        t0 = time.perf_counter()
        span.forward(step, cache)
        if span.device.type == "cuda":
            torch.cuda.synchronize(span.device)
        times.append(time.perf_counter() - t0)
        if on_step is not None:
            on_step()
    per_block = statistics.median(times) / span.num_blocks
    return 1.0 / max(per_block, 1e-6)


@dataclass(frozen=True)
class ThroughputKey:
    model: str
    config_digest: str  # of config.json: two checkpoints under one name must not share results
    start: int
    end: int
    dtype: str
    quant: str
    device: str
    threads: int

    def text(self) -> str:
        return (f"{self.model}@{self.config_digest}|{self.start}:{self.end}|{self.dtype}|{self.quant}|"
                f"{self.device}|threads={self.threads}")

    def any_span(self) -> str:
        """The key without the blocks: a typical per-block throughput of this setup, for an estimate."""
        return dataclasses.replace(self, start=-1, end=-1).text().replace("|-1:-1|", "|*|")


def config_digest(model_dir: str | os.PathLike[str]) -> str:
    return hashlib.sha256(Path(model_dir, "config.json").read_bytes()).hexdigest()[:16]


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "homeswarm" / "throughput.json"


class ThroughputCache:
    def __init__(self, path: str | os.PathLike[str] | None = None):
        self.path = Path(path) if path is not None else default_cache_path()

    def _read(self) -> dict:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def get(self, key: ThroughputKey, now: float) -> float | None:
        """The cached throughput of exactly this setup, if fresh."""
        return _fresh(self._read().get(key.text()), now)

    def estimate(self, key: ThroughputKey, now: float) -> float | None:
        """A cached throughput of this setup for any span (what a joining node announces before measuring)."""
        exact = self.get(key, now)
        return exact if exact is not None else _fresh(self._read().get(key.any_span()), now)

    def put(self, key: ThroughputKey, throughput: float, now: float) -> None:
        data = self._read()
        entry = {"throughput": throughput, "measured_at": now}
        data[key.text()] = entry
        data[key.any_span()] = entry
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".throughput-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)  # atomically: nodes starting together may write at once
        except OSError as e:
            logger.warning("could not write the throughput cache %s: %s", self.path, e)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def _fresh(entry: object, now: float) -> float | None:
    if not isinstance(entry, dict):
        return None
    value, at = entry.get("throughput"), entry.get("measured_at")
    if not isinstance(value, (int, float)) or not isinstance(at, (int, float)) or isinstance(value, bool):
        return None
    if not 0 < value < float("inf") or not 0 <= now - at <= MAX_AGE:
        return None
    return float(value)
