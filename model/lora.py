"""LoRA adapters in PEFT's format, applied to a span as low-rank additions beside the base weights.

Responsibility: read an adapter folder as ``peft`` saves it (``adapter_config.json`` and
``adapter_model.safetensors``, without importing ``peft``), refusing what it would compute differently
(DoRA, rank or alpha patterns, trained biases, ``modules_to_save``, targets that are not a block's
linear layers); and make an *adapted view* of a :class:`BlockSpan`: the same modules and weights, except
that each targeted linear layer is wrapped in a :class:`LoraLinear` computing
``base(x) + scale * (x @ A^T) @ B^T`` as PEFT's ``Linear`` does.

Invariants: the base span is never modified (a view shares its weights and clones only the modules on
the path to a wrapped layer), so requests that name no adapter run exactly the code they ran before;
only tensors of the requested blocks are read; q/k/v and gate/up projections that the loader fused
into one matrix get their adapter in the matching slice of the fused output; a base layer may be
quantized (the low-rank path runs in the span's dtype beside it).
"""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch import Tensor, nn

from .blocks import BlockSpan

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
# PEFT's key for a LoRA matrix of a block's linear layer (saved without the adapter's name; a name, as in
# "lora_A.default.weight", is accepted too)
_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight")
# the projections the loader may fuse (model.blocks.fuse_projections): checkpoint name -> (fused name, part)
_FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
          "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}
# settings that change what PEFT computes and that we do not implement: refused when set
_REFUSED = {"use_dora": "DoRA (use_dora)", "rank_pattern": "per-module ranks (rank_pattern)",
            "alpha_pattern": "per-module alphas (alpha_pattern)", "modules_to_save": "modules_to_save",
            "layer_replication": "layer_replication", "lora_bias": "trained LoRA biases (lora_bias)",
            "target_parameters": "target_parameters", "trainable_token_indices": "trainable_token_indices",
            "fan_in_fan_out": "fan_in_fan_out (Conv1D base layers)", "use_qalora": "QA-LoRA (use_qalora)",
            "use_bdlora": "use_bdlora", "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens)",
            "arrow_config": "arrow_config", "astra_config": "astra_config", "kasa_config": "kasa_config",
            "monteclora_config": "monteclora_config", "velora_config": "velora_config"}


class AdapterError(ValueError):
    """An adapter folder that cannot be served: the message says which file and what."""


@dataclass(frozen=True)
class LoraSettings:
    r: int
    alpha: float
    scale: float  # alpha / r, or alpha / sqrt(r) with use_rslora


@dataclass(frozen=True)
class LoraPart:
    """One adapted projection inside a (possibly fused) linear layer: output columns [lo, hi)."""

    lo: int
    hi: int
    a: Tensor  # [r, in_features]
    b: Tensor  # [hi - lo, r]
    scale: float


class LoraLinear(nn.Module):
    """A linear layer (plain or quantized) plus low-rank additions on slices of its output."""

    def __init__(self, base: nn.Module, parts: list[LoraPart]) -> None:
        super().__init__()
        self.base = base
        self.parts = parts
        self.out_features = base.out_features
        self.in_features = base.in_features

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        for part in self.parts:
            # PEFT's order: B(A(x)) times the scale, added to the base output
            delta = F.linear(F.linear(x, part.a), part.b) * part.scale
            if part.lo == 0 and part.hi == y.shape[-1]:
                y = y + delta
            else:
                y[..., part.lo : part.hi] += delta
        return y


def read_settings(folder: str | Path) -> LoraSettings:
    """The adapter's rank and scale from its adapter_config.json; AdapterError for what we cannot serve."""
    path = Path(folder) / CONFIG_FILE
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{path}: cannot read it as JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (LORA only)")
    for key, what in _REFUSED.items():
        if config.get(key):
            raise AdapterError(f"{path}: {what} is not supported")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config.get('bias')!r} is not supported (only 'none')")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
    return LoraSettings(r=r, alpha=float(alpha), scale=scale)


def adapter_keys(folder: str | Path) -> dict[str, tuple[int, str, str]]:
    """Every tensor key of the adapter's weights -> (block, checkpoint module path, "A" or "B"), read from
    the file's header; AdapterError for a key that is not a LoRA matrix of a block's layer."""
    path = Path(folder) / WEIGHTS_FILE
    if not path.is_file():
        raise AdapterError(f"{path}: missing (the adapter's weights, as peft's save_pretrained writes them)")
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises several kinds on a bad header
        raise AdapterError(f"{path}: not a safetensors file ({e})") from None
    parsed = {}
    for key in keys:
        match = _KEY.fullmatch(key)
        if match is None:
            raise AdapterError(f"{path}: tensor {key!r} is not a LoRA matrix of a block's linear layer "
                               f"(only lora_A / lora_B of the blocks are supported)")
        parsed[key] = (int(match[1]), match[2], match[3])
    if not parsed:
        raise AdapterError(f"{path}: holds no LoRA matrices")
    return parsed


def our_path(path: str, aliases: tuple[tuple[str, str], ...]) -> str:
    """A checkpoint module path (``block_sparse_moe.gate``) as our modules name it (``mlp.gate``)."""
    for ours, theirs in aliases:
        if path.startswith(theirs):
            return ours + path[len(theirs):]
    return path


def checkpoint_path(path: str, aliases: tuple[tuple[str, str], ...]) -> str:
    """One of our module paths (``mlp.gate``) as the checkpoint names it (``block_sparse_moe.gate``)."""
    for ours, theirs in aliases:
        if path.startswith(ours):
            return theirs + path[len(ours):]
    return path


