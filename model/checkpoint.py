"""Reading named tensors from a Hugging Face safetensors checkpoint.

Responsibility: map tensor names to the file that holds them (``model.safetensors``, or the shards
listed in ``model.safetensors.index.json``) and read just the tensors asked for.

Invariants: :meth:`CheckpointReader.load` opens only the shard files that hold the requested names
and reads only those tensors (each straight into its own memory: :mod:`.tensor_file`), so a node serving a few blocks
of a large model never reads, nor maps into memory, the rest; a name the checkpoint lacks is an error
that lists every missing name, raised before any file is opened. A float8_e4m3fn weight stored with its
block scales (``<name>_scale_inv``, the hub's FP8 layout) is read with them and, when a dtype is asked
for, returned dequantized: callers never see the scales. Integer tensors (packed quantized weights)
keep their dtype whatever float dtype is asked for.

A partial checkpoint is fine: the index may name shard files the folder lacks (a node holds only its
blocks' shards, a client only the head's). Only reading a tensor from a missing file is an error, a
:class:`MissingShardsError` naming the files and what needed them (which blocks, or the head).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import Tensor

from .fp8 import SCALE_SUFFIX, dequantize_fp8
from .tensor_file import TensorEntry, read_header, read_into, read_tensor

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class MissingTensorsError(KeyError):
    """The checkpoint lacks tensors that were asked for; ``missing`` lists them."""

    def __init__(self, model_dir: Path, missing: list[str]) -> None:
        self.missing = missing
        shown = ", ".join(missing[:10]) + (f" ... ({len(missing)} in all)" if len(missing) > 10 else "")
        super().__init__(f"checkpoint {model_dir} lacks tensors: {shown}")

    def __str__(self) -> str:  # KeyError's default str() would wrap the message in quotes
        return str(self.args[0])


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def block_of(name: str) -> int | None:
    """The block a checkpoint tensor belongs to (its name holds ``layers.<i>.``, the Hugging Face layout
    of every family here); None for the rest (embeddings, final norm, LM head)."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


def describe_tensors(names: Iterable[str]) -> str:
    """What tensors are for, in words: "blocks 2, 3" and/or "the embeddings, final norm or LM head"."""
    names = sorted(set(names))
    blocks = sorted({b for b in map(block_of, names) if b is not None})
    parts = [f"block{'s' if len(blocks) > 1 else ''} {', '.join(map(str, blocks))}"] if blocks else []
    if any(block_of(n) is None for n in names):
        parts.append("the embeddings, final norm or LM head")
    shown = ", ".join(names[:3]) + (f", ... ({len(names)} tensors in all)" if len(names) > 3 else "")
    return f"{' and '.join(parts)} ({shown})"


class MissingShardsError(FileNotFoundError):
    """Tensors asked for lie in shard files the (partial) checkpoint folder lacks; ``files`` lists them."""

    def __init__(self, model_dir: Path, files: list[str], names: list[str]) -> None:
        self.files, self.names = files, names
        super().__init__(
            f"checkpoint {model_dir} lacks the shard file{'s' if len(files) > 1 else ''} {', '.join(files)} "
            f"(named in its {INDEX_FILE}), needed for {describe_tensors(names)}"
        )


