"""GPT-OSS against transformers (eager attention, float32): block ranges, cached and batched steps past
the sliding window, greedy generation, YaRN tables, the router and the clamped-SwiGLU experts, and
loading a checkpoint whose experts are stored as MXFP4 blocks and scales, as on the hub."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from transformers.integrations.mxfp4 import convert_moe_packed_tensors
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts as RefExperts
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding, GptOssTopKRouter

from homeswarm.model import LocalModel, ModelConfig, load_head, load_span
from homeswarm.model.moe import GptOssExperts, TopKSoftmaxRouter
from homeswarm.model.mxfp4 import dequantize_mxfp4
from homeswarm.model.rope import rope_tables
from tests.helpers.checkpoints import reference_greedy, reference_model
from tests.helpers.gpt_oss_checkpoints import (
    WINDOW,
    gpt_oss_config,
    make_gpt_oss_checkpoint,
    make_mxfp4_checkpoint,
)
from tests.helpers.reference import rel_err

NUM_LAYERS = 4
HIDDEN = 64


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_gpt_oss_checkpoint(tmp_path_factory.mktemp("gpt_oss") / "float32", seed=7)


@pytest.fixture(scope="module")
def reference(checkpoint: Path) -> transformers.PreTrainedModel:
    model = reference_model(checkpoint)
    assert model.config._attn_implementation == "eager"
    return model


def test_config_reads_sinks_windows_and_experts(checkpoint):
    config = ModelConfig.from_dir(checkpoint)
    assert config.attention_sinks and config.attention_bias and config.o_proj_bias
    assert [config.window_of(i) for i in range(NUM_LAYERS)] == [WINDOW, None, WINDOW, None]
    assert config.moe is not None and all(config.is_sparse(i) for i in range(NUM_LAYERS))
    assert (config.moe.num_experts, config.moe.top_k, config.moe.intermediate_size) == (8, 2, 32)
    assert (config.moe.swiglu_alpha, config.moe.swiglu_limit) == (1.702, 3.0)


def test_yarn_tables_equal_transformers():
    """GPT-OSS's YaRN (factor 32, beta 32/1, no truncation): the same inverse frequencies and cos/sin
    factor, bit for bit; at head_dim 16 the ramp's ends fall between integers, so truncation would show."""
    config = gpt_oss_config()
    ref = GptOssRotaryEmbedding(config)
    inv_freq, factor = rope_tables(16, 150000.0, dict(config.rope_parameters), config.max_position_embeddings)
    assert torch.equal(inv_freq, ref.inv_freq)
    assert factor == ref.attention_scaling
    truncated, _ = rope_tables(16, 150000.0, dict(config.rope_parameters, truncate=True), 131072)
    assert not torch.equal(truncated, inv_freq)


def test_block_ranges_match_transformers_hidden_states(checkpoint, reference):
    ids = prompt(2, 60)  # longer than the window
    with torch.no_grad():
        out = reference(ids, output_hidden_states=True)
    states = out.hidden_states
    head = load_head(checkpoint)
    for start, end in [(0, 4), (1, 3), (0, 1), (3, 4)]:
        ours = load_span(checkpoint, start, end)(states[start])
        if end < NUM_LAYERS:
            assert rel_err(ours, states[end]) < 1e-5, (start, end)
        else:
            assert rel_err(head.logits(ours), out.logits) < 1e-5, (start, end)
        assert rel_err(states[start], ours) > 0.1


def test_cached_and_batched_steps_equal_uncached(checkpoint):
    span = load_span(checkpoint, 0, NUM_LAYERS)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 70, HIDDEN, generator=gen)
    full = span(hidden)
    cache = span.new_cache(2, 80)
    parts = [span(hidden[:, :40], cache), span(hidden[:, 40:65], cache)]
    parts += [span(hidden[:, t:t + 1], cache) for t in range(65, 70)]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5
    # two sessions at different positions, both past the window, in one batched step
    other = torch.randn(1, 30, HIDDEN, generator=gen)
    other_full = span(other)
    c1, c2 = span.new_cache(2, 80), span.new_cache(1, 40)
    span(hidden[:, :69], c1)
    span(other[:, :20], c2)
    a, b = span.forward_batch([(hidden[:, 69:70], c1), (other[:, 20:30], c2)])
    assert rel_err(a, full[:, 69:70]) < 1e-5
    assert rel_err(b, other_full[:, 20:30]) < 1e-5


@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_equals_transformers(batch, checkpoint, reference):
    ids = prompt(batch, 100 + batch, seed=batch)
    expected = reference_greedy(checkpoint, ids, 32, reference)
    ours = LocalModel(checkpoint, spans=[(0, 1), (1, 3), (3, 4)]).generate_greedy(ids, 32)
    assert torch.equal(ours, expected)
    assert len(set(ours[0, ids.shape[1]:].tolist())) > 3


