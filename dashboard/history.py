"""The dashboard's history: per model, one sample per interval in SQLite, downsampled with age, kept 30 days.

Tiers: samples younger than a day stay as taken; older ones are merged into 10-minute rows, rows older
than a week into hourly ones; rows older than 30 days are deleted (``compact``). A merged row holds the
span-weighted means of the rows it replaces and the seconds they stood for, and the lowest and highest
number of online servers and weakest-block throughput among them, so that a chart can show a drop from
3 servers to 2 as that rather than as their mean. A bucket is merged only once all of it is past its tier's age, so it is merged once,
whole. Time is passed in (``now``), never read here.

One connection under a lock: the refresher writes from its thread, requests read from theirs.
"""

from __future__ import annotations

import math
import sqlite3
import threading
from collections.abc import Mapping
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from homeswarm.dashboard.state import ModelView

DAY = 86400.0
RETENTION = 30 * DAY
# (age past which rows are merged, bucket seconds), from the finest tier to the coarsest
TIERS: tuple[tuple[float, int], ...] = ((DAY, 600), (7 * DAY, 3600))


@dataclass(frozen=True)
class Sample:
    time: float  # unix time; a merged row: its bucket's start
    span: float  # seconds the row stands for
    servers: float  # announced servers, in any state
    online: float  # servers that count (online and answering)
    covered_blocks: float
    num_blocks: int
    healthy: float  # 1 healthy, 0 broken; a merged row: the fraction of its span that was healthy
    weakest_throughput: float  # steps per second through the weakest block
    # a merged row: the lowest and highest of the rows it replaces (None in a row as taken: its value)
    online_low: float | None = None
    online_high: float | None = None
    weakest_low: float | None = None
    weakest_high: float | None = None


_COLUMNS = tuple(f.name for f in fields(Sample))
_MEANS = ("servers", "online", "covered_blocks", "healthy", "weakest_throughput")
_RANGES = {"online_low": "MIN(COALESCE(online_low, online))", "online_high": "MAX(COALESCE(online_high, online))",
           "weakest_low": "MIN(COALESCE(weakest_low, weakest_throughput))",
           "weakest_high": "MAX(COALESCE(weakest_high, weakest_throughput))"}
_SCHEMA = """
CREATE TABLE IF NOT EXISTS samples (
    model TEXT NOT NULL,
    level INTEGER NOT NULL,  -- 0: as sampled; i > 0: merged into the buckets of TIERS[i - 1]
    time REAL NOT NULL, span REAL NOT NULL, servers REAL NOT NULL, online REAL NOT NULL,
    covered_blocks REAL NOT NULL, num_blocks INTEGER NOT NULL, healthy REAL NOT NULL,
    weakest_throughput REAL NOT NULL,
    online_low REAL, online_high REAL, weakest_low REAL, weakest_high REAL
);
CREATE INDEX IF NOT EXISTS samples_by_model_time ON samples (model, time);
CREATE INDEX IF NOT EXISTS samples_by_time ON samples (time);
"""


def sample_of(model: ModelView, now: float, span: float) -> Sample:
    return Sample(time=now, span=span, servers=len(model.servers), online=model.online_servers,
                  covered_blocks=model.covered_blocks, num_blocks=model.num_blocks,
                  healthy=1.0 if model.healthy else 0.0, weakest_throughput=model.weakest_throughput)


class History:
    def __init__(self, path: str | Path):
        """``path``: the database file (created with its folder when missing), or ":memory:"."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False)
        self._lock = threading.Lock()
        with self._lock, self._db:
            self._db.executescript(_SCHEMA)
            # a database from before the ranges were kept: its rows' ranges are their values
            present = {row[1] for row in self._db.execute("PRAGMA table_info(samples)")}
            for column in _RANGES:
                if column not in present:
                    self._db.execute(f"ALTER TABLE samples ADD COLUMN {column} REAL")

    def add(self, samples: Mapping[str, Sample]) -> None:
        """One sample per model, as taken (level 0)."""
        rows = [(model, 0, *astuple(sample)) for model, sample in samples.items()]
        with self._lock, self._db:
            self._db.executemany(f"INSERT INTO samples (model, level, {', '.join(_COLUMNS)}) "
                                 f"VALUES ({', '.join('?' * (len(_COLUMNS) + 2))})", rows)

    def query(self, model: str, since: float, until: float = math.inf) -> list[Sample]:
        """The model's rows with ``since <= time < until``, oldest first."""
        with self._lock:
            rows = self._db.execute(
                f"SELECT {', '.join(_COLUMNS)} FROM samples WHERE model = ? AND time >= ? AND time < ? "
                "ORDER BY time", (model, since, until if math.isfinite(until) else 1e300)).fetchall()
        return [Sample(*row) for row in rows]

    def knows(self, model: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM samples WHERE model = ? LIMIT 1", (model,)).fetchone() is not None

    def compact(self, now: float) -> None:
        """Merge rows into the buckets of their tier and drop those past the retention (see the module)."""
        means = ", ".join([*(f"SUM({c} * span) / SUM(span)" for c in _MEANS), *_RANGES.values()])
        with self._lock, self._db:
            self._db.execute("DELETE FROM samples WHERE time < ?", (now - RETENTION,))
            for level, (age, bucket) in enumerate(TIERS, start=1):
                cutoff = math.floor((now - age) / bucket) * bucket  # whole buckets only
                merged = self._db.execute(
                    f"SELECT model, CAST(time / ? AS INTEGER) * ? AS start, SUM(span), {means}, MAX(num_blocks) "
                    "FROM samples WHERE level < ? AND time < ? GROUP BY model, start",
                    (bucket, bucket, level, cutoff)).fetchall()
                if not merged:
                    continue
                self._db.execute("DELETE FROM samples WHERE level < ? AND time < ?", (level, cutoff))
                self._db.executemany(
                    f"INSERT INTO samples (model, level, time, span, {', '.join([*_MEANS, *_RANGES])}, num_blocks) "
                    f"VALUES ({', '.join('?' * (5 + len(_MEANS) + len(_RANGES)))})",
                    [(row[0], level, *row[1:]) for row in merged])

    def close(self) -> None:
        with self._lock:
            self._db.close()
