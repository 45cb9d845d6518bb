"""The throughput self-test's cache: keyed per model, blocks, dtype, weight format, device and threads;
stale, corrupt or unwritable files never stop a node."""

from __future__ import annotations

import dataclasses
import json

from homeswarm.node.throughput import MAX_AGE, ThroughputCache, ThroughputKey, default_cache_path

KEY = ThroughputKey("tiny", "abc123", 0, 4, "float32", "none", "cpu", 2)


def test_put_then_get(tmp_path):
    cache = ThroughputCache(tmp_path / "t.json")
    assert cache.get(KEY, now=100.0) is None
    cache.put(KEY, 123.5, now=100.0)
    assert cache.get(KEY, now=200.0) == 123.5
    assert ThroughputCache(tmp_path / "t.json").get(KEY, now=200.0) == 123.5  # on disk


def test_every_part_of_the_key_matters(tmp_path):
    cache = ThroughputCache(tmp_path / "t.json")
    cache.put(KEY, 50.0, now=0.0)
    for field, value in [("model", "other"), ("config_digest", "def"), ("start", 4), ("end", 8),
                         ("dtype", "bfloat16"), ("quant", "int8"), ("device", "cuda:0"), ("threads", 1)]:
        assert cache.get(dataclasses.replace(KEY, **{field: value}), now=1.0) is None, field


def test_an_estimate_for_another_span_of_the_same_setup(tmp_path):
    cache = ThroughputCache(tmp_path / "t.json")
    cache.put(KEY, 50.0, now=0.0)
    other_span = dataclasses.replace(KEY, start=4, end=8)
    assert cache.get(other_span, now=1.0) is None
    assert cache.estimate(other_span, now=1.0) == 50.0
    assert cache.estimate(dataclasses.replace(other_span, dtype="float16"), now=1.0) is None


def test_old_entries_are_measured_again(tmp_path):
    cache = ThroughputCache(tmp_path / "t.json")
    cache.put(KEY, 50.0, now=0.0)
    assert cache.get(KEY, now=MAX_AGE - 1) == 50.0
    assert cache.get(KEY, now=MAX_AGE + 1) is None
    assert cache.get(KEY, now=-10.0) is None  # measured "in the future": a clock that jumped


def test_a_corrupt_file_is_ignored_and_replaced(tmp_path):
    path = tmp_path / "t.json"
    for junk in ("not json", "[1, 2]", json.dumps({KEY.text(): {"throughput": "fast", "measured_at": 0}}),
                 json.dumps({KEY.text(): {"throughput": -1, "measured_at": 0}})):
        path.write_text(junk)
        assert ThroughputCache(path).get(KEY, now=1.0) is None
    ThroughputCache(path).put(KEY, 7.0, now=0.0)
    assert ThroughputCache(path).get(KEY, now=1.0) == 7.0


def test_an_unwritable_place_only_logs(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("")
    cache = ThroughputCache(blocker / "sub" / "t.json")  # a file where a folder should be
    cache.put(KEY, 1.0, now=0.0)
    assert "could not write the throughput cache" in caplog.text


def test_default_path_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "homeswarm" / "throughput.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / ".cache" / "homeswarm" / "throughput.json"
