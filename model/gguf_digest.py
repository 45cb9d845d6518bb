"""Weight identity of a GGUF file's blocks: the digest its weights would have as a safetensors checkpoint.

Responsibility: :func:`gguf_block_digests` gives, for each block of the GGUF a folder of
:mod:`.gguf_files` stands for, the digest :mod:`.digest` computes over a safetensors checkpoint of the
same weights: each tensor under its Hugging Face checkpoint name (experts one by one, as checkpoints
store them, except GPT-OSS's fused stacks), its dtype, its shape and its bytes, in name order, Q/K rows
in Hugging Face's order. The dtype is the block's: BF16 or F16 where the file stores the block's matrices
so (its F32 norms and biases, which llama.cpp keeps F32, converted to it, as the checkpoint holds them),
else F32. So a node serving an F32 GGUF and one serving the float32 safetensors it was converted from
announce the same digest, as do a BF16 GGUF's and its bfloat16 hub checkpoint's, and clients holding
either accept both.

A quantized tensor (Q4_0, Q8_0, Q4_K ...) is hashed as stored instead, its dtype ``GGUF_<TYPE>``: its
weights are a function of those bytes, so the digest still names exactly the weights a node computes
with, and they differ from any float checkpoint's, so such a node meets float nodes only under an
explicit ``--model-name`` (and clients holding the float weights still refuse it). Dequantizing first
would mean hashing about 7x the bytes: a 40 GB Q4 file as about 280 GB of float32 (sha256 alone ran at
1.5 s/GB here, loaded: ~7 min against ~1 min, before the dequantization's own time).

Invariants: one expert's or one tensor's values at a time are held, never a block; digests are cached
like safetensors ones, keyed by the block and the GGUF files' paths, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import block_of
from .digest import DigestCache, _cache_key
from .gguf_reader import FLOAT_TYPES, GGUFCheckpoint

_VERSION = "gguf-2"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_FUSED = re.compile(r"^(model\.layers\.\d+\.(?:mlp|block_sparse_moe)\.experts\.)(gate_up_proj|down_proj)$")


def gguf_block_digests(model_dir: str | os.PathLike[str], *,
                       cache_path: str | os.PathLike[str] | None = None) -> dict[int, str]:
    """Block index -> digest, for every block of the GGUF that ``model_dir`` (a GGUF folder) stands for."""
    marker = json.loads((Path(model_dir) / "gguf.json").read_text(encoding="utf-8"))
    paths = [Path(p) for p in marker["files"]]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    checkpoint = GGUFCheckpoint(paths[0])
    layers = int(checkpoint.config_dict()["num_hidden_layers"])
    cache = DigestCache(cache_path)
    by_block: dict[int, list[str]] = {}
    digests: dict[int, str] = {}
    for name in checkpoint.names():
        block = block_of(name)
        if block is not None and block < layers:
            by_block.setdefault(block, []).append(name)
    for block in range(layers):
        key = _cache_key(block, [[_VERSION], *stats])
        digest = cache.get(key)
        if digest is None:
            digest = _hash_block(checkpoint, by_block.get(block, []), _block_dtype(checkpoint, block))
            cache.put(key, digest)
        digests[block] = digest
    cache.save()
    return digests


def _block_dtype(checkpoint: GGUFCheckpoint, block: int) -> str:
    """The dtype a checkpoint of the block's float tensors has: BF16 or F16 where the file stores its
    matrices so (llama.cpp keeps norms and biases F32 beside them), else F32."""
    kinds = checkpoint.block_types(block, block + 1)
    return next((kind for kind in ("BF16", "F16") if kind in kinds), "F32")


def _hash_block(checkpoint: GGUFCheckpoint, names: list[str], dtype: str = "F32") -> str:
    """The block's tensors in name order, each read only when its turn comes (a block is never held); float
    ones in ``dtype``."""
    h = hashlib.sha256()
    for name, produce in sorted(_entries(checkpoint, names, dtype), key=lambda entry: entry[0]):
        dtype, shape, size, chunks = produce()
        h.update(f"{name}\0{dtype}\0{list(shape)}\0{size}\0".encode())
        for chunk in chunks:
            h.update(chunk)
    return h.hexdigest()


Produce = Callable[[], tuple[str, tuple[int, ...], int, Iterator[bytes]]]


def _entries(checkpoint: GGUFCheckpoint, names: list[str], dtype: str) -> Iterator[tuple[str, Produce]]:
    """(checkpoint name, how to read it: dtype, shape, byte count, chunks of bytes) of each tensor of
    ``names``, fused expert stacks one expert each (GPT-OSS's kept fused, read an expert at a time)."""
    parts_of = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    if checkpoint.config_dict()["model_type"] == "mixtral":
        parts_of = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
    for name in names:
        fused = _FUSED.match(name)
        if fused is None or checkpoint.arch == "gpt-oss":
            yield name, partial(_whole, checkpoint, name, dtype)
            continue
        for stack, part in zip(checkpoint.parts(name), parts_of[fused.group(2)], strict=True):
            for e in range(int(stack.shape[2])):
                yield f"{fused.group(1)}{e}.{part}.weight", partial(_expert, checkpoint, stack, e, dtype)


def _floats(dtype: str, shape: tuple[int, ...]) -> tuple[str, tuple[int, ...], int]:
    return dtype, shape, _DTYPES[dtype].itemsize * math.prod(shape)


def _bytes(values: torch.Tensor) -> bytes:
    """A tensor's bytes as safetensors stores them (numpy has no bfloat16: its 16 bits as they are)."""
    return (values.view(torch.int16) if values.dtype == torch.bfloat16 else values).numpy().tobytes()


def _expert(checkpoint: GGUFCheckpoint, stack: Any, e: int, dtype: str) -> tuple[str, tuple[int, ...], int, Iterator[bytes]]:
    """One expert's matrix of a llama.cpp stack ``[E, rows, columns]``."""
    shape = (int(stack.shape[1]), int(stack.shape[0]))
    data = np.asarray(stack.data)[e]
    if stack.tensor_type.name not in FLOAT_TYPES:
        return f"GGUF_{stack.tensor_type.name}", shape, data.nbytes, iter([np.ascontiguousarray(data).tobytes()])
    out = torch.empty(shape, dtype=_DTYPES[dtype])
    checkpoint.convert(stack, out, data)
    return (*_floats(dtype, shape), iter([_bytes(out)]))


def _whole(checkpoint: GGUFCheckpoint, name: str, dtype: str) -> tuple[str, tuple[int, ...], int, Iterator[bytes]]:
    parts = checkpoint.parts(name)
    shape = checkpoint.entry(name).shape
    kinds = [t.tensor_type.name for t in parts]
    if not all(kind in FLOAT_TYPES for kind in kinds):
        return ("GGUF_" + "+".join(kinds), shape, sum(int(t.n_bytes) for t in parts),
                (np.asarray(t.data).tobytes() for t in parts))
    if checkpoint.arch == "gpt-oss" and len(shape) == 3:  # a fused stack: contiguous expert by expert
        return (*_floats(dtype, shape), _oss_experts(checkpoint, name, parts, shape, dtype))
    out = checkpoint.read_into(name, torch.empty(shape, dtype=_DTYPES[dtype]))
    return (*_floats(dtype, shape), iter([_bytes(out)]))


def _oss_experts(checkpoint: GGUFCheckpoint, name: str, parts: list[Any], shape: tuple[int, ...],
                 dtype: str) -> Iterator[bytes]:
    """GPT-OSS's ``gate_up_proj`` [E, H, 2I] (gate and up interleaved) or ``down_proj`` [E, I, H], one
    expert's float32 bytes at a time."""
    for e in range(shape[0]):
        out = torch.empty(shape[1:], dtype=_DTYPES[dtype])
        for offset, t in enumerate(parts):
            part = torch.empty(int(t.shape[1]), int(t.shape[0]))
            checkpoint.convert(t, part, np.asarray(t.data)[e])
            (out[:, offset::2] if name.endswith("gate_up_proj") else out).copy_(part.t())
        yield _bytes(out)
