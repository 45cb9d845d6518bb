"""DeepSeek-V3 and Kimi K2 against transformers (float32, eager attention): block ranges, cached and
batched steps, greedy generation, the latent cache's size, the group-limited router (ties included),
FP8 checkpoints stored the hub's way, and the multi-token-prediction layer never being read."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from homeswarm.model import CheckpointReader, LocalModel, ModelConfig, cache_bytes, load_head, load_span
from homeswarm.model.fp8 import dequantize_fp8
from homeswarm.model.kv_cache import values_per_token
from homeswarm.model.moe import GroupLimitedRouter
from homeswarm.model.quant import QuantizedLinearInt8
from homeswarm.model.sizes import span_weight_bytes
from tests.helpers.checkpoints import reference_greedy
from tests.helpers.deepseek_checkpoints import (
    DEEPSEEK_VARIANTS,
    deepseek_config,
    dequantize_fp8_reference,
    make_deepseek_checkpoint,
    quantize_fp8,
    reference_deepseek,
    write_fp8,
)
from tests.helpers.reference import rel_err

NUM_LAYERS = 4


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # Matrices here are tiny: extra intra-op threads only wait on each other (ten times slower on a
    # busy two-core machine). Results do not depend on the thread count.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deepseek")
    return {v: make_deepseek_checkpoint(root / v, v, seed=i) for i, v in enumerate(DEEPSEEK_VARIANTS)}


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {variant: reference_deepseek(path) for variant, path in checkpoints.items()}


def _check_block_ranges(path: Path, ref: torch.nn.Module) -> None:
    ids = prompt(2, 60)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    states = out.hidden_states
    head = load_head(path)
    for start, end in [(0, 4), (1, 3), (0, 1), (3, 4)]:
        ours = load_span(path, start, end)(states[start])
        if end < NUM_LAYERS:
            assert rel_err(ours, states[end]) < 1e-5, (start, end)
        else:
            assert rel_err(head.logits(ours), out.logits) < 1e-5, (start, end)
        assert rel_err(states[start], ours) > 0.1


@pytest.mark.parametrize("variant", DEEPSEEK_VARIANTS)
def test_block_ranges_match_transformers_hidden_states(variant, checkpoints, references):
    _check_block_ranges(checkpoints[variant], references[variant])


def test_config_reads_the_deepseek_layout(checkpoints):
    config = ModelConfig.from_dir(checkpoints["deepseek_v3"])
    assert config.family == "deepseek_v3"
    assert [config.is_sparse(i) for i in range(NUM_LAYERS)] == [False, True, True, True]
    assert config.mla is not None and config.moe is not None
    assert (config.mla.q_lora_rank, config.mla.kv_lora_rank, config.mla.qk_head_dim, config.mla.v_head_dim) == (
        48, 32, 24, 12)
    assert config.rope_dim == config.head_dim == 8
    assert (config.moe.n_group, config.moe.topk_group, config.moe.routed_scaling_factor) == (4, 2, 2.5)
    assert config.moe.shared_expert_intermediate_size == 2 * 24
    assert ModelConfig.from_dir(checkpoints["deepseek_v3_full_q"]).mla.q_lora_rank is None
    kimi = ModelConfig.from_dir(checkpoints["kimi_k2"])
    assert kimi.family == "kimi_k2" and (kimi.moe.n_group, kimi.moe.topk_group) == (1, 1)


@pytest.mark.parametrize("field, value", [("scoring_func", "softmax"), ("topk_method", "group_limited_greedy"),
                                          ("moe_layer_freq", 2),
                                          ("quantization_config", {"quant_method": "bitsandbytes"})])
def test_config_refuses_what_it_would_compute_differently(field, value, checkpoints):
    data = json.loads((checkpoints["deepseek_v3"] / "config.json").read_text())
    data[field] = value
    with pytest.raises(ValueError, match=field.split("_")[0]):
        ModelConfig.from_dict(data)


@pytest.mark.parametrize("variant", DEEPSEEK_VARIANTS)
def test_cached_and_batched_steps_equal_uncached(variant, checkpoints):
    span = load_span(checkpoints[variant], 0, NUM_LAYERS)
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 70, 64, generator=gen)
    full = span(hidden)
    cache = span.new_cache(2, 80)
    parts = [span(hidden[:, :40], cache), span(hidden[:, 40:65], cache)]
    parts += [span(hidden[:, t:t + 1], cache) for t in range(65, 70)]
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5
    # two sessions at different positions in one batched step
    other = torch.randn(1, 30, 64, generator=gen)
    other_full = span(other)
    c1, c2 = span.new_cache(2, 80), span.new_cache(1, 40)
    span(hidden[:, :69], c1)
    span(other[:, :20], c2)
    a, b = span.forward_batch([(hidden[:, 69:70], c1), (other[:, 20:30], c2)])
    assert rel_err(a, full[:, 69:70]) < 1e-5
    assert rel_err(b, other_full[:, 20:30]) < 1e-5


@pytest.mark.parametrize("variant", DEEPSEEK_VARIANTS)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_equals_transformers(variant, batch, checkpoints, references):
    path = checkpoints[variant]
    ids = prompt(batch, 100 + batch, seed=batch)
    expected = reference_greedy(path, ids, 32, references[variant])
    ours = LocalModel(path, spans=[(0, 1), (1, 3), (3, 4)]).generate_greedy(ids, 32)
    assert torch.equal(ours, expected)
    assert len(set(ours[0, ids.shape[1]:].tolist())) > 3


def test_cache_holds_only_the_latent_and_the_rotated_key(checkpoints):
    config = ModelConfig.from_dir(checkpoints["deepseek_v3"])
    per_token = 32 + 8  # kv_lora_rank + qk_rope_head_dim
    assert values_per_token(config) == per_token
    assert cache_bytes(config, 1, 1, 1, torch.float32) == 4 * per_token
    span = load_span(checkpoints["deepseek_v3"], 1, 3)
    cache = span.new_cache(2, 50)
    assert [tuple(t.shape) for t in cache.tensors[0]] == [(2, 50, 32), (2, 50, 8)]
    assert cache.nbytes == cache_bytes(config, 2, 2, 50, torch.float32) == 2 * 2 * 50 * per_token * 4
    # DeepSeek-V3's published sizes: 512 + 64 values per token and layer
    v3 = json.loads((checkpoints["deepseek_v3"] / "config.json").read_text())
    v3.update(hidden_size=7168, num_attention_heads=128, num_key_value_heads=128, kv_lora_rank=512,
              q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
              num_experts_per_tok=8, n_group=8, topk_group=4, head_dim=64)
    assert values_per_token(ModelConfig.from_dict(v3)) == 576


def _reference_router(variant: str, **overrides):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

    config = deepseek_config(variant, **overrides)
    ref = DeepseekV3TopkRouter(config)
    ours = GroupLimitedRouter(64, config.n_routed_experts, config.num_experts_per_tok, n_group=config.n_group,
                              topk_group=config.topk_group, normalize=config.norm_topk_prob,
                              scaling_factor=config.routed_scaling_factor)
    return ref, ours


def _same_routing(ref, ours, weight: torch.Tensor, bias: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        for module in (ref, ours):
            module.weight.copy_(weight)
            module.e_score_correction_bias.copy_(bias)
    _, ref_weights, ref_indices = ref(x)
    our_weights, our_indices = ours(x)
    assert torch.equal(our_indices, ref_indices)
    assert torch.equal(our_weights, ref_weights)
    assert our_weights.dtype == torch.float32
    return our_weights, our_indices


@pytest.mark.parametrize("variant, overrides", [("deepseek_v3", {}), ("deepseek_v3_full_q", {}), ("kimi_k2", {}),
                                                ("deepseek_v3", {"n_routed_experts": 16, "num_experts_per_tok": 4})])
def test_group_limited_router_equals_transformers(variant, overrides):
    ref, ours = _reference_router(variant, **overrides)
    gen = torch.Generator().manual_seed(0)
    experts = ours.num_experts
    weight = torch.randn(experts, 64, generator=gen) * 0.25
    bias = 0.3 * torch.randn(experts, generator=gen)
    x = torch.randn(400, 64, generator=gen)
    weights, indices = _same_routing(ref, ours, weight, bias, x)
    # the choice is group-limited: every token's experts lie in at most topk_group groups
    per_group = experts // ours.n_group
    assert max(len(set((row // per_group).tolist())) for row in indices) <= ours.topk_group
    if ours.normalize:
        assert torch.allclose(weights.sum(-1), torch.full((400,), ours.scaling_factor))


def test_group_limited_router_ties_break_as_the_reference_does():
    """Experts 1 and 5 (in different groups) have identical rows and biases, so they tie for every
    token, and so do their groups' scores when they lead them; both routers keep the same ones."""
    ref, ours = _reference_router("deepseek_v3")
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(8, 64, generator=gen) * 0.25
    bias = 0.3 * torch.randn(8, generator=gen)
    weight[5], bias[5] = weight[1], bias[1]
    weight[4], bias[4] = weight[0], bias[0]  # groups {0, 1} and {4, 5} tie exactly
    x = torch.randn(400, 64, generator=gen)
    _, indices = _same_routing(ref, ours, weight, bias, x)
    assert ((indices == 1).any(-1) | (indices == 5).any(-1)).any()


