"""Fused q/k/v and gate/up projections compute what the separate ones compute, within float rounding.

The loader fuses by default (``load_span(..., fuse=True)``); ``fuse=False`` keeps the checkpoint's
separate projections. Both run the same prompt and cached decoding steps: outputs agree to float32
rounding (each output element is the same dot product; only the kernel's blocking may differ), and
quantized fused matrices hold exactly the rows that quantizing each projection alone gives.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from homeswarm.model import load_span
from homeswarm.model.attention import Attention
from homeswarm.model.blocks import fuse_projections
from homeswarm.model.mlp import GatedMLP, fuse_linears
from homeswarm.model.quant import QuantizedLinearInt8
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.moe_checkpoints import make_moe_checkpoint
from tests.helpers.reference import rel_err

CASES = ("llama3", "mistral", "qwen2", "qwen3", "qwen2_moe")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion")
    made = {}
    for family in CASES:
        if family.endswith("_moe"):
            made[family] = make_moe_checkpoint(root / family, family, num_layers=2)
        else:
            made[family] = make_checkpoint(root / family, family, num_layers=2)
    return made


def _run(span, prompt: torch.Tensor, steps: list[torch.Tensor]) -> list[torch.Tensor]:
    cache = span.new_cache(prompt.shape[0], prompt.shape[1] + len(steps))
    outs = [span(prompt, cache)]
    outs += [span(step, cache) for step in steps]
    return outs


@pytest.mark.parametrize("family", CASES)
def test_fused_matches_separate_float32(checkpoints, family):
    fused = load_span(checkpoints[family], 0, 2)
    separate = load_span(checkpoints[family], 0, 2, fuse=False)
    for layer in fused.layers:
        assert layer.self_attn.qkv_proj is not None and not hasattr(layer.self_attn, "q_proj")
    for layer in separate.layers:
        assert layer.self_attn.qkv_proj is None and isinstance(layer.self_attn.q_proj, nn.Linear)
    # the same weights in all, and the same number of them
    assert sum(p.numel() for p in fused.parameters()) == sum(p.numel() for p in separate.parameters())
    gen = torch.Generator().manual_seed(0)
    hidden = fused.config.hidden_size
    prompt = torch.randn(2, 7, hidden, generator=gen)
    steps = [torch.randn(2, 1, hidden, generator=gen) for _ in range(4)]
    for a, b in zip(_run(fused, prompt, steps), _run(separate, prompt, steps), strict=True):
        assert rel_err(a, b) < 1e-6


def test_gate_up_fusion_reaches_shared_experts(checkpoints):
    span = load_span(checkpoints["qwen2_moe"], 0, 2)
    shared = [m for m in span.modules() if isinstance(m, GatedMLP)]
    assert shared and all(m.gate_up_proj is not None for m in shared)


@pytest.mark.parametrize("quant", ["int8", "int4"])
def test_fused_quantized_rows_equal_separately_quantized(checkpoints, quant):
    """Quantizing after fusing: per-row scales (int8) and per-row groups (int4) make the fused
    matrix exactly the separately quantized ones stacked, so only the products' blocking differs."""
    fused = load_span(checkpoints["qwen2"], 0, 2, quant=quant)
    separate = load_span(checkpoints["qwen2"], 0, 2, quant=quant, fuse=False)
    for a, b in zip(fused.layers, separate.layers, strict=True):
        stacked = torch.cat([b.self_attn.q_proj.dequantized_weight(), b.self_attn.k_proj.dequantized_weight(),
                             b.self_attn.v_proj.dequantized_weight()])
        assert torch.equal(a.self_attn.qkv_proj.dequantized_weight(), stacked)
        assert torch.equal(a.self_attn.qkv_proj.bias,
                           torch.cat([b.self_attn.q_proj.bias, b.self_attn.k_proj.bias, b.self_attn.v_proj.bias]))
        stacked = torch.cat([b.mlp.gate_proj.dequantized_weight(), b.mlp.up_proj.dequantized_weight()])
        assert torch.equal(a.mlp.gate_up_proj.dequantized_weight(), stacked)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randn(1, 5, 64, generator=gen)
    steps = [torch.randn(1, 1, 64, generator=gen) for _ in range(3)]
    for a, b in zip(_run(fused, prompt, steps), _run(separate, prompt, steps), strict=True):
        # the kernels take bfloat16 activations: rounding of a bfloat16 sum, not of the weights
        assert rel_err(a, b) < 1e-2


def test_fuse_only_plain_linears():
    plain = [nn.Linear(16, 8), nn.Linear(16, 4)]
    fused = fuse_linears(*plain)
    x = torch.randn(3, 16)
    assert fused is not None
    torch.testing.assert_close(fused(x), torch.cat([m(x) for m in plain], dim=-1), rtol=1e-6, atol=1e-6)
    assert fuse_linears(QuantizedLinearInt8.from_linear(nn.Linear(16, 16)), nn.Linear(16, 16)) is None
    assert fuse_linears(nn.Linear(16, 8), nn.Linear(16, 8, bias=False)) is None  # bias on one only
    assert fuse_linears(nn.Linear(16, 8), nn.Linear(16, 8).to(torch.bfloat16)) is None
    mlp = GatedMLP(16, 32)
    mlp.gate_proj = QuantizedLinearInt8.from_linear(mlp.gate_proj)  # a format fusion does not know
    before = mlp(x)
    assert fuse_projections(mlp) == 0 and mlp.gate_up_proj is None
    torch.testing.assert_close(mlp(x), before, rtol=0, atol=0)


def test_fuse_is_idempotent():
    from homeswarm.model.config import ModelConfig

    config = ModelConfig.from_dict({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                    "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
                                    "vocab_size": 64, "rms_norm_eps": 1e-5})
    attn = Attention(config, 0)
    assert attn.fuse() and attn.fuse()
    assert attn.qkv_proj.weight.shape == (32 + 2 * 16, 32)
