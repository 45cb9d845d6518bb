"""A GGUF file as a checkpoint folder: what lets every reader of ``MODEL_DIR`` take ``FILE.gguf``.

Responsibility: :func:`gguf_folder` turns a GGUF path (or the first part of a split one) into a small
folder holding what a Hugging Face checkpoint keeps beside its weights, derived from the GGUF's metadata
(``config.json``, ``tokenizer.json``, ``tokenizer_config.json`` with the chat template,
``generation_config.json``), and ``gguf.json`` naming the GGUF file(s); :func:`open_checkpoint` gives the
tensor reader of any folder (a :class:`~.gguf_reader.GGUFCheckpoint` for such a folder, else a
:class:`~.checkpoint.CheckpointReader`). The folder is named after the file's stem (the default model
name) and lives in ``$XDG_CACHE_HOME/homeswarm/gguf`` (else ``~/.cache/homeswarm/gguf``), keyed by the
file's path, size and modification time: it is made once, again when the file changes.

Invariants: no tensor is ever copied into the folder (weights are read from the GGUF itself); the folder
is written whole into a temporary place and renamed, so a reader never sees half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from .checkpoint import CheckpointReader
from .gguf_reader import FLOAT_TYPES, GGUFCheckpoint, gguf_paths, model_stem
from .gguf_tokenizer import build_tokenizer, tokenizer_config

MARKER = "gguf.json"
# the file types a node announces (``gguf-TYPE``; routing's records accept these, a test keeps them equal);
# a type llama.cpp names later is announced as ``gguf-other``
GGUF_TYPES = ("f32", "f16", "bf16", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q8_1", "q2_k", "q2_k_s", "q3_k",
              "q3_k_s", "q3_k_m", "q3_k_l", "q4_k", "q4_k_s", "q4_k_m", "q5_k", "q5_k_s", "q5_k_m", "q6_k", "q8_k",
              "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s", "iq2_m", "iq3_xxs", "iq3_xs", "iq3_s", "iq3_m",
              "iq4_nl", "iq4_xs", "tq1_0", "tq2_0", "q1_0", "mxfp4", "mxfp4_moe", "nvfp4", "other")
_VERSION = 1


def is_gguf_path(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` names a GGUF file (by its suffix: the file may not exist yet)."""
    return str(path).lower().endswith(".gguf")


def is_gguf_folder(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` is a folder :func:`gguf_folder` made."""
    return (Path(model_dir) / MARKER).is_file()


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "homeswarm" / "gguf"


def gguf_folder(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The checkpoint folder standing for the GGUF ``path`` (made now if it is missing or stale).

    Raises FileNotFoundError for a missing file (or part of a split) and ValueError for a GGUF this
    package cannot serve (unknown architecture, unsupported metadata or tokenizer)."""
    paths = [p.resolve() for p in gguf_paths(path)]
    stats = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    key = hashlib.sha256(json.dumps([_VERSION, stats]).encode()).hexdigest()[:16]
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / key / model_stem(paths[0])
    if (target / MARKER).is_file():
        return target
    checkpoint = GGUFCheckpoint(paths[0])
    config = checkpoint.config_dict()
    files = {"config.json": config, "tokenizer_config.json": tokenizer_config(checkpoint.metadata),
             "generation_config.json": {k: config[k] for k in ("bos_token_id", "eos_token_id") if config.get(k) is not None},
             MARKER: {"version": _VERSION, "files": [str(p) for p in paths], "file_type": checkpoint.file_type()}}
    from .config import ModelConfig

    ModelConfig.from_dict(config)  # refused now, not when a block loads
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=target.parent))
    try:
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, indent=1), encoding="utf-8")
        if checkpoint.metadata.get("tokenizer.ggml.tokens"):
            build_tokenizer(checkpoint.metadata).save(str(staging / "tokenizer.json"))
        try:
            staging.rename(target)
        except OSError:  # another process made it first
            if not (target / MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _marker(model_dir: str | os.PathLike[str]) -> dict:
    return json.loads((Path(model_dir) / MARKER).read_text(encoding="utf-8"))


def open_checkpoint(model_dir: str | os.PathLike[str]) -> CheckpointReader | GGUFCheckpoint:
    """The tensor reader of ``model_dir``: the GGUF it stands for, or its safetensors."""
    if is_gguf_folder(model_dir):
        return GGUFCheckpoint(_marker(model_dir)["files"][0])
    if is_gguf_path(model_dir):
        return GGUFCheckpoint(model_dir)
    return CheckpointReader(model_dir)


def gguf_weight_format(model_dir: str | os.PathLike[str], start: int, end: int) -> str | None:
    """What a node serving blocks ``[start, end)`` from the GGUF folder ``model_dir`` announces: ``gguf-f32``,
    ``gguf-f16``, ``gguf-bf16`` when every tensor of the span is stored so (the file's floats), else
    ``gguf-`` and the file's type (``gguf-q4_k_m``); None for a folder that is no GGUF's."""
    if not is_gguf_folder(model_dir):
        return None
    types = GGUFCheckpoint(_marker(model_dir)["files"][0]).block_types(start, end)
    if types and types <= set(FLOAT_TYPES):  # norms stay F32 in a GGUF: the narrowest type is the file's
        return "gguf-" + next(t for t in ("BF16", "F16", "F32") if t in types).lower()
    file_type = _marker(model_dir)["file_type"]
    return f"gguf-{file_type if file_type in GGUF_TYPES else 'other'}"
