"""Weight identity of a GGUF file's blocks: the digest its weights would have as a safetensors checkpoint.

Responsibility: :func:`gguf_block_digests` gives, for each block of the GGUF a folder of
:mod:`.gguf_files` stands for, the digest :mod:`.digest` computes over a float32 safetensors checkpoint of
the same weights: each tensor under its Hugging Face checkpoint name (experts one by one, as checkpoints
store them, except GPT-OSS's fused stacks), its dtype ``F32``, its shape and its float32 bytes, in name
order; Q/K rows in Hugging Face's order. So a node serving an F32 (or F16/BF16: widened exactly) GGUF and a
node serving the float32 safetensors it was converted from announce the same digest, and clients holding
either accept both.

A quantized tensor (Q4_0, Q8_0, Q4_K ...) is hashed as stored instead, its dtype ``GGUF_<TYPE>``: its
weights are a function of those bytes, so the digest still names exactly the weights a node computes
with, and they differ from any float checkpoint's, so such a node meets float nodes only under an
explicit ``--model-name`` (and clients holding the float weights still refuse it). Dequantizing first
would cost a 40 GB Q4 file about 280 GB of float32 to hash (4 s/GB here: ~20 min, against ~3 min).

Invariants: one expert's or one tensor's values at a time are held, never a block; digests are cached
like safetensors ones, keyed by the block and the GGUF files' paths, sizes and modification times.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import block_of
from .digest import DigestCache, _cache_key
from .gguf_reader import FLOAT_TYPES, GGUFCheckpoint

_VERSION = "gguf-1"
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
            digest = _hash_block(checkpoint, by_block.get(block, []))
            cache.put(key, digest)
        digests[block] = digest
    cache.save()
    return digests


def _hash_block(checkpoint: GGUFCheckpoint, names: list[str]) -> str:
    h = hashlib.sha256()
    for name, dtype, shape, data in sorted(_tensors(checkpoint, names), key=lambda entry: entry[0]):
        h.update(f"{name}\0{dtype}\0{list(shape)}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def _tensors(checkpoint: GGUFCheckpoint, names: list[str]) -> Iterator[tuple[str, str, tuple[int, ...], bytes]]:
    """(checkpoint name, dtype, shape, bytes) of each tensor of ``names``, fused expert stacks one expert each."""
    per_expert = checkpoint.arch != "gpt-oss"  # GPT-OSS checkpoints store the fused stacks themselves
    parts_of = {"gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}
    if checkpoint.config_dict()["model_type"] == "mixtral":
        parts_of = {"gate_up_proj": ("w1", "w3"), "down_proj": ("w2",)}
    for name in names:
        fused = _FUSED.match(name) if per_expert else None
        if fused is None:
            yield _whole(checkpoint, name)
            continue
        stacks = checkpoint._parts(name)
        for stack, part in zip(stacks, parts_of[fused.group(2)], strict=True):
            data = np.asarray(stack.data)
            rows, cols = int(stack.shape[1]), int(stack.shape[0])
            for e in range(int(stack.shape[2])):
                expert = f"{fused.group(1)}{e}.{part}.weight"
                yield expert, *_values(checkpoint, stack, (rows, cols), data[e])


def _whole(checkpoint: GGUFCheckpoint, name: str) -> tuple[str, str, tuple[int, ...], bytes]:
    parts = checkpoint._parts(name)
    shape = checkpoint.entry(name).shape
    kinds = [t.tensor_type.name for t in parts]
    if all(kind in FLOAT_TYPES for kind in kinds):
        out = checkpoint.read_into(name, torch.empty(shape, dtype=torch.float32))
        return name, "F32", shape, out.numpy().tobytes()
    data = b"".join(np.asarray(t.data).tobytes() for t in parts)
    return name, "GGUF_" + "+".join(kinds), shape, data


def _values(checkpoint: GGUFCheckpoint, t: Any, shape: tuple[int, int], data: np.ndarray) -> tuple[str, tuple[int, ...], bytes]:
    if t.tensor_type.name in FLOAT_TYPES:
        out = torch.empty(shape, dtype=torch.float32)
        checkpoint._convert(t, out, data)
        return "F32", shape, out.numpy().tobytes()
    return f"GGUF_{t.tensor_type.name}", shape, np.ascontiguousarray(data).tobytes()
