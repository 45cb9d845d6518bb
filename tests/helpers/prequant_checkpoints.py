"""A tiny checkpoint written the way the hub ships 4-bit ones (GPTQ, compressed-tensors pack-quantized),
with its dequantized twin for transformers.

From a float checkpoint (tests/helpers/checkpoints.py), every linear weight of the blocks is quantized
in groups (symmetric: zero point 8 of 0..15; asymmetric: min/max), stored in the format's own tensors
with 16-bit scales, and also written back dequantized, ``(q - z) * scale`` in float32, into a plain
checkpoint that transformers loads (it would need the gptqmodel or compressed-tensors package to read
the packed one).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from homeswarm.model.prequant import pack_int32

FORMATS = ("gptq", "gptq_asym", "compressed", "compressed_asym")
_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _quantize(w: torch.Tensor, group: int, symmetric: bool, scale_dtype: torch.dtype):
    """``w`` [N, K] -> (values [N, K] in 0..15, zero points [N, K / g] in 0..15, scales [N, K / g])."""
    rows, cols = w.shape
    g = w.view(rows, cols // group, group)
    if symmetric:
        scales = (g.abs().amax(-1) / 7).clamp(min=1e-6).to(scale_dtype)
        zeros = torch.full_like(scales, 8, dtype=torch.int64)
    else:
        low, high = g.amin(-1), g.amax(-1)
        scales = ((high - low) / 15).clamp(min=1e-6).to(scale_dtype)
        # 1..15: GPTQ stores zero points minus one in 4 bits, where 0 would not survive
        zeros = torch.round(-low / scales.float()).clamp(1, 15).to(torch.int64)
    q = torch.round(g / scales.float()[..., None] + zeros[..., None]).clamp(0, 15).to(torch.int64)
    return q.view(rows, cols), zeros, scales


# Kimi K2 Thinking's list: only the routed experts are 4-bit
EXPERTS_ONLY_IGNORE = ["lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|down)_proj.*"]


def write_prequantized(source: str | Path, quantized: str | Path, dequantized: str | Path, fmt: str,
                       group: int = 32, experts_only: bool = False) -> tuple[Path, Path]:
    """Write ``source``'s checkpoint in ``fmt`` (one of FORMATS) and its dequantized twin; return both.
    ``experts_only``: quantize the routed experts only (per-expert tensors), as Kimi K2 Thinking does."""
    quantized, dequantized = Path(quantized), Path(dequantized)
    shutil.copytree(source, dequantized)
    quantized.mkdir(parents=True)
    tensors = load_file(str(Path(source) / "model.safetensors"))
    symmetric = not fmt.endswith("_asym")
    scale_dtype = torch.float16 if fmt.startswith("gptq") else torch.bfloat16
    packed, plain = {}, {}
    for name, tensor in tensors.items():
        parts = name.split(".")
        if (not (name.startswith("model.layers.") and parts[-2] in _LINEARS and parts[-1] == "weight")
                or (experts_only and ".mlp.experts." not in name)):
            packed[name] = plain[name] = tensor
            continue
        base = name[: -len("weight")]
        q, zeros, scales = _quantize(tensor.float(), group, symmetric, scale_dtype)
        zeros_full = zeros.repeat_interleave(group, dim=1)
        plain[name] = ((q - zeros_full) * scales.float().repeat_interleave(group, dim=1)).to(tensor.dtype)
        rows, cols = tensor.shape
        if fmt.startswith("gptq"):
            packed[base + "qweight"] = pack_int32(q.T, 0)
            packed[base + "qzeros"] = pack_int32((zeros - 1).T % 16, 1)  # stored minus one
            packed[base + "scales"] = scales.T.contiguous()
            packed[base + "g_idx"] = (torch.arange(cols) // group).to(torch.int32)
        else:
            packed[base + "weight_packed"] = pack_int32(q, 1)  # q - 8, stored offset by 8
            packed[base + "weight_scale"] = scales
            packed[base + "weight_shape"] = torch.tensor([rows, cols])
            if not symmetric:
                packed[base + "weight_zero_point"] = pack_int32(zeros, 0)
    save_file(packed, str(quantized / "model.safetensors"), metadata={"format": "pt"})
    save_file(plain, str(dequantized / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((Path(source) / "config.json").read_text())
    if fmt.startswith("gptq"):
        config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                         "sym": symmetric, "checkpoint_format": "gptq"}
    else:
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized",
            "ignore": EXPERTS_ONLY_IGNORE if experts_only else ["lm_head"],
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                "num_bits": 4, "type": "int", "symmetric": symmetric, "strategy": "group", "group_size": group,
                "dynamic": False, "actorder": None}}}}
    (quantized / "config.json").write_text(json.dumps(config, indent=2))
    for extra in Path(source).iterdir():
        if extra.name not in ("config.json", "model.safetensors"):
            shutil.copy(extra, quantized / extra.name)
    return quantized, dequantized


def shard_by_block(path: str | Path, blocks_per_shard: int = 1) -> Path:
    """Split ``path``'s single safetensors file into shards of ``blocks_per_shard`` blocks each (what no
    block holds in the first), with an index, as the hub stores large checkpoints; return ``path``."""
    path = Path(path)
    tensors = load_file(str(path / "model.safetensors"))
    shards: dict[int, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        match = re.match(r"model\.layers\.(\d+)\.", name)
        shards.setdefault(1 + int(match.group(1)) // blocks_per_shard if match else 0, {})[name] = tensor
    count, weight_map = len(shards), {}
    for i, (_, part) in enumerate(sorted(shards.items())):
        file_name = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(part, str(path / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file_name))
    (path / "model.safetensors").unlink()
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path
