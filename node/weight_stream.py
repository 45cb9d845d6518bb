"""A block's tensors as one canonical safetensors file: what the Weights rpc sends and a fetching node writes.

The file holds the block's tensors in name order, contiguous, with a header of sorted keys and no
metadata, padded with spaces to 8 bytes (as safetensors writes it). It depends only on the tensors'
names, dtypes, shapes and bytes, which is what ``model.digest`` hashes: every node holding tensors of the
same digest sends byte for byte the same file, so a transfer broken off resumes at its offset from any of
them, and the file read back has the block's announced digest.

The same canonical form carries a client's "head" (the tensors of no block: ``head_layout``); a tokenizer
file goes as it is (``file_layout``). ``block_layout`` maps the file's bytes onto the checkpoint files a
node holds (it never reads a node's in-memory, possibly quantized, tensors); ``check_header`` validates a
header received from a peer before anything in it is trusted. Pure but for reading headers and bytes from
disk; no sockets.
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from homeswarm.model.checkpoint import INDEX_FILE, SINGLE_FILE, block_of

# a block's header: a few hundred bytes per tensor; anything far beyond is not a header
MAX_HEADER_BYTES = 1 << 22
_DTYPES = frozenset({"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "I16", "U16", "F16", "BF16",
                     "I32", "U32", "F32", "F64", "I64", "U64"})


class WeightStreamError(ValueError):
    """A block file or header that is not what it must be (message: one line)."""


@dataclass(frozen=True)
class Segment:
    """``length`` bytes of the block file, read from ``path`` at ``file_offset``."""

    path: Path
    file_offset: int
    length: int


@dataclass(frozen=True)
class BlockLayout:
    """The block file: its header (with the 8-byte length before it), then its tensors' bytes."""

    block: int
    header: bytes
    segments: tuple[Segment, ...]

    @property
    def total_bytes(self) -> int:
        return len(self.header) + sum(s.length for s in self.segments)


def _read_header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > 1 << 30:
            raise WeightStreamError(f"{path}: a {length}-byte header is not safetensors")
        return 8 + length, json.loads(f.read(length))


def encode_header(tensors: dict[str, dict]) -> bytes:
    """The 8-byte length and the JSON header of ``tensors`` (name -> dtype, shape, data_offsets), padded."""
    text = json.dumps(tensors, sort_keys=True, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def _weight_files(model_dir: Path) -> list[str]:
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({Path(f).name for f in weight_map.values()})
    return [SINGLE_FILE] if (model_dir / SINGLE_FILE).is_file() else []


def block_layout(model_dir: str | Path, block: int) -> BlockLayout | None:
    """The block file of ``block`` from the checkpoint in ``model_dir``; None when the folder does not hold
    every file its index names for the block's tensors (or holds none of them)."""
    return _layout(Path(model_dir), lambda tensor: block_of(tensor) == block, block)


def head_layout(model_dir: str | Path) -> BlockLayout | None:
    """The same for the tensors of no block (embeddings, final norm, LM head): a client's "head" file."""
    return _layout(Path(model_dir), lambda tensor: block_of(tensor) is None, -1)


def file_layout(path: Path) -> BlockLayout:
    """A whole small file (a tokenizer's), as it is."""
    return BlockLayout(-1, b"", (Segment(path, 0, path.stat().st_size),))


def layout_digest(layout: BlockLayout) -> str:
    """sha256 (hex) of the file ``layout`` describes."""
    h = hashlib.sha256()
    for offset in range(0, layout.total_bytes, 1 << 22):
        h.update(read_range(layout, offset, 1 << 22))
    return h.hexdigest()


def _layout(model_dir: Path, wanted: Callable[[str], bool], block: int) -> BlockLayout | None:
    entries: dict[str, tuple[Path, int, dict]] = {}
    try:
        for name in _weight_files(model_dir):
            path = model_dir / name
            if not path.is_file():
                # a missing file holding a wanted tensor leaves the file incomplete; others do not matter
                index = json.loads((model_dir / INDEX_FILE).read_text(encoding="utf-8"))["weight_map"]
                if any(Path(f).name == name and wanted(t) for t, f in index.items()):
                    return None
                continue
            data_start, header = _read_header(path)
            for tensor, info in header.items():
                if tensor != "__metadata__" and wanted(tensor):
                    entries[tensor] = (path, data_start, info)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise WeightStreamError(f"cannot read the checkpoint in {model_dir}: {e}") from None
    if not entries:
        return None
    tensors, segments, offset = {}, [], 0
    for tensor in sorted(entries):
        path, data_start, info = entries[tensor]
        begin, end = info["data_offsets"]
        tensors[tensor] = {"dtype": info["dtype"], "shape": info["shape"], "data_offsets": [offset, offset + end - begin]}
        segments.append(Segment(path, data_start + begin, end - begin))
        offset += end - begin
    return BlockLayout(block, encode_header(tensors), tuple(segments))


def read_range(layout: BlockLayout, offset: int, size: int) -> bytes:
    """Bytes [offset, offset + size) of the block file (fewer at its end), read from the checkpoint files."""
    out = bytearray()
    if offset < len(layout.header):
        out += layout.header[offset : offset + size]
    position = len(layout.header)
    for segment in layout.segments:
        if len(out) >= size:
            break
        want_from = offset + len(out)
        if want_from < position + segment.length:
            skip = want_from - position
            take = min(segment.length - skip, size - len(out))
            with open(segment.path, "rb") as f:
                f.seek(segment.file_offset + skip)
                data = f.read(take)
            if len(data) != take:
                raise WeightStreamError(f"{segment.path} ends early")
            out += data
        position += segment.length
    return bytes(out)


def check_header(prefix: bytes, block: int, total_bytes: int) -> dict[str, dict]:
    """The tensors of a received block file's header, after checking that the header (the file's first
    bytes, ``prefix``, which may run past it) is canonical for ``block`` and that the tensors fill exactly
    ``total_bytes``; ``WeightStreamError`` otherwise."""
    if len(prefix) < 8:
        raise WeightStreamError("the block file is shorter than a safetensors header")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or len(prefix) < 8 + length:
        raise WeightStreamError(f"a {length}-byte header is not a block's")
    try:
        tensors = json.loads(prefix[8 : 8 + length])
    except ValueError as e:
        raise WeightStreamError(f"the header is not JSON: {e}") from None
    if not isinstance(tensors, dict) or not tensors:
        raise WeightStreamError("the header names no tensors")
    offset = 0
    for name in sorted(tensors):
        info = tensors[name]
        if block_of(name) != block:
            raise WeightStreamError(f"tensor {name[:120]!r} is not of block {block}")
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(info, dict) and info.get("dtype") in _DTYPES and isinstance(info.get("shape"), list)
                and all(isinstance(d, int) and d >= 0 for d in info["shape"])
                and isinstance(offsets, list) and len(offsets) == 2 and offsets[0] == offset
                and isinstance(offsets[1], int) and offsets[1] >= offset):
            raise WeightStreamError(f"tensor {name[:120]!r}: bad entry in the header")
        offset = offsets[1]
    if encode_header(tensors) != prefix[: 8 + length]:
        raise WeightStreamError("the header is not in canonical form")
    if 8 + length + offset != total_bytes:
        raise WeightStreamError(f"the header's tensors fill {8 + length + offset} bytes, the file has {total_bytes}")
    return tensors
