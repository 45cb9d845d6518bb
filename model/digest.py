"""Weight identity: a digest of the checkpoint tensors of a span of blocks, as stored in the files.

A node announces the digest of its span; a client that has the checkpoint computes the same from its own
files and refuses nodes whose digest differs (another fine-tune under the same model name). The digest is
of the stored bytes (each tensor's name, dtype, shape and data, in name order), so it does not depend on
the dtype or weight format a node computes in. A tensor belongs to block ``i`` when its name contains
``layers.<i>.`` (the Hugging Face layout of every family here). Block digests are cached per file state.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import struct
from pathlib import Path

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
_CHUNK = 1 << 22


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
        return [model_dir / Path(name).name for name in names]
    single = model_dir / "model.safetensors"
    return [single] if single.is_file() else []


def _header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        return 8 + length, json.loads(f.read(length))


def _state(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """What the cache key holds of the files: name, size and modification time of each."""
    files = _safetensors_files(model_dir)
    return tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if p.is_file())


def block_digests(model_dir: str | os.PathLike[str]) -> dict[int, str]:
    """Block index -> hex digest of its tensors, for every block whose tensors the folder holds."""
    model_dir = Path(model_dir).resolve()
    return dict(_block_digests(model_dir, _state(model_dir)))


@functools.lru_cache(maxsize=8)
def _block_digests(model_dir: Path, state: tuple) -> tuple[tuple[int, str], ...]:
    tensors: dict[int, list[tuple[str, Path, int, dict]]] = {}
    for path in _safetensors_files(model_dir):
        data_start, header = _header(path)
        for name, info in header.items():
            match = _LAYER.search(name) if name != "__metadata__" else None
            if match:
                tensors.setdefault(int(match.group(1)), []).append((name, path, data_start, info))
    digests = []
    for block, entries in sorted(tensors.items()):
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
        digests.append((block, h.hexdigest()))
    return tuple(digests)


def span_digest(digests: dict[int, str], start: int, end: int) -> str | None:
    """The digest of blocks [start, end) from per-block digests; None if one of them is unknown."""
    parts = [digests.get(block) for block in range(start, end)]
    if any(part is None for part in parts):
        return None
    return hashlib.sha256("|".join(parts).encode()).hexdigest()  # type: ignore[arg-type]
