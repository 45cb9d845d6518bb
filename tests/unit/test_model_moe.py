"""Mixture-of-Experts families against transformers (float32): block ranges, cached steps, greedy
generation, batched steps, routers (ties included), and loading experts from every stored layout."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from homeswarm.model import LocalModel, ModelConfig, load_head, load_span
from homeswarm.model.moe import Experts, SoftmaxTopKRouter
from tests.helpers.checkpoints import reference_greedy, reference_model
from tests.helpers.moe_checkpoints import MOE_FAMILIES, make_moe_checkpoint
from tests.helpers.reference import rel_err

NUM_LAYERS = 4


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("moe")
    return {family: make_moe_checkpoint(root / family, family, seed=i) for i, family in enumerate(MOE_FAMILIES)}


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {family: reference_model(path) for family, path in checkpoints.items()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_block_ranges_match_transformers_hidden_states(family, checkpoints, references):
    path, ref = checkpoints[family], references[family]
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


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_config_reads_the_moe_layout(family, checkpoints):
    config = ModelConfig.from_dir(checkpoints[family])
    assert config.moe is not None
    sparse = [config.is_sparse(i) for i in range(NUM_LAYERS)]
    expected = {"qwen3_moe": [True, False, True, True], "qwen2_moe": [False, True, False, True],
                "mixtral": [True] * 4}[family]
    assert sparse == expected


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_cached_and_batched_steps_equal_uncached(family, checkpoints):
    span = load_span(checkpoints[family], 0, NUM_LAYERS)
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


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_equals_transformers(family, batch, checkpoints, references):
    path = checkpoints[family]
    ids = prompt(batch, 100 + batch, seed=batch)
    expected = reference_greedy(path, ids, 32, references[family])
    ours = LocalModel(path, spans=[(0, 1), (1, 3), (3, 4)]).generate_greedy(ids, 32)
    assert torch.equal(ours, expected)
    assert len(set(ours[0, ids.shape[1]:].tolist())) > 3


def test_routing_is_far_from_uniform(checkpoints):
    """The test checkpoints route decisively: the k-th and (k+1)-th probabilities are well apart for
    most tokens, so a wrong choice of experts would show in the output."""
    span = load_span(checkpoints["qwen3_moe"], 0, 1)
    router = span.layers[0].mlp.gate
    x = span.layers[0].post_attention_layernorm(torch.randn(200, 64, generator=torch.Generator().manual_seed(5)))
    probs = torch.softmax(torch.nn.functional.linear(x, router.weight), dim=-1).sort(dim=-1, descending=True).values
    gap = probs[:, router.top_k - 1] - probs[:, router.top_k]
    assert gap.median() > 0.02


def test_top_k_ties_break_as_the_reference_does():
    """Two experts with identical router rows tie for every token; the lower index wins in both our
    router and transformers' (both use torch.topk on the same probabilities)."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    from tests.helpers.moe_checkpoints import moe_config

    config = moe_config("qwen3_moe")
    ref = Qwen3MoeTopKRouter(config)
    ours = SoftmaxTopKRouter(64, 8, 2, normalize=True)
    weight = torch.randn(8, 64, generator=torch.Generator().manual_seed(0))
    weight[5] = weight[2]  # experts 2 and 5 tie exactly
    weight[2] *= 0  # ... and both score 0: whenever they are chosen they are chosen together
    weight[5] *= 0
    with torch.no_grad():
        ref.weight.copy_(weight)
        ours.weight.copy_(weight)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(1))
    _, ref_weights, ref_indices = ref(x)
    our_weights, our_indices = ours(x)
    assert torch.equal(our_indices, ref_indices)
    assert torch.equal(our_weights, ref_weights)
    tied = (our_indices == 2).any(-1) | (our_indices == 5).any(-1)
    assert tied.any()  # the tie really happened for some tokens


