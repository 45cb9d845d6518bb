"""Building a :class:`BlockSpan` or :class:`ClientHead` from a checkpoint folder.

Responsibility: read the config, read exactly the tensors of the requested part of the model, and
put them into modules, in the requested dtype and on the requested device.

Invariants: modules are created on the meta device and receive the loaded tensors by assignment,
block by block, so peak memory is about the size of the part's weights plus one block, never of the
whole model; every parameter of the part must come from the checkpoint (strict loading: missing
tensors are an error naming them); what is returned is in eval mode with ``requires_grad`` off.
Checkpoint names: ours mirror Hugging Face's, except where a family's ``aliases`` rename a part, and
stacked experts (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]), which come
either under those names (transformers 5's fused layout) or from per-expert tensors
(``experts.{e}.gate_proj.weight`` ..., Mixtral's ``w1``/``w3``/``w2``) stacked at load.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import nn

from .blocks import BlockSpan, fuse_projections
from .checkpoint import CheckpointReader, MissingTensorsError
from .config import ModelConfig
from .families import Family, family_of
from .head import ClientHead
from .mxfp4 import dequantize_mxfp4
from .quant import DEFAULT_INT4_GROUP_SIZE, check_quant, quantize_block

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


def _checkpoint_name(family: Family, layer: int, key: str) -> str:
    for ours, theirs in family.aliases:
        key = key.replace(ours, theirs, 1)
    return f"model.layers.{layer}.{key}"


def _sources(reader: CheckpointReader, family: Family, layer: int, key: str,
             num_experts: int) -> tuple[str, list[str]] | None:
    """How parameter ``key`` of block ``layer`` is stored: ("direct", [name]), ("mxfp4", [blocks, scales]),
    or ("gate_up" | "down", per-expert names), or None when the checkpoint has neither."""
    name = _checkpoint_name(family, layer, key)
    if name in reader:
        return "direct", [name]
    if f"{name}_blocks" in reader and f"{name}_scales" in reader:  # MXFP4 (GPT-OSS experts)
        return "mxfp4", [f"{name}_blocks", f"{name}_scales"]
    gate, up, down = family.expert_names
    if key.endswith("experts.gate_up_proj"):
        base = name[: -len("gate_up_proj")]
        names = [f"{base}{e}.{part}.weight" for e in range(num_experts) for part in (gate, up)]
        return "gate_up", names
    if key.endswith("experts.down_proj"):
        base = name[: -len("down_proj")]
        return "down", [f"{base}{e}.{down}.weight" for e in range(num_experts)]
    return None


def _block_state(reader: CheckpointReader, config: ModelConfig, layer: int, keys: list[str],
                 dtype: torch.dtype, device: str | torch.device) -> dict[str, torch.Tensor]:
    """The tensors of block ``layer`` for our parameter names ``keys`` (relative to the block)."""
    family = family_of(config.family)
    num_experts = config.moe.num_experts if config.moe is not None else 0
    plans = {key: _sources(reader, family, layer, key, num_experts) for key in keys}
    missing = [_checkpoint_name(family, layer, k) for k, plan in plans.items() if plan is None]
    names = [n for plan in plans.values() if plan is not None for n in plan[1]]
    missing += [n for n in names if n not in reader]
    if missing:
        raise MissingTensorsError(reader.model_dir, sorted(set(missing)))
    packed = {n for plan in plans.values() if plan is not None and plan[0] == "mxfp4" for n in plan[1]}
    loaded = reader.load([n for n in names if n not in packed], dtype=dtype, device=device)
    loaded.update(reader.load(packed, device=device))  # packed bytes keep their dtype until dequantized
    # Tensors read from a file are views of its memory map, which stays mapped (with every page read
    # through it counted in the node's memory) while any of them lives. When some of this block's
    # tensors are converted, copy the rest too, so the map goes away with the block's originals.
    # Integer tensors are packed weights, converted by their module (BitNet's ternary layers).
    converted = (any(plan is not None and plan[0] != "direct" for plan in plans.values())
                 or any(not t.is_floating_point() for t in loaded.values()))
    state = {}
    for key, (kind, key_names) in plans.items():  # type: ignore[misc]
        tensors = [loaded.pop(n) for n in key_names]
        if kind == "direct":
            state[key] = tensors[0].clone() if converted else tensors[0]
        elif kind == "mxfp4":
            state[key] = dequantize_mxfp4(*tensors, dtype=dtype)
        elif kind == "gate_up":  # [gate_e; up_e] per expert, gate rows first
            state[key] = torch.stack([torch.cat(tensors[i : i + 2]) for i in range(0, len(tensors), 2)])
        else:
            state[key] = torch.stack(tensors)
        del tensors
    return state


def check_model_quant(config: ModelConfig, quant: str) -> None:
    """Raise ValueError where a model's checkpoint cannot take the weight format ``quant``."""
    if quant != "none" and config.family == "bitnet":
        raise ValueError(f"a BitNet checkpoint's weights are ternary already; serve it with --quant none, "
                         f"not {quant!r}")


def load_span(model_dir: str | os.PathLike[str], start: int, end: int, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu", quant: str = "none",
              group_size: int = DEFAULT_INT4_GROUP_SIZE, on_block: Callable[[int], None] | None = None,
              fuse: bool = True) -> BlockSpan:
    """Load blocks ``[start, end)``, reading only their tensors from the checkpoint, one block at a time.

    ``quant`` ("none", "int8", "int4" with ``group_size``): quantize each block's linear weights as
    soon as it is loaded (see :mod:`.quant`), so the float copy of one block only ever exists.
    ``on_block(i)`` is called once block ``i`` is loaded (a progress bar).
    ``fuse``: stack the q/k/v and the gate/up projections of each block into one matrix each, before
    quantizing (:func:`~.blocks.fuse_projections`), so a decoding step runs fewer, larger products.
    """
    _check_dtype(dtype)
    check_quant(quant, group_size)
    config = ModelConfig.from_dir(model_dir)
    if not 0 <= start < end <= config.num_hidden_layers:
        raise ValueError(f"invalid block range [{start}, {end}) for a model with {config.num_hidden_layers} blocks")
    check_model_quant(config, quant)
    reader = CheckpointReader(model_dir)
    with torch.device("meta"):
        span = BlockSpan(config, start, end)
    wide = family_of(config.family).float32_params
    if config.prequant is not None:  # 4-bit weights' scales: read in float32 (exact for 16-bit ones) in any span dtype
        wide += (".scales", ".weight_scale")
    for j, block in enumerate(span.layers):
        keys = list(block.state_dict())
        narrow = [k for k in keys if not k.endswith(wide)]
        state = _block_state(reader, config, start + j, narrow, dtype, device)
        # copies, as _block_state copies tensors beside converted ones: the file's map goes with the block
        wide_state = _block_state(reader, config, start + j, [k for k in keys if k.endswith(wide)],
                                  torch.float32, device)
        state.update({k: v.clone() for k, v in wide_state.items()})
        block.load_state_dict(state, strict=True, assign=True)
        del state, wide_state  # the block alone holds its float weights, until quantized
        if fuse:
            fuse_projections(block)
        quantize_block(block, quant, group_size)
        if on_block is not None:
            on_block(start + j)
    span.eval()
    span.requires_grad_(False)
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
