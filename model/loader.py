"""Building a :class:`BlockSpan` or :class:`ClientHead` from a checkpoint folder.

Responsibility: read the config, read exactly the tensors of the requested part of the model, and
put them into modules, in the requested dtype and on the requested device.

Invariants: modules are created on the meta device and receive the loaded tensors by assignment,
block by block and within a block part by part (attention, router, experts or each expert's layers,
shared expert: :func:`_load_units`), each part fused and quantized before the next is read, and the
heap handed back to the system as the process grows; so the load peaks at the span's final memory plus
about one part's float copies, never a block's or the model's; every parameter of the part must come from the checkpoint (strict loading: missing
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
from torch import Tensor, nn

from .blocks import BlockSpan, fuse_projections
from .checkpoint import CheckpointReader, MissingTensorsError
from .config import ModelConfig
from .families import Family, family_of
from .gguf_files import open_checkpoint
from .gguf_reader import GGUFCheckpoint
from .head import ClientHead
from .heap import HeapTrimmer
from .moe import Experts
from .mxfp4 import dequantize_mxfp4
from .quant import (
    DEFAULT_INT4_GROUP_SIZE,
    QuantizedExperts,
    check_quant,
    is_quantizable,
    quantize_block,
    quantize_linear,
)

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}

# The heap is trimmed once the process grew this much since the last trim (and after every block): a
# trim costs a pass over the heap, and a block may have 1,000 parts.
_TRIM_BYTES = 32 << 20

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


def _sources(reader: CheckpointReader | GGUFCheckpoint, family: Family, layer: int, key: str,
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


def _read_stacked(reader: CheckpointReader | GGUFCheckpoint, names: list[str], rows: list[int], dtype: torch.dtype,
                  device: str | torch.device) -> Tensor:
    """Per-expert tensors read one by one into one stacked tensor ``[E, sum(rows), ...]``: ``names`` in
    order, ``rows`` each part's rows (gate then up for ``gate_up``), so no second copy is ever made."""
    parts = len(rows)
    first = reader.entry(names[0])
    out = torch.empty((len(names) // parts, sum(rows), *first.shape[1:]), dtype=dtype)
    for i, name in enumerate(names):
        expert, part = divmod(i, parts)
        begin = sum(rows[:part])
        target = out[expert, begin : begin + rows[part]]
        if reader.entry(name).dtype.is_floating_point and reader.entry(name).dtype.itemsize == 1:
            target.copy_(reader.load([name], dtype=dtype)[name])  # FP8 with its block scales
        else:
            reader.read_into(name, target)
    return out.to(device)


def _block_state(reader: CheckpointReader | GGUFCheckpoint, config: ModelConfig, layer: int, keys: list[str],
                 dtype: torch.dtype | None, device: str | torch.device) -> dict[str, Tensor]:
    """The tensors of block ``layer`` for our parameter names ``keys`` (relative to the block), each read
    straight into its own memory (``dtype`` None: as stored)."""
    family = family_of(config.family)
    num_experts = config.moe.num_experts if config.moe is not None else 0
    plans = {key: _sources(reader, family, layer, key, num_experts) for key in keys}
    missing = [_checkpoint_name(family, layer, k) for k, plan in plans.items() if plan is None]
    names = [n for plan in plans.values() if plan is not None for n in plan[1]]
    missing += [n for n in names if n not in reader]
    if missing:
        raise MissingTensorsError(reader.model_dir, sorted(set(missing)))
    state = {}
    for key, (kind, key_names) in plans.items():  # type: ignore[misc]
        if kind == "direct":
            state[key] = reader.load(key_names, dtype=dtype, device=device)[key_names[0]]
        elif kind == "mxfp4":  # packed bytes keep their dtype until dequantized
            packed = reader.load(key_names, device=device)
            state[key] = dequantize_mxfp4(*(packed.pop(n) for n in key_names), dtype=dtype)
        else:
            out_dtype = dtype if dtype is not None else reader.entry(key_names[0]).dtype
            rows = [reader.entry(n).shape[0] for n in key_names[: 2 if kind == "gate_up" else 1]]
            state[key] = _read_stacked(reader, key_names, rows, out_dtype, device)
    return state


def _load_units(module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """The disjoint parts of a block that load one after the other: a module that fuses its children
    (attention, a gated MLP), holds tensors of its own (stacked experts) or has no children loads
    whole; any other is split into its children's parts. Names are dotted paths with a trailing dot."""
    own = [k for k in module.state_dict(keep_vars=True) if "." not in k]
    children = list(module.named_children())
    if callable(getattr(module, "fuse", None)) or own or not children:
        return [(prefix, module)] if module.state_dict(keep_vars=True) else []
    return [unit for name, child in children for unit in _load_units(child, f"{prefix}{name}.")]


def _quantize_unit(block: nn.Module, name: str, unit: nn.Module, quant: str, group_size: int) -> None:
    """Quantize a loaded part of a block in place, as :func:`~.quant.quantize_block` would the block."""
    if quant == "none":
        return
    path = name.rstrip(".")
    if path and is_quantizable(path, unit):
        parent_name, _, child = path.rpartition(".")
        parent = block.get_submodule(parent_name) if parent_name else block
        new = (QuantizedExperts.from_experts(unit, quant, group_size) if isinstance(unit, Experts)
               else quantize_linear(unit, quant, group_size))  # type: ignore[arg-type]
        setattr(parent, child, new)
        new.requires_grad_(False)
    else:
        quantize_block(unit, quant, group_size)


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

    ``quant`` ("none", "int8", "int4" with ``group_size``): quantize each part's linear weights as
    soon as it is loaded (see :mod:`.quant`), so the float copy of one part only ever exists.
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
    reader = open_checkpoint(model_dir)  # safetensors, or the GGUF a folder stands for
    with torch.device("meta"):
        span = BlockSpan(config, start, end)
    wide = family_of(config.family).float32_params
    # 4-bit weights' scales: read as stored (16-bit ones keep every value, whatever the span's dtype)
    stored = (".scales", ".weight_scale") if config.prequant is not None else ()
    trimmer = HeapTrimmer(_TRIM_BYTES)  # what parts free goes back to the system, not only to the heap
    for j, block in enumerate(span.layers):
        for name, unit in _load_units(block):
            keys = [name + k for k in unit.state_dict(keep_vars=True)]
            state = _block_state(reader, config, start + j, [k for k in keys if not k.endswith(wide + stored)],
                                 dtype, device)
            state.update(_block_state(reader, config, start + j, [k for k in keys if k.endswith(wide)],
                                      torch.float32, device))
            state.update(_block_state(reader, config, start + j,
                                      [k for k in keys if k.endswith(stored) and not k.endswith(wide)], None, device))
            unit.load_state_dict({k[len(name):]: v for k, v in state.items()}, strict=True, assign=True)
            read = sum(t.numel() * t.element_size() for t in state.values())
            del state  # the part alone holds its float weights, until quantized
            if fuse:
                fuse_projections(unit)
                if callable(getattr(unit, "fuse", None)):
                    unit.fuse()
            _quantize_unit(block, name, unit, quant, group_size)
            trimmer.after(read)
        trimmer.trim(collect=True)
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
    reader = open_checkpoint(model_dir)  # safetensors, or the GGUF a folder stands for
    names = {_HEAD_EMBED: "embed_tokens.weight", _HEAD_NORM: "norm.weight"}
    if not config.tie_word_embeddings:
        names[_HEAD_LM] = "lm_head.weight"
    with torch.device("meta"):
        head = ClientHead(config)
    loaded = reader.load(names, dtype=dtype, device=device)
    _finish(head, {names[name]: tensor for name, tensor in loaded.items()})
    return head