def test_router_stays_float32_in_a_bfloat16_span(checkpoints):
    path = checkpoints["deepseek_v3"]
    span = load_span(path, 1, 2, dtype=torch.bfloat16)
    gate = span.layers[0].mlp.gate
    stored = load_file(str(path / "model.safetensors"))
    assert gate.weight.dtype == gate.e_score_correction_bias.dtype == torch.float32
    assert torch.equal(gate.e_score_correction_bias, stored["model.layers.1.mlp.gate.e_score_correction_bias"])
    assert span.layers[0].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    span(torch.randn(1, 5, 64, dtype=torch.bfloat16))


def test_fp8_dequantization_is_block_by_block():
    weight = torch.randn(300, 260, generator=torch.Generator().manual_seed(0))
    quantized, scale = quantize_fp8(weight)
    assert scale.shape == (3, 3)  # partial last blocks in both dimensions
    ours = dequantize_fp8(quantized, scale)
    assert torch.equal(ours, dequantize_fp8_reference(quantized, scale))
    assert rel_err(ours, weight) < 0.05
    assert torch.equal(dequantize_fp8(quantized, scale, torch.bfloat16), ours.to(torch.bfloat16))
    with pytest.raises(ValueError, match="grid"):
        dequantize_fp8(quantized, scale[:, :2])


