"""Tiny random Mixture-of-Experts checkpoints, saved by transformers itself, for every MoE family.

Router weights are scaled up so routing is far from uniform (a wrong expert choice changes the
output clearly); biases and norm weights are randomized as in ``checkpoints.py``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers

from tests.helpers.checkpoints import _randomize

MOE_FAMILIES = ("qwen3_moe", "qwen2_moe", "mixtral")

_NO_SPECIAL_TOKENS = dict(bos_token_id=None, eos_token_id=None, pad_token_id=None)


def moe_config(family: str, *, num_layers: int = 4, **overrides: Any) -> transformers.PretrainedConfig:
    common = dict(vocab_size=256, hidden_size=64, num_hidden_layers=num_layers, num_attention_heads=4,
                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=4096, tie_word_embeddings=False,
                  **_NO_SPECIAL_TOKENS)
    if family == "qwen3_moe":
        # head_dim is not hidden / heads; layer 1 stays dense; top-k weights renormalised
        kwargs = dict(common, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      head_dim=24, norm_topk_prob=True, mlp_only_layers=[1], rope_parameters={
                          "rope_type": "default", "rope_theta": 1000000.0})
        kwargs.update(overrides)
        return transformers.Qwen3MoeConfig(**kwargs)
    if family == "qwen2_moe":
        # a shared expert behind its sigmoid gate; every second layer sparse; weights not renormalised
        kwargs = dict(common, intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=3,
                      shared_expert_intermediate_size=48, norm_topk_prob=False, decoder_sparse_step=2,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        kwargs.update(overrides)
        return transformers.Qwen2MoeConfig(**kwargs)
    if family == "mixtral":
        # a window shorter than the test prompts
        kwargs = dict(common, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2, sliding_window=48,
                      rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
        kwargs.update(overrides)
        return transformers.MixtralConfig(**kwargs)
    raise ValueError(f"unknown MoE test family {family!r}; known: {MOE_FAMILIES}")


@torch.no_grad()
def randomize_moe(model: torch.nn.Module, seed: int) -> None:
    """Random weights everywhere; routers (and their biases) scaled so that each token's top-k
    experts win by a clear margin."""
    _randomize(model, seed)
    gen = torch.Generator().manual_seed(seed + 1000)
    for name, param in model.named_parameters():
        if name.endswith(("mlp.gate.weight", "mlp.router.weight", "block_sparse_moe.gate.weight")):
            param.copy_(torch.randn(param.shape, generator=gen) * (4.0 / param.shape[-1] ** 0.5))
        elif name.endswith(("mlp.router.bias", "e_score_correction_bias")):
            param.copy_(torch.randn(param.shape, generator=gen))


def make_moe_checkpoint(path: str | Path, family: str, *, seed: int = 0, max_shard_size: str | None = None,
                        **overrides: Any) -> Path:
    """Write a random float32 checkpoint of the MoE ``family`` into ``path``; return it."""
    transformers.utils.logging.disable_progress_bar()
    path = Path(path)
    config = moe_config(family, **overrides)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize_moe(model, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kwargs)
    return path
