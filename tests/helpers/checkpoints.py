"""Tiny random Hugging Face checkpoints, and transformers as the reference to check against.

Every family homeswarm supports can be written here in a second: a config.json plus float32
safetensors (optionally sharded), saved by transformers itself, with every weight randomized (norm
weights and biases too, so a bug in them changes the result). Imports only torch and transformers.
"""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

FAMILIES = ("llama2", "llama3", "mistral", "qwen2", "qwen3")

# Per family: config class, whether embeddings are tied by default, and what sets it apart.
_TIED_BY_DEFAULT = {"llama2": False, "llama3": True, "mistral": False, "qwen2": True, "qwen3": False}


def _config(family: str, *, num_layers: int, hidden_size: int, intermediate_size: int, num_heads: int,
            num_kv_heads: int, vocab_size: int, tie: bool) -> transformers.PretrainedConfig:
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
        head_dim=hidden_size // num_heads, tie_word_embeddings=tie, rms_norm_eps=1e-5,
        # No special tokens: generation must never stop early on a random "EOS".
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    if family == "llama2":
        return transformers.LlamaConfig(max_position_embeddings=4096, rope_theta=10000.0, **common)
    if family == "llama3":
        # original_max_position_embeddings is small so that, at this head_dim, frequencies fall in all
        # three llama3 bands (kept, interpolated, divided by factor).
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return transformers.LlamaConfig(max_position_embeddings=8192, rope_parameters=rope, **common)
    if family == "mistral":
        # A window shorter than the test prompts, so sliding-window masking is exercised.
        return transformers.MistralConfig(max_position_embeddings=4096, rope_theta=1000000.0,
                                          sliding_window=48, **common)
    if family == "qwen2":
        return transformers.Qwen2Config(max_position_embeddings=4096, rope_theta=1000000.0, **common)
    if family == "qwen3":
        return transformers.Qwen3Config(max_position_embeddings=4096, rope_theta=1000000.0, **common)
    raise ValueError(f"unknown test family {family!r}; known: {FAMILIES}")


@torch.no_grad()
def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            # Around 1, but far enough from it that a skipped or misplaced norm changes the output.
            param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen))
        elif name.endswith(".bias"):
            param.copy_(0.2 * torch.randn(param.shape, generator=gen))
        elif "embed_tokens" in name:
            param.copy_(torch.randn(param.shape, generator=gen))
        else:
            fan_in = param.shape[-1]
            # ~1.5x the variance-preserving std: attention is peaked, logits well separated.
            param.copy_(torch.randn(param.shape, generator=gen) * (1.5 / fan_in**0.5))


def make_checkpoint(path: str | Path, family: str, *, num_layers: int = 4, hidden_size: int = 64,
                    intermediate_size: int = 128, num_heads: int = 4, num_kv_heads: int = 2,
                    vocab_size: int = 256, tie_word_embeddings: bool | None = None,
                    max_shard_size: str | None = None, seed: int = 0) -> Path:
    """Write a random float32 checkpoint of ``family`` (one of FAMILIES) into ``path``; return it."""
    transformers.utils.logging.disable_progress_bar()  # keep test output readable
    path = Path(path)
    tie = _TIED_BY_DEFAULT[family] if tie_word_embeddings is None else tie_word_embeddings
    config = _config(family, num_layers=num_layers, hidden_size=hidden_size, intermediate_size=intermediate_size,
                     num_heads=num_heads, num_kv_heads=num_kv_heads, vocab_size=vocab_size, tie=tie)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize(model, seed)
    if tie:
        model.tie_weights()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size is not None else {}
    model.save_pretrained(path, **kwargs)
    return path


def reference_model(path: str | Path) -> transformers.PreTrainedModel:
    """The checkpoint loaded by transformers, float32, eval mode."""
    transformers.utils.logging.disable_progress_bar()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval()


@torch.no_grad()
def reference_greedy(path: str | Path, input_ids: torch.Tensor, max_new_tokens: int,
                     model: transformers.PreTrainedModel | None = None) -> torch.Tensor:
    """transformers' greedy generate: prompt plus exactly ``max_new_tokens`` tokens."""
    model = model if model is not None else reference_model(path)
    return model.generate(
        input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0,
    )