def test_fp8_checkpoint_loads_dequantized(checkpoints, tmp_path):
    fp8, dequantized = tmp_path / "fp8", tmp_path / "dequantized"
    write_fp8(checkpoints["deepseek_v3"], fp8, dequantized)
    reader = CheckpointReader(fp8)
    raw = reader.load(["model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.down_proj.weight"])
    assert raw["model.layers.0.mlp.gate_proj.weight"].dtype == torch.float8_e4m3fn  # [160, 64]: 2 row blocks
    assert raw["model.layers.0.mlp.down_proj.weight"].shape == (64, 160)  # 2 column blocks
    a, b = load_span(fp8, 0, NUM_LAYERS), load_span(dequantized, 0, NUM_LAYERS)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    ref = reference_deepseek(dequantized)
    _check_block_ranges(fp8, ref)
    ids = prompt(1, 101, seed=4)
    assert torch.equal(LocalModel(fp8, spans=[(0, 2), (2, 4)]).generate_greedy(ids, 8),
                       reference_greedy(dequantized, ids, 8, ref))


def test_fp8_checkpoint_loads_as_int8_one_part_at_a_time(checkpoints, tmp_path, monkeypatch):
    """``--quant int8`` on an FP8 checkpoint: each part of a block (attention, router, experts, shared
    expert) is read, dequantized and quantized to int8 before the next part is read (the float copy of
    one part only), giving what the same quantization of the dequantized checkpoint gives."""
    import homeswarm.model.loader as loader

    fp8, dequantized = tmp_path / "fp8", tmp_path / "dequantized"
    write_fp8(checkpoints["deepseek_v3"], fp8, dequantized)
    events: list[tuple[str, int]] = []
    read, quantize = CheckpointReader.load, loader._quantize_unit

    def logged_read(self, names, *args, **kwargs):
        names = list(names)
        events.extend(("read", int(n.split(".")[2])) for n in names if n.startswith("model.layers."))
        return read(self, names, *args, **kwargs)

    def logged_quantize(block, name, unit, *args, **kwargs):
        events.append(("quantize", -1))
        return quantize(block, name, unit, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "load", logged_read)
    monkeypatch.setattr(loader, "_quantize_unit", logged_quantize)
    a = load_span(fp8, 0, NUM_LAYERS, quant="int8")
    layers = [layer for kind, layer in events if kind == "read"]
    assert layers == sorted(layers) and set(layers) == set(range(NUM_LAYERS))
    parts = [kind for kind, _ in events]
    assert parts.count("quantize") >= 3 * NUM_LAYERS  # attention, router, experts at least
    for i in range(1, len(events)):  # a part of another block is read only once the last one is quantized
        if events[i][0] == "read" and events[i - 1][0] == "read":
            assert events[i - 1][1] == events[i][1], events[: i + 1]
    monkeypatch.undo()
    b = load_span(dequantized, 0, NUM_LAYERS, quant="int8")
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key
    # what the node counts: parameters and the quantized layers' buffers (the routers' float32
    # correction biases are buffers it leaves out, 96 bytes here)
    held = sum(p.numel() * p.element_size() for p in a.parameters())
    held += sum(b.numel() * b.element_size() for m in a.modules() if isinstance(m, QuantizedLinearInt8)
                for b in m.buffers(recurse=False))
    config = ModelConfig.from_dir(fp8)
    assert held == span_weight_bytes(config, 0, NUM_LAYERS, torch.float32, "int8")
    assert all(m.weight.dtype == torch.int8 for m in a.modules() if isinstance(m, QuantizedLinearInt8))


