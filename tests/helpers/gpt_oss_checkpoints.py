"""Tiny random GPT-OSS checkpoints: float32 as transformers saves them, and MXFP4 as the hub stores them.

Everything that sets GPT-OSS apart is randomized so that a mistake in it shows: attention sinks, the
experts' biases, a router scaled so that each token's top-k experts win clearly, a SwiGLU limit low
enough that the clamps act. The window (16) is shorter than the test prompts, and layers alternate
between sliding and full attention; RoPE is YaRN with GPT-OSS's own parameters.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file

from tests.helpers.moe_checkpoints import randomize_moe

FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])
WINDOW = 16
EXPERT_WEIGHTS = ("gate_up_proj", "down_proj")


def gpt_oss_config(*, num_layers: int = 4, **overrides: Any) -> transformers.GptOssConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=32, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=8, num_experts_per_tok=2, sliding_window=WINDOW,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
        rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False, attention_bias=True,
        swiglu_limit=3.0,
        rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0, "beta_fast": 32.0,
                         "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 4096},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    kwargs.update(overrides)
    return transformers.GptOssConfig(**kwargs)


@torch.no_grad()
def randomize_gpt_oss(model: torch.nn.Module, seed: int) -> None:
    randomize_moe(model, seed)
    gen = torch.Generator().manual_seed(seed + 2000)
    for name, param in model.named_parameters():
        if name.endswith("self_attn.sinks"):
            param.copy_(1.5 * torch.randn(param.shape, generator=gen))
        elif name.endswith(("gate_up_proj_bias", "down_proj_bias")):
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))


def make_gpt_oss_checkpoint(path: str | Path, *, seed: int = 0, **overrides: Any) -> Path:
    """Write a random float32 GPT-OSS checkpoint into ``path``; return it."""
    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(gpt_oss_config(**overrides), dtype=torch.float32)
    randomize_gpt_oss(model, seed)
    model.save_pretrained(path)
    return path


def quantize_mxfp4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A stored expert tensor [E, cols, rows] -> the hub's (blocks [E, rows, cols / 32, 16], scales
    [E, rows, cols / 32]): per group of 32 the smallest power of two that brings its largest magnitude
    within FP4's 6, each value rounded to the nearest FP4 value, low nibble first."""
    experts, cols, rows = weight.shape
    groups = weight.transpose(1, 2).reshape(experts, rows, cols // 32, 32).float()
    amax = groups.abs().amax(-1, keepdim=True).clamp(min=2.0**-100)
    exponent = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = groups / torch.exp2(exponent)
    codes = (scaled.abs()[..., None] - FP4_VALUES).abs().argmin(-1).to(torch.uint8)
    codes = codes | ((scaled < 0).to(torch.uint8) << 3)
    blocks = codes[..., 0::2] | (codes[..., 1::2] << 4)
    scales = (exponent[..., 0] + 127).to(torch.uint8)
    return blocks.contiguous(), scales.contiguous()


def make_mxfp4_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Rewrite the float32 checkpoint ``src`` the way the hub stores GPT-OSS: every expert weight as
    ``<name>_blocks`` and ``<name>_scales``, everything else as it was, and a ``quantization_config``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True)
    tensors = load_file(str(src / "model.safetensors"))
    out = {}
    for name, tensor in tensors.items():
        if name.endswith(EXPERT_WEIGHTS):
            out[f"{name}_blocks"], out[f"{name}_scales"] = quantize_mxfp4(tensor)
        else:
            out[name] = tensor
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    return dst
