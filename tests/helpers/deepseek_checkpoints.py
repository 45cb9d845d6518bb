"""Tiny random DeepSeek-V3 and Kimi K2 checkpoints, saved by transformers itself, and their FP8 form.

Variants: ``deepseek_v3`` (low-rank queries, 4 expert groups of which 2 are kept, interleaved RoPE),
``deepseek_v3_full_q`` (``q_lora_rank`` None, RoPE over halves, weights not renormalised) and
``kimi_k2`` (one expert group; transformers has no ``kimi_k2`` model type, so the checkpoint is the
DeepSeek-V3 one with ``model_type`` changed in config.json, and the reference loads it as DeepSeek-V3).
All use YaRN with ``mscale`` != ``mscale_all_dim`` (so both the cos/sin factor and the softmax scale
differ from 1), keep layer 0 dense, and have routers and score-correction biases scaled so that each
token's experts win by a clear margin. :func:`write_fp8` stores a checkpoint the way the hub stores
DeepSeek-V3: 2-D linear weights in float8_e4m3fn with one float32 ``weight_scale_inv`` per 128x128 block.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.helpers.moe_checkpoints import randomize_moe

DEEPSEEK_VARIANTS = ("deepseek_v3", "deepseek_v3_full_q", "kimi_k2")
FP8_BLOCK = 128
_E4M3_MAX = 448.0

_NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def deepseek_config(variant: str, *, num_layers: int = 4, **overrides: Any) -> transformers.DeepseekV3Config:
    kwargs: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=4, rms_norm_eps=1e-5, max_position_embeddings=1024, tie_word_embeddings=False,
        # dense layers' MLP wider than one 128-row FP8 block (a partial second block)
        intermediate_size=160, moe_intermediate_size=24, n_routed_experts=8, num_experts_per_tok=2,
        n_shared_experts=2, first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
        routed_scaling_factor=2.5, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, rope_interleave=True, attention_bias=False,
        # a short original context, so the YaRN ramp spans extrapolated, mixed and interpolated frequencies
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 256, "beta_fast": 32.0, "beta_slow": 1.0,
                         "mscale": 1.0, "mscale_all_dim": 0.8},
        **_NO_SPECIAL_TOKENS,
    )
    if variant == "deepseek_v3_full_q":
        kwargs.update(q_lora_rank=None, rope_interleave=False, norm_topk_prob=False, n_group=2, topk_group=1)
    elif variant == "kimi_k2":
        kwargs.update(n_group=1, topk_group=1, n_shared_experts=1, routed_scaling_factor=2.827)
    elif variant != "deepseek_v3":
        raise ValueError(f"unknown DeepSeek test variant {variant!r}; known: {DEEPSEEK_VARIANTS}")
    kwargs.update(overrides)
    return transformers.DeepseekV3Config(**kwargs)


def make_deepseek_checkpoint(path: str | Path, variant: str, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a random float32 checkpoint of ``variant`` into ``path``; return it."""
    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    config = deepseek_config(variant, **overrides)
    torch.manual_seed(seed)
    model = transformers.DeepseekV3ForCausalLM(config).to(torch.float32)
    randomize_moe(model, seed)
    _randomize_routers(model, seed)
    model.save_pretrained(path)
    if variant == "kimi_k2":
        _set_config(path, model_type="kimi_k2")
    return path


@torch.no_grad()
def _randomize_routers(model: torch.nn.Module, seed: int) -> None:
    # Sigmoid scores saturate: a milder gate than randomize_moe's keeps them spread over (0, 1). The
    # score-correction biases (buffers, which randomize_moe leaves at zero) move the choice away from
    # the plain top-k of the scores, so ignoring them, or adding them to the weights, shows.
    gen = torch.Generator().manual_seed(seed + 2000)
    for name, module in model.named_modules():
        if name.endswith("mlp.gate"):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * (2.0 / module.weight.shape[-1] ** 0.5))
            module.e_score_correction_bias.copy_(0.3 * torch.randn(module.e_score_correction_bias.shape, generator=gen))


def _set_config(path: Path, **fields: Any) -> None:
    config_path = path / "config.json"
    data = json.loads(config_path.read_text())
    data.update(fields)
    config_path.write_text(json.dumps(data, indent=2))


def reference_deepseek(path: str | Path) -> transformers.DeepseekV3ForCausalLM:
    """The checkpoint loaded by transformers as DeepSeek-V3 (Kimi K2 included), float32, eager attention."""
    transformers.utils.logging.disable_progress_bar()
    data = json.loads((Path(path) / "config.json").read_text())
    for key in ("model_type", "quantization_config", "architectures", "transformers_version"):
        data.pop(key, None)
    config = transformers.DeepseekV3Config(**data)
    model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, config=config, dtype=torch.float32,
                                                              attn_implementation="eager")
    return model.eval()


def is_quantized(name: str, tensor: torch.Tensor) -> bool:
    """Whether the hub's FP8 checkpoints store this tensor in float8: 2-D linear weights, except the
    embeddings, the LM head and the routers."""
    return (tensor.dim() == 2 and name.endswith(".weight") and "embed_tokens" not in name
            and not name.startswith("lm_head") and not name.endswith("mlp.gate.weight"))


def quantize_fp8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(float8_e4m3fn weight, float32 scale_inv [ceil(rows / 128), ceil(cols / 128)]): each block's
    largest magnitude maps to e4m3's largest value; the last blocks of a dimension may be partial."""
    rows, cols = weight.shape
    grid = (math.ceil(rows / FP8_BLOCK), math.ceil(cols / FP8_BLOCK))
    scale = torch.empty(grid, dtype=torch.float32)
    quantized = torch.empty(weight.shape, dtype=torch.float8_e4m3fn)
    for i in range(grid[0]):
        for j in range(grid[1]):
            block = (slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK))
            w = weight[block].to(torch.float32)
            s = w.abs().max().clamp(min=1e-12) / _E4M3_MAX
            scale[i, j] = s
            quantized[block] = (w / s).to(torch.float8_e4m3fn)
    return quantized, scale


def dequantize_fp8_reference(quantized: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Block by block, in float32: the plain definition the library's dequantization is checked against."""
    out = quantized.to(torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            block = (slice(i * FP8_BLOCK, (i + 1) * FP8_BLOCK), slice(j * FP8_BLOCK, (j + 1) * FP8_BLOCK))
            out[block] = out[block] * scale[i, j]
    return out


def write_fp8(src: Path, fp8_dir: Path, dequantized_dir: Path) -> None:
    """From the float32 checkpoint ``src``, write the FP8 checkpoint the hub way into ``fp8_dir``, and
    the same weights dequantized (float32, no quantization_config) into ``dequantized_dir``."""
    tensors = load_file(str(src / "model.safetensors"))
    fp8: dict[str, torch.Tensor] = {}
    dequantized: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if is_quantized(name, tensor):
            q, scale = quantize_fp8(tensor)
            fp8[name], fp8[f"{name}_scale_inv"] = q, scale
            dequantized[name] = dequantize_fp8_reference(q, scale)
        else:
            fp8[name] = dequantized[name] = tensor
    for directory, state in ((fp8_dir, fp8), (dequantized_dir, dequantized)):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text((src / "config.json").read_text())
        save_file({k: v.contiguous() for k, v in state.items()}, str(directory / "model.safetensors"))
    _set_config(fp8_dir, quantization_config={"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                              "weight_block_size": [FP8_BLOCK, FP8_BLOCK]})
