"""Building a :class:`BlockSpan` or :class:`ClientHead` from a checkpoint folder.

Responsibility: read the config, read exactly the tensors of the requested part of the model, and
put them into modules, in the requested dtype and on the requested device.

Invariants: modules are created on the meta device and receive the loaded tensors by assignment, so
peak memory is about the size of the part's weights, never of the whole model; every parameter
of the part must come from the checkpoint (strict loading: missing tensors are an error naming them);
what is returned is in eval mode with ``requires_grad`` off.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from .blocks import BlockSpan
from .checkpoint import CheckpointReader
from .config import ModelConfig
from .head import ClientHead

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

_HEAD_EMBED = "model.embed_tokens.weight"
_HEAD_NORM = "model.norm.weight"
_HEAD_LM = "lm_head.weight"


def parse_dtype(name: str) -> torch.dtype:
    """"float32" | "bfloat16" | "float16" (or "fp32" | "bf16" | "fp16") -> the torch dtype."""
    try:
        return _DTYPES[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"unsupported dtype {name!r}; use float32, bfloat16 or float16") from None


def _finish(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    # Strict + assign: every parameter must be replaced by a real tensor, none left on meta.
    module.load_state_dict(state, strict=True, assign=True)
    module.eval()
    module.requires_grad_(False)


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use torch.float32, torch.bfloat16 or torch.float16")


def load_span(model_dir: str | os.PathLike[str], start: int, end: int, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> BlockSpan:
    """Load blocks ``[start, end)``, reading only their tensors from the checkpoint."""
    _check_dtype(dtype)
    config = ModelConfig.from_dir(model_dir)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"invalid block range [{start}, {end}) for a model with {config.num_hidden_layers} blocks")
    reader = CheckpointReader(model_dir)
    with torch.device("meta"):
        span = BlockSpan(config, start, end)
    # Checkpoint name model.layers.{i}.X <-> span parameter layers.{i - start}.X
    wanted = {f"model.layers.{start + j}.{key[len(f'layers.{j}.'):]}": key
              for j in range(end - start) for key in span.state_dict() if key.startswith(f"layers.{j}.")}
    loaded = reader.load(wanted, dtype=dtype, device=device)
    _finish(span, {wanted[name]: tensor for name, tensor in loaded.items()})
    return span


def load_head(model_dir: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu") -> ClientHead:
    """Load the embedding, the final norm and (when untied) the LM head; nothing else."""
    _check_dtype(dtype)
    config = ModelConfig.from_dir(model_dir)
    reader = CheckpointReader(model_dir)
    names = {_HEAD_EMBED: "embed_tokens.weight", _HEAD_NORM: "norm.weight"}
    if not config.tie_word_embeddings:
        names[_HEAD_LM] = "lm_head.weight"
    with torch.device("meta"):
        head = ClientHead(config)
    loaded = reader.load(names, dtype=dtype, device=device)
    _finish(head, {names[name]: tensor for name, tensor in loaded.items()})
    return head
