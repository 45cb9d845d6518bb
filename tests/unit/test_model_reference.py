"""Our blocks, head and generation against transformers, for every supported family (float32, exact)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from homeswarm.model import LocalModel, load_head, load_span
from tests.helpers.checkpoints import FAMILIES, make_checkpoint, reference_greedy, reference_model

RANGES = [(0, 4), (1, 3), (2, 4), (0, 1), (3, 4)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ckpt")
    return {family: make_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def references(checkpoints: dict[str, Path]) -> dict[str, torch.nn.Module]:
    return {family: reference_model(path) for family, path in checkpoints.items()}


def prompt(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_block_ranges_match_transformers_hidden_states(family, checkpoints, references):
    path, ref = checkpoints[family], references[family]
    ids = prompt(2, 60)
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
    states = out.hidden_states  # states[i] enters block i; the last one has the final norm applied
    head = load_head(path)
    assert rel_err(head.embed(ids), states[0]) < 1e-5
    for start, end in RANGES:
        span = load_span(path, start, end)
        ours = span(states[start])
        expected = states[end] if end < 4 else None
        if expected is None:
            assert rel_err(head.logits(ours), out.logits) < 1e-5, (start, end)
            assert rel_err(head.norm(ours), states[4]) < 1e-5, (start, end)
        else:
            assert rel_err(ours, expected) < 1e-5, (start, end)
        # A non-trivial check: the span really changes the hidden states.
        assert rel_err(states[start], ours) > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_prefill_and_steps_equal_uncached(family, checkpoints):
    span = load_span(checkpoints[family], 0, 4)
    hidden = torch.randn(2, 70, 64, generator=torch.Generator().manual_seed(3))
    full = span(hidden)
    cache = span.new_cache(2, 80)
    # Prefill in two uneven chunks, then single tokens: every mask shape of the cached path.
    parts = [span(hidden[:, :40], cache), span(hidden[:, 40:65], cache)]
    parts += [span(hidden[:, t:t + 1], cache) for t in range(65, 70)]
    assert cache.length == 70
    assert rel_err(torch.cat(parts, dim=1), full) < 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("batch", [1, 2])
def test_greedy_generation_equals_transformers(family, batch, checkpoints, references):
    path = checkpoints[family]
    ids = prompt(batch, 100 + batch, seed=batch)
    expected = reference_greedy(path, ids, 32, references[family])
    model = LocalModel(path, spans=[(0, 1), (1, 3), (3, 4)])
    ours = model.generate_greedy(ids, 32)
    assert ours.shape == (batch, ids.shape[1] + 32)
    assert torch.equal(ours, expected)
    # Not a degenerate model that always emits one token.
    assert len(set(ours[0, ids.shape[1]:].tolist())) > 3


def test_reference_comparison_can_fail(checkpoints, references, tmp_path):
    """A small change in one norm, losing llama3 rope scaling or the sliding window: all caught."""
    import json
    import shutil

    ids = prompt(1, 100)
    with torch.no_grad():
        states = references["qwen3"](ids, output_hidden_states=True).hidden_states
    span = load_span(checkpoints["qwen3"], 1, 3)
    span.layers[0].self_attn.k_norm.weight.data[0] += 0.05
    assert rel_err(span(states[1]), states[3]) > 1e-5

    # The same llama3 weights with plain RoPE: positions past the original context must differ.
    plain = tmp_path / "plain"
    shutil.copytree(checkpoints["llama3"], plain)
    config = json.loads((plain / "config.json").read_text())
    config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_parameters"]["rope_theta"]}
    (plain / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        states = references["llama3"](ids, output_hidden_states=True).hidden_states
    assert rel_err(load_span(plain, 0, 2)(states[0]), states[2]) > 1e-3
    assert rel_err(load_span(checkpoints["llama3"], 0, 2)(states[0]), states[2]) < 1e-5

    # Mistral without its sliding window (48 < 100 prompt tokens) must differ too.
    full = tmp_path / "full"
    shutil.copytree(checkpoints["mistral"], full)
    config = json.loads((full / "config.json").read_text())
    config["sliding_window"] = None
    (full / "config.json").write_text(json.dumps(config))
    with torch.no_grad():
        states = references["mistral"](ids, output_hidden_states=True).hidden_states
    assert rel_err(load_span(full, 0, 2)(states[0]), states[2]) > 1e-3
    assert rel_err(load_span(checkpoints["mistral"], 0, 2)(states[0]), states[2]) < 1e-5


def test_sampling_hook_and_zero_new_tokens(checkpoints):
    model = LocalModel(checkpoints["llama2"])
    ids = prompt(2, 10)
    assert torch.equal(model.generate(ids, 0), ids)
    seen: list[tuple[int, ...]] = []

    def pick_last(logits: torch.Tensor) -> torch.Tensor:
        seen.append(tuple(logits.shape))
        return torch.full((logits.shape[0],), 255)

    out = model.generate(ids, 3, sample_fn=pick_last)
    assert seen == [(2, 256)] * 3
    assert out[:, 10:].eq(255).all()