def resolve(block: nn.Module, path: str) -> tuple[str, int | None]:
    """Where checkpoint projection ``path`` (ours) lives in a built block: its own module (part None) or the
    fused module and its part's index; AdapterError if the block has no such linear layer."""
    try:
        module = block.get_submodule(path)
    except AttributeError:
        parent_path, _, name = path.rpartition(".")
        if name not in _FUSED:
            raise AdapterError(f"the blocks have no linear layer {path!r} to adapt") from None
        fused, part = _FUSED[name]
        fused_path = f"{parent_path}.{fused}" if parent_path else fused
        try:
            block.get_submodule(fused_path)
        except AttributeError:
            raise AdapterError(f"the blocks have no linear layer {path!r} to adapt") from None
        return fused_path, part
    if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
        raise AdapterError(f"{path!r} is not a linear layer of the blocks ({type(module).__name__})")
    return path, None


def _part_sizes(parent: nn.Module, fused: str) -> list[int]:
    """Output widths of the projections stacked in a fused module, in their order."""
    if fused == "qkv_proj":
        kv = parent.num_kv_heads * parent.head_dim
        return [parent.num_heads * parent.head_dim, kv, kv]
    return [parent.intermediate_size, parent.intermediate_size]


def load_parts(folder: str | Path, span: BlockSpan, aliases: tuple[tuple[str, str], ...] = ()
               ) -> dict[int, dict[str, list[LoraPart]]]:
    """The adapter's parts for the span's blocks: block -> module path in the span's layer -> parts. Reads only
    the tensors of blocks [span.start, span.end), cast to the span's dtype and device."""
    settings = read_settings(folder)
    keys = adapter_keys(folder)
    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key, (block, path, which) in keys.items():
        if span.start <= block < span.end:
            pairs.setdefault((block, our_path(path, aliases)), {})[which] = key
    parts: dict[int, dict[str, list[LoraPart]]] = {}
    with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="pt") as f:
        for (block, path), found in sorted(pairs.items()):
            if set(found) != {"A", "B"}:
                raise AdapterError(f"{folder}: block {block} {path}: lora_A and lora_B must come together")
            a, b = f.get_tensor(found["A"]), f.get_tensor(found["B"])
            if a.dim() != 2 or a.shape[0] != settings.r:
                raise AdapterError(f"{folder}: block {block} {path}: lora_A {tuple(a.shape)} does not have "
                                   f"r={settings.r} rows")
            try:
                where, part = place(span.layers[block - span.start], path, a.to(span.device, span.dtype),
                                    b.to(span.device, span.dtype), settings.scale)
            except AdapterError as e:
                raise AdapterError(f"{folder}: block {block} {e}") from None
            parts.setdefault(block, {}).setdefault(where, []).append(part)
    return parts


def place(layer: nn.Module, path: str, a: Tensor, b: Tensor, scale: float) -> tuple[str, LoraPart]:
    """Where LoRA matrices ``a`` [r, in], ``b`` [out, r] of checkpoint projection ``path`` (ours) go in a
    built block ``layer``: the module's path and the part (its output slice, when fused); AdapterError when
    the block has no such linear layer or the shapes do not fit it."""
    where, index = resolve(layer, path)
    target = layer.get_submodule(where)
    if index is None:
        lo, hi = 0, target.out_features
    else:
        parent, _, fused = where.rpartition(".")
        sizes = _part_sizes(layer.get_submodule(parent), fused)
        lo = sum(sizes[:index])
        hi = lo + sizes[index]
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != target.in_features or b.shape != (hi - lo, a.shape[0]):
        raise AdapterError(f"{path}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit the layer's "
                           f"{target.in_features} -> {hi - lo} features at rank {a.shape[0] if a.dim() else '?'}")
    return where, LoraPart(lo, hi, a, b, scale)


def _replaced(root: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """A shallow copy of ``root`` whose submodule at ``path`` is ``new``; ``root`` and everything off the
    path are shared, not copied."""
    head, _, rest = path.partition(".")
    clone = copy.copy(root)
    clone._modules = dict(root._modules)
    clone._modules[head] = new if not rest else _replaced(root._modules[head], rest, new)
    return clone


def adapted_span(span: BlockSpan, parts: dict[int, dict[str, list[LoraPart]]]) -> BlockSpan:
    """A view of ``span`` with ``parts`` (of :func:`load_parts`, for the span or a larger one) applied."""
    view = span.subspan(span.start, span.end)
    for block, modules in parts.items():
        if not span.start <= block < span.end:
            continue
        layer = view.layers[block - span.start]
        for path, layer_parts in modules.items():
            layer = _replaced(layer, path, LoraLinear(layer.get_submodule(path), layer_parts))
        view.layers[block - span.start] = layer
    return view


def check_targets(folder: str | Path, block: nn.Module, aliases: tuple[tuple[str, str], ...] = ()) -> None:
    """AdapterError unless every module the adapter names is a linear layer of ``block`` (one built block of
    the model, e.g. on the meta device): checks a folder before any weight is loaded."""
    read_settings(folder)
    for path in sorted({path for _, path, _ in adapter_keys(folder).values()}):
        resolve(block, our_path(path, aliases))


def meta_block(config: object, layer: int = 0, *, fuse: bool = True) -> nn.Module:
    """Block ``layer`` of a model built on the meta device (no memory), fused as the loader fuses it."""
    from .blocks import build_block, fuse_projections

    with torch.device("meta"):
        block = build_block(config, layer)  # type: ignore[arg-type]
    if fuse:
        fuse_projections(block)
    return block