def test_only_chosen_experts_run(checkpoints, monkeypatch):
    """A decoding step with top-2 of 8 experts multiplies by exactly 2 experts' weights per sparse layer."""
    span = load_span(checkpoints["mixtral"], 0, 1)
    calls: list[int] = []
    original = Experts.forward

    def counting(self, x, weights, indices):
        calls.append(len(set(indices.reshape(-1).tolist())))
        return original(self, x, weights, indices)

    monkeypatch.setattr(Experts, "forward", counting)
    used = []
    real_linear = torch.nn.functional.linear

    def linear(x, w, b=None):
        used.append(w.data_ptr())
        return real_linear(x, w, b)

    monkeypatch.setattr(torch.nn.functional, "linear", linear)
    span(torch.randn(1, 1, 64))
    experts = span.layers[0].mlp.experts
    expert_ptrs = {experts.gate_up_proj[e].data_ptr() for e in range(8)}
    assert calls == [2]
    assert len(expert_ptrs & set(used)) == 2


def _fuse_experts(src: Path, dst: Path, family: str) -> None:
    """Rewrite a per-expert checkpoint with transformers 5's fused expert tensors, sharded."""
    dst.mkdir()
    for name in ("config.json",):
        (dst / name).write_text((src / name).read_text())
    tensors = load_file(str(src / "model.safetensors"))
    gate, up, down = ("w1", "w3", "w2") if family == "mixtral" else ("gate_proj", "up_proj", "down_proj")
    layer_name = "block_sparse_moe" if family == "mixtral" else "mlp"
    out = {}
    for name, t in tensors.items():
        if ".experts." not in name:
            out[name] = t
    for layer in range(NUM_LAYERS):
        base = f"model.layers.{layer}.{layer_name}.experts"
        if f"{base}.0.{gate}.weight" not in tensors:
            continue
        n = sum(1 for k in tensors if k.startswith(f"{base}.") and k.endswith(f".{gate}.weight"))
        out[f"{base}.gate_up_proj"] = torch.stack(
            [torch.cat([tensors[f"{base}.{e}.{gate}.weight"], tensors[f"{base}.{e}.{up}.weight"]]) for e in range(n)])
        out[f"{base}.down_proj"] = torch.stack([tensors[f"{base}.{e}.{down}.weight"] for e in range(n)])
    names = sorted(out)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: out[k].contiguous() for k in keys}, str(dst / file))
        weight_map.update(dict.fromkeys(keys, file))
    (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_fused_sharded_experts_load_the_same(family, checkpoints, tmp_path):
    fused = tmp_path / "fused"
    _fuse_experts(checkpoints[family], fused, family)
    a = load_span(checkpoints[family], 1, 3)
    b = load_span(fused, 1, 3)
    assert a.state_dict().keys() == b.state_dict().keys()
    for key, value in a.state_dict().items():
        assert torch.equal(value, b.state_dict()[key]), key


def test_missing_expert_is_named(checkpoints, tmp_path):
    src = checkpoints["qwen2_moe"]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((src / "config.json").read_text())
    tensors = load_file(str(src / "model.safetensors"))
    del tensors["model.layers.1.mlp.experts.7.up_proj.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(KeyError, match=r"model\.layers\.1\.mlp\.experts\.7\.up_proj\.weight"):
        load_span(broken, 0, 2)
    load_span(broken, 2, 4)  # other blocks still load


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_path_equals_the_reference_experts(dtype):
    """A single row skips the grouping; it must compute bit for bit what transformers' experts compute
    for that row, float32 routing weights (Mixtral, DeepSeek) promoting the product in half precision
    as there."""
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    from tests.helpers.moe_checkpoints import moe_config

    ours = Experts(8, 64, 32).to(dtype)
    ref = Qwen3MoeExperts(moe_config("qwen3_moe")).to(dtype)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in ours.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
        ref.gate_up_proj.copy_(ours.gate_up_proj)
        ref.down_proj.copy_(ours.down_proj)
    x = torch.randn(1, 64, generator=gen).to(dtype)
    indices = torch.tensor([[6, 1, 3]])
    for weights in (torch.rand(1, 3, generator=gen), torch.rand(1, 3, generator=gen).to(dtype)):
        assert torch.equal(ours(x, weights, indices), ref(x, indices, weights))