class CheckpointReader:
    """Names and selective loading of the tensors in one checkpoint folder."""

    def __init__(self, model_dir: str | os.PathLike[str]) -> None:
        self.model_dir = Path(model_dir)
        self._headers: dict[str, dict[str, TensorEntry]] = {}
        if not self.model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {self.model_dir}")
        index_path = self.model_dir / INDEX_FILE
        single_path = self.model_dir / SINGLE_FILE
        if index_path.is_file():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{index_path} is not a valid safetensors index: {e}") from e
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path}: weight_map must be an object")
            self._file_of: dict[str, str] = {}
            for name, file_name in weight_map.items():
                # Shard names come from a file we did not write: keep them inside the model folder.
                if not isinstance(file_name, str) or Path(file_name).name != file_name:
                    raise ValueError(f"{index_path}: invalid shard file name {file_name!r} for {name!r}")
                self._file_of[name] = file_name
        elif single_path.is_file():
            self._headers[SINGLE_FILE] = read_header(single_path)
            self._file_of = dict.fromkeys(self._headers[SINGLE_FILE], SINGLE_FILE)
        else:
            raise FileNotFoundError(f"no {SINGLE_FILE} or {INDEX_FILE} in {self.model_dir}")

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint, sorted."""
        return sorted(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def files_for(self, names: Iterable[str]) -> list[str]:
        """The shard file names that hold ``names`` (sorted), whether the folder has them or not."""
        names = list(names)
        self._require(names, files=False)
        return sorted({self._file_of[n] for n in names})

    def missing_files(self, names: Iterable[str] | None = None) -> list[str]:
        """The shard files holding ``names`` (default: any tensor) that the folder lacks, sorted."""
        files = set(self._file_of.values()) if names is None else set(self.files_for(names))
        return sorted(f for f in files if not (self.model_dir / f).is_file())

    def _require(self, names: list[str], *, files: bool = True) -> None:
        missing = sorted(n for n in set(names) if n not in self._file_of)
        if missing:
            raise MissingTensorsError(self.model_dir, missing)
        if files and self.missing_files(names):
            # name every file the blocks asked for lack, not only the first one a reader tripped on
            blocks = {block_of(n) for n in names} - {None}
            wanted = sorted({*names, *(n for n in self._file_of if block_of(n) in blocks)})
            absent = self.missing_files(wanted)
            raise MissingShardsError(self.model_dir, absent, [n for n in wanted if self._file_of[n] in absent])

    def entry(self, name: str) -> TensorEntry:
        """Where tensor ``name`` lies: its file's header entry (dtype, shape, byte range)."""
        self._require([name])
        return self._header(self._file_of[name])[name]

    def _header(self, file_name: str) -> dict[str, TensorEntry]:
        if file_name not in self._headers:
            self._headers[file_name] = read_header(self.model_dir / file_name)
        return self._headers[file_name]

    def read_into(self, name: str, out: Tensor) -> Tensor:
        """Read tensor ``name`` into ``out`` (its final storage, e.g. one expert's slice of a stacked
        tensor), converting to ``out``'s dtype. Not for FP8 weights stored with block scales."""
        entry = self.entry(name)
        return read_into(self.model_dir / self._file_of[name], name, entry, out)

    def load(self, names: Iterable[str], dtype: torch.dtype | None = None,
             device: str | torch.device = "cpu") -> dict[str, Tensor]:
        """Read ``names``, cast to ``dtype`` (None keeps the stored dtype) and move to ``device``.

        Each tensor is read straight into a tensor of its own (:mod:`.tensor_file`), converted on the
        way by a bounded staging buffer: no file stays mapped, and no float copy of more than the
        tensor asked for is ever made."""
        names = list(dict.fromkeys(names))
        self._require(names)
        out: dict[str, Tensor] = {}
        for name in names:
            entry = self.entry(name)
            path = self.model_dir / self._file_of[name]
            scale_name = name + SCALE_SUFFIX
            fp8 = entry.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            if dtype is not None and fp8 and scale_name in self._file_of:
                scale = read_tensor(self.model_dir / self._file_of[scale_name], scale_name, self.entry(scale_name))
                tensor = dequantize_fp8(read_tensor(path, name, entry).to(device), scale, dtype)
            else:
                # integer tensors are packed quantized weights: a float dtype is not theirs
                keep = dtype is None or not (entry.dtype.is_floating_point or entry.dtype.is_complex)
                tensor = read_tensor(path, name, entry, entry.dtype if keep else dtype)
            out[name] = tensor.to(device=device)
        return out