def test_multi_token_prediction_layer_is_never_read(checkpoints, tmp_path, monkeypatch):
    src, path = checkpoints["kimi_k2"], tmp_path / "mtp"
    shutil.copytree(src, path)
    tensors = load_file(str(path / "model.safetensors"))
    # the extra layer the hub checkpoints append at index num_hidden_layers (with its own projections)
    for name in [n for n in tensors if n.startswith("model.layers.3.")]:
        tensors[name.replace("model.layers.3.", f"model.layers.{NUM_LAYERS}.")] = tensors[name].clone()
    tensors[f"model.layers.{NUM_LAYERS}.eh_proj.weight"] = torch.zeros(64, 128)
    save_file(tensors, str(path / "model.safetensors"))
    read: list[str] = []
    original = CheckpointReader.load

    def recording(self, names, *args, **kwargs):
        names = list(names)
        read.extend(names)
        return original(self, names, *args, **kwargs)

    monkeypatch.setattr(CheckpointReader, "load", recording)
    assert ModelConfig.from_dir(path).num_hidden_layers == NUM_LAYERS
    load_head(path)
    load_span(path, 0, NUM_LAYERS)
    assert read and not [n for n in read if n.startswith(f"model.layers.{NUM_LAYERS}.")]
    with pytest.raises(ValueError):
        load_span(path, NUM_LAYERS, NUM_LAYERS + 1)
