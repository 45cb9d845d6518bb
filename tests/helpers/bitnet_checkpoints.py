"""Tiny random BitNet b1.58 checkpoints in the hub's layout, and transformers' BitNet as the reference.

The layout is ``microsoft/bitnet-b1.58-2B-4T``'s: every projection's ``weight`` is uint8 ``[out / 4, in]``
packed by transformers' own ``pack_weights`` (four ternary values a byte), its ``weight_scale`` one
bfloat16 value, ``quantization_config`` says ``quant_method: bitnet``; embeddings and norms are float32
here (random, norms around 1 but far enough from it that a skipped norm shows), and the LM head untied
(tied, a random model repeats its input token). The reference is
``BitNetForCausalLM`` with transformers' own BitNet layers put in by ``replace_with_bitnet_linear`` and the
file loaded into them (``from_pretrained`` would need the accelerate package for this quantizer), run
eagerly (its ``torch.compile`` decorators only fuse the same operations).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers.integrations.bitnet import pack_weights, replace_with_bitnet_linear, unpack_weights

_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def bitnet_config(*, linear_class: str = "bitlinear", num_layers: int = 4, **overrides: Any) -> transformers.BitNetConfig:
    kwargs: dict[str, Any] = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=num_layers, num_attention_heads=4,
        num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=1024, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    kwargs.update(overrides)
    config = transformers.BitNetConfig(**kwargs)
    config.quantization_config = {"quant_method": "bitnet", "linear_class": linear_class,
                                  "quantization_mode": "offline"}
    return config


def make_bitnet_checkpoint(path: str | Path, *, linear_class: str = "bitlinear", seed: int = 0,
                           **overrides: Any) -> Path:
    """Write a random packed BitNet checkpoint into ``path``; return it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    config = bitnet_config(linear_class=linear_class, **overrides)
    gen = torch.Generator().manual_seed(seed)
    hidden, inter = config.hidden_size, config.intermediate_size
    head_dim = hidden // config.num_attention_heads
    shapes = {"self_attn.q_proj": (config.num_attention_heads * head_dim, hidden),
              "self_attn.k_proj": (config.num_key_value_heads * head_dim, hidden),
              "self_attn.v_proj": (config.num_key_value_heads * head_dim, hidden),
              "self_attn.o_proj": (hidden, config.num_attention_heads * head_dim),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}
    tensors: dict[str, torch.Tensor] = {"model.embed_tokens.weight": torch.randn(config.vocab_size, hidden, generator=gen),
                                        "model.norm.weight": 1 + 0.3 * torch.randn(hidden, generator=gen)}
    if not config.tie_word_embeddings:
        tensors["lm_head.weight"] = torch.randn(config.vocab_size, hidden, generator=gen) / hidden**0.5
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        for name, size in (("input_layernorm", hidden), ("post_attention_layernorm", hidden),
                           ("self_attn.attn_sub_norm", hidden), ("mlp.ffn_sub_norm", inter)):
            tensors[f"{prefix}{name}.weight"] = 1 + 0.3 * torch.randn(size, generator=gen)
        for name in _PROJECTIONS:
            rows, cols = shapes[name]
            ternary = torch.randint(-1, 2, (rows, cols), generator=gen)
            tensors[f"{prefix}{name}.weight"] = pack_weights(ternary.clone())
            # An output about 1.5x the input's size: the product of a unit input with ternary rows has a
            # deviation of sqrt(2/3 * in) (two thirds of the values nonzero).
            gain = 1.5 / (2 / 3 * cols) ** 0.5 * (0.8 + 0.4 * torch.rand((), generator=gen).item())
            scale = torch.tensor([1 / gain if linear_class == "bitlinear" else gain])
            tensors[f"{prefix}{name}.weight_scale"] = scale.to(torch.bfloat16)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    data = config.to_dict()
    data["quantization_config"] = config.quantization_config
    (path / "config.json").write_text(json.dumps(data, indent=2), encoding="utf-8")
    return path


@contextmanager
def eager() -> Iterator[None]:
    """transformers' BitNet layers run without torch.compile (no C++ build in a test)."""
    with torch.compiler.set_stance("force_eager"):
        yield


def reference_bitnet(path: str | Path) -> transformers.PreTrainedModel:
    """The checkpoint in transformers' BitNetForCausalLM with its BitNet layers, float32, eval mode."""
    transformers.utils.logging.disable_progress_bar()
    config = transformers.AutoConfig.from_pretrained(path)
    quant = transformers.BitNetQuantConfig(**{k: v for k, v in config.quantization_config.items()
                                              if k != "quant_method"})
    del config.quantization_config
    model = transformers.BitNetForCausalLM(config).float()
    replace_with_bitnet_linear(model, modules_to_not_convert=["lm_head"], quantization_config=quant)
    state = load_file(str(Path(path) / "model.safetensors"))
    with eager():
        for name in list(state):
            if name.endswith(".weight_scale"):
                state[name] = state[name].float()
            elif state[name].dtype == torch.uint8 and quant.linear_class == "autobitlinear":
                state[name] = unpack_weights(state[name], dtype=torch.float32)  # as BitNetDeserialize does
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.eval()
