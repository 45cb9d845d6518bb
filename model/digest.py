"""Weight identity: a digest of the checkpoint tensors of a span of blocks, as stored in the files.

A node announces the digest of its span; a client that has the checkpoint computes the same from its own
files and refuses nodes whose digest differs (another fine-tune under the same model name). The digest is
of the stored bytes (each tensor's name, dtype, shape and data, in name order), so it does not depend on
the dtype or weight format a node computes in. A tensor belongs to block ``i`` when its name contains
``layers.<i>.`` (the Hugging Face layout of every family here).

Partial checkpoints (a node's folder with only its blocks' shards, a client's with only the head's): a
block has a digest only when every shard file that the index names for its tensors is present, so a
block split across a present and a missing shard is left out rather than hashed from half its tensors.

Hashing reads every byte (about 4 s per GB here), so block digests are cached on disk
(``$XDG_CACHE_HOME/homeswarm/digests.json``, else ``~/.cache/homeswarm/digests.json``), keyed by the
block and the path, size and modification time (ns) of each file holding its tensors: a restart hashes
nothing, a changed or replaced shard is hashed again. A cache that cannot be read is ignored, one that
cannot be written only logged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import struct
import tempfile
import time
from pathlib import Path

from .checkpoint import INDEX_FILE, SINGLE_FILE, block_of

logger = logging.getLogger(__name__)

_CHUNK = 1 << 22
CACHE_VERSION = 1
MAX_CACHE_ENTRIES = 20_000  # the least recently used go first (a K2 is 61 blocks)


def default_cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "homeswarm" / "digests.json"


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def _block_files(model_dir: Path) -> dict[int, set[str]]:
    """Block -> the file names holding its tensors (per the index, present or not)."""
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        names = {name: Path(file_name).name for name, file_name in weight_map.items()}
    elif (model_dir / SINGLE_FILE).is_file():
        names = dict.fromkeys(_header(model_dir / SINGLE_FILE)[1], SINGLE_FILE)
    else:
        return {}
    blocks: dict[int, set[str]] = {}
    for name, file_name in names.items():
        block = block_of(name) if name != "__metadata__" else None
        if block is not None:
            blocks.setdefault(block, set()).add(file_name)
    return blocks


def _cache_key(block: int, files: list[tuple[str, int, int]]) -> str:
    return json.dumps([block, files], separators=(",", ":"))


class DigestCache:
    """Block digests by (block, [(path, size, mtime_ns) of its files]), in one JSON file."""

    def __init__(self, path: str | os.PathLike[str] | None = None) -> None:
        self.path = Path(path) if path is not None else default_cache_path()
        self.entries: dict[str, dict] = {}
        self.changed = False
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return
        if isinstance(data, dict) and data.get("version") == CACHE_VERSION and isinstance(data.get("blocks"), dict):
            self.entries = {k: v for k, v in data["blocks"].items()
                            if isinstance(v, dict) and isinstance(v.get("digest"), str)}

    def get(self, key: str) -> str | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        entry["used"] = time.time()
        self.changed = True
        return entry["digest"]

    def put(self, key: str, digest: str) -> None:
        self.entries[key] = {"digest": digest, "used": time.time()}
        self.changed = True

    def save(self) -> None:
        if not self.changed:
            return
        fresh = sorted(self.entries.items(), key=lambda kv: kv[1].get("used", 0), reverse=True)
        data = {"version": CACHE_VERSION, "blocks": dict(fresh[:MAX_CACHE_ENTRIES])}
        tmp = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".digests-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                json.dump(data, f, separators=(",", ":"))
            os.replace(tmp, self.path)  # atomically: a node and a client may write at once
            self.changed = False
        except OSError as e:
            logger.warning("could not write the weight digest cache %s: %s", self.path, e)
            if tmp is not None:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)


def block_digests(model_dir: str | os.PathLike[str], *,
                  cache_path: str | os.PathLike[str] | None = None) -> dict[int, str]:
    """Block index -> hex digest of its tensors, for every block whose tensors the folder holds in full."""
    model_dir = Path(model_dir).resolve()
    if (model_dir / "gguf.json").is_file():  # a GGUF file's folder: its weights as a checkpoint would hold them
        from .gguf_digest import gguf_block_digests  # (it builds on this module)

        return gguf_block_digests(model_dir, cache_path=cache_path)
    cache = DigestCache(cache_path)
    headers: dict[str, tuple[int, dict]] = {}
    digests: dict[int, str] = {}
    for block, file_names in sorted(_block_files(model_dir).items()):
        paths = [model_dir / name for name in sorted(file_names)]
        if not all(p.is_file() for p in paths):
            continue  # a partial checkpoint without (all of) this block
        stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
        key = _cache_key(block, stats)
        digest = cache.get(key)
        if digest is None:
            digest = _hash_block(block, paths, headers)
            cache.put(key, digest)
        digests[block] = digest
    cache.save()
    return digests


def _hash_block(block: int, paths: list[Path], headers: dict[str, tuple[int, dict]]) -> str:
    entries = []
    for path in paths:
        if str(path) not in headers:
            headers[str(path)] = _header(path)
        data_start, header = headers[str(path)]
        entries += [(name, path, data_start, info) for name, info in header.items()
                    if name != "__metadata__" and block_of(name) == block]
    h = hashlib.sha256()
    for name, path, data_start, info in sorted(entries, key=lambda e: e[0]):
        begin, end = info["data_offsets"]
        h.update(f"{name}\0{info['dtype']}\0{info['shape']}\0{end - begin}\0".encode())
        with open(path, "rb") as f:
            f.seek(data_start + begin)
            left = end - begin
            while left > 0:
                chunk = f.read(min(_CHUNK, left))
                if not chunk:
                    raise ValueError(f"{path} ends inside tensor {name}")
                h.update(chunk)
                left -= len(chunk)
    return h.hexdigest()


def file_block_digest(path: str | os.PathLike[str], block: int) -> str:
    """The digest of block ``block``'s tensors in one safetensors file (a block fetched from peers), uncached."""
    return _hash_block(block, [Path(path)], {})


def span_digest(digests: dict[int, str], start: int, end: int) -> str | None:
    """The digest of blocks [start, end) from per-block digests; None if one of them is unknown."""
    parts = [digests.get(block) for block in range(start, end)]
    if any(part is None for part in parts):
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()  # type: ignore[arg-type]
