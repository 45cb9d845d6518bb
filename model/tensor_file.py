"""Reading tensors from a safetensors file straight into memory the caller owns, never through a map.

Responsibility: parse a safetensors header once (names, dtypes, shapes, byte ranges) and copy a
tensor's bytes with ``readinto`` into its final storage: a fresh tensor, or a slice of a larger one
(stacked experts). A dtype conversion goes through a bounded staging buffer, rows at a time.

Why not ``safe_open``: its tensors are views of the file's memory map, and every page read through a
map counts in the process's resident memory for as long as any view of the file lives; a node that
fuses or converts some of a block's tensors would hold both the file's pages and the copies. Bytes
read with ``readinto`` go to the page cache, which the kernel reclaims and which no process is charged for.

Invariants: a tensor's bytes are checked to lie inside the file before anything is read; a read that
ends early is an error naming the file and the tensor; nothing here keeps a file open between calls.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# safetensors dtype names -> torch dtypes (those torch has)
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
_MAX_HEADER = 100 << 20  # safetensors' own limit on the header's size
_STAGING_BYTES = 16 << 20  # a dtype conversion reads this much of the stored form at a time


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in its file."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_header(path: str | os.PathLike[str]) -> dict[str, TensorEntry]:
    """Name -> :class:`TensorEntry` for every tensor of the safetensors file ``path``."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its header length)")
        (length,) = struct.unpack("<Q", head)
        if length > min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path} is not a safetensors file (header length {length})")
        try:
            header = json.loads(f.read(length))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: the safetensors header is not valid JSON: {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the safetensors header is not an object")
    data_start = 8 + length
    entries = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[info["dtype"]]
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: tensor {name!r} has an invalid or unsupported header entry ({e})") from None
        entry = TensorEntry(dtype, shape, data_start + begin, data_start + end)
        if begin < 0 or entry.end > size or end - begin != entry.numel * dtype.itemsize:
            raise ValueError(f"{path}: tensor {name!r} has data offsets [{begin}, {end}) that do not fit "
                             f"its shape {list(shape)} and dtype {info['dtype']} inside the file")
        entries[name] = entry
    return entries


def _readinto(f, view: memoryview, offset: int, path: Path, name: str) -> None:  # noqa: ANN001
    f.seek(offset)
    done = 0
    while done < len(view):
        n = f.readinto(view[done:])
        if not n:
            raise ValueError(f"{path} ends inside tensor {name!r}")
        done += n


def _bytes_of(t: Tensor) -> memoryview:
    """A writable byte view of contiguous CPU tensor ``t``'s storage."""
    return memoryview(t.view(-1).view(torch.uint8).numpy()).cast("B")


def read_into(path: str | os.PathLike[str], name: str, entry: TensorEntry, out: Tensor) -> Tensor:
    """Read tensor ``name`` (at ``entry`` of file ``path``) into ``out`` (same number of elements, any
    shape, contiguous, on the CPU), converting to ``out``'s dtype; returns ``out``."""
    path = Path(path)
    if out.numel() != entry.numel:
        raise ValueError(f"{path}: tensor {name!r} has shape {list(entry.shape)}, not {list(out.shape)}")
    if not out.is_contiguous() or out.device.type != "cpu":
        raise ValueError("read_into needs a contiguous CPU tensor to read into")
    if entry.numel == 0:
        return out
    with open(path, "rb", buffering=0) as f:
        if out.dtype == entry.dtype:
            _readinto(f, _bytes_of(out), entry.begin, path, name)
            return out
        flat = out.view(-1)
        step = max(1, _STAGING_BYTES // entry.dtype.itemsize)
        staging = torch.empty(min(step, entry.numel), dtype=entry.dtype)
        for start in range(0, entry.numel, step):
            count = min(step, entry.numel - start)
            part = staging[:count]
            _readinto(f, _bytes_of(part), entry.begin + start * entry.dtype.itemsize, path, name)
            flat[start : start + count].copy_(part)
    return out


def read_tensor(path: str | os.PathLike[str], name: str, entry: TensorEntry,
                dtype: torch.dtype | None = None) -> Tensor:
    """Tensor ``name`` as a new tensor of its shape, in ``dtype`` (None: as stored)."""
    out = torch.empty(entry.shape, dtype=entry.dtype if dtype is None else dtype)
    return read_into(path, name, entry, out)