def test_router_equals_transformers():
    ref = GptOssTopKRouter(gpt_oss_config())
    ours = TopKSoftmaxRouter(HIDDEN, 8, 2)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref.weight.copy_(torch.randn(8, HIDDEN, generator=gen) * 0.5)
        ref.bias.copy_(torch.randn(8, generator=gen))
        ours.load_state_dict(ref.state_dict())
    x = torch.randn(300, HIDDEN, generator=gen)
    _, ref_weights, ref_indices = ref(x)
    weights, indices = ours(x)
    assert torch.equal(indices, ref_indices)
    assert torch.equal(weights, ref_weights)
    assert torch.allclose(weights.sum(-1), torch.ones(300))


def test_experts_equal_transformers_with_the_clamps_acting(monkeypatch):
    config = gpt_oss_config()
    ref = RefExperts(config)
    ours = GptOssExperts(8, HIDDEN, 32, alpha=config.swiglu_alpha, limit=config.swiglu_limit)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ref.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.3 if "proj" in name else 1.0))
        ours.load_state_dict(ref.state_dict())
    x = torch.randn(50, HIDDEN, generator=gen)
    indices = torch.stack([torch.randperm(8, generator=gen)[:2] for _ in range(50)])
    weights = torch.softmax(torch.randn(50, 2, generator=gen), dim=-1)
    gate_up = x @ ours.gate_up_proj[0] + ours.gate_up_proj_bias[0]
    assert (gate_up[:, ::2] > config.swiglu_limit).any() and (gate_up[:, 1::2] < -config.swiglu_limit).any()
    expected = ref(x, indices, weights)
    assert rel_err(ours(x, weights, indices), expected) < 1e-6
    # a single row runs exactly its two experts
    used: list[int] = []
    real_sigmoid = torch.sigmoid
    monkeypatch.setattr(torch, "sigmoid", lambda t: used.append(t.shape[0]) or real_sigmoid(t))
    ours(x[:1], weights[:1], indices[:1])
    assert used == [1, 1]


def test_mxfp4_checkpoint_loads_as_transformers_dequantizes_it(checkpoint, tmp_path):
    """Experts stored as the hub stores them (``*_blocks`` / ``*_scales``, ``quantization_config``
    mxfp4) load to exactly transformers' dequantized weights, and the blocks compute as transformers'
    model does on them."""
    packed = make_mxfp4_checkpoint(checkpoint, tmp_path / "mxfp4")
    stored = load_file(str(packed / "model.safetensors"))
    assert "model.layers.0.mlp.experts.gate_up_proj" not in stored
    blocks = stored["model.layers.0.mlp.experts.gate_up_proj_blocks"]
    scales = stored["model.layers.0.mlp.experts.gate_up_proj_scales"]
    assert blocks.dtype == torch.uint8 and tuple(blocks.shape) == (8, 64, 2, 16) and tuple(scales.shape) == (8, 64, 2)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(dequantize_mxfp4(blocks, scales, dtype), convert_moe_packed_tensors(blocks, scales, dtype=dtype))

    ref = transformers.AutoModelForCausalLM.from_pretrained(
        packed, dtype=torch.float32, quantization_config=transformers.Mxfp4Config(dequantize=True)).eval()
    span = load_span(packed, 0, NUM_LAYERS, fuse=False)  # parameter names as the checkpoint's
    ref_state = ref.model.layers.state_dict()
    for key, value in span.layers.state_dict().items():
        assert torch.equal(value, ref_state[key]), key
    dense = load_span(checkpoint, 0, NUM_LAYERS)  # the quantization really changed the experts
    assert rel_err(span.layers[0].mlp.experts.down_proj, dense.layers[0].mlp.experts.down_proj) > 0.01

    ids = prompt(1, 40, seed=5)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    head = load_head(packed)
    assert rel_err(head.logits(span(out.hidden_states[0])), out.logits) < 1e-5


def test_config_defaults_follow_transformers(checkpoint):
    """A config.json without layer_types or sliding_window gets transformers' GptOssConfig defaults."""
    d = json.loads((checkpoint / "config.json").read_text())
    del d["layer_types"], d["sliding_window"]
    ref = transformers.GptOssConfig(**{k: v for k, v in d.items() if k not in ("model_type", "transformers_version")})
    config = ModelConfig.from_dict(d)
    assert list(config.layer_types) == ref.layer_types
    assert config.sliding_window == ref.sliding_window
