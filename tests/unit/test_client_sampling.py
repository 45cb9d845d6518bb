"""Next-token choice: greedy is argmax; sampling keeps exactly the tokens Hugging Face's warpers keep."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from homeswarm.client.sampling import SamplingParams, next_tokens


def kept_by_us(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The tokens our sampler can draw: those it gives non-zero probability, found by patching multinomial."""
    seen: list[torch.Tensor] = []
    original = torch.multinomial

    def spy(probs, num_samples, generator=None):  # noqa: ANN001
        seen.append(probs.clone())
        return original(probs, num_samples, generator=generator)

    torch.multinomial = spy
    try:
        next_tokens(logits, params, torch.Generator().manual_seed(0))
    finally:
        torch.multinomial = original
    return seen[0] > 0


def kept_by_hf(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    scores = logits.float()
    ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(params.temperature)(ids, scores)
    if params.top_k is not None:
        scores = TopKLogitsWarper(params.top_k)(ids, scores)
    if params.top_p is not None and params.top_p < 1.0:
        scores = TopPLogitsWarper(params.top_p)(ids, scores)
    return torch.isfinite(scores)


def test_greedy_is_argmax():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(1))
    expected = logits.argmax(dim=-1)
    assert torch.equal(next_tokens(logits, SamplingParams()), expected)
    assert torch.equal(next_tokens(logits, SamplingParams(do_sample=True, temperature=0.0)), expected)
    # greedy ignores top-k/top-p and never touches a generator
    assert torch.equal(next_tokens(logits, SamplingParams(do_sample=False, top_k=3, top_p=0.1)), expected)


def test_top_k_samples_stay_in_the_top_k():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(8, 50, generator=gen)
    top = torch.topk(logits, 5, dim=-1).indices
    params = SamplingParams(do_sample=True, temperature=1.5, top_k=5)
    drawn = set()
    for _ in range(100):
        tokens = next_tokens(logits, params, gen)
        assert bool((top == tokens[:, None]).any(dim=-1).all())
        drawn.add(int(tokens[0]))
    assert len(drawn) > 1  # it does sample, not just take the argmax


def test_top_k_one_is_greedy():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 30, generator=gen)
    for _ in range(20):
        assert torch.equal(
            next_tokens(logits, SamplingParams(do_sample=True, top_k=1), gen), logits.argmax(-1)
        )


def test_top_p_samples_stay_in_the_nucleus():
    # probabilities 0.5, 0.3, 0.15, 0.05: the nucleus for p=0.7 is {0, 1}; for p=0.85 it is {0, 1, 2}
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    gen = torch.Generator().manual_seed(4)
    for p, nucleus in [(0.7, {0, 1}), (0.85, {0, 1, 2}), (0.4, {0})]:
        drawn = {int(next_tokens(logits, SamplingParams(do_sample=True, top_p=p), gen)) for _ in range(150)}
        assert drawn == nucleus


def test_seeded_generator_is_reproducible():
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(5))
    params = SamplingParams(do_sample=True, temperature=0.8, top_k=40, top_p=0.9)
    a = [next_tokens(logits, params, torch.Generator().manual_seed(9)) for _ in range(3)]
    assert all(torch.equal(a[0], x) for x in a)


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(do_sample=True, temperature=1.0, top_k=10),
        SamplingParams(do_sample=True, temperature=0.7, top_k=1),
        SamplingParams(do_sample=True, temperature=1.3, top_k=10_000),
        SamplingParams(do_sample=True, temperature=1.0, top_p=0.9),
        SamplingParams(do_sample=True, temperature=0.5, top_p=0.5),
        SamplingParams(do_sample=True, temperature=2.0, top_p=0.99),
        SamplingParams(do_sample=True, temperature=1.0, top_p=1e-6),
        SamplingParams(do_sample=True, temperature=0.9, top_k=50, top_p=0.8),
        SamplingParams(do_sample=True, temperature=1.1, top_k=3, top_p=0.95),
    ],
    ids=repr,
)
def test_kept_set_matches_hugging_face(params):
    gen = torch.Generator().manual_seed(6)
    for trial in range(12):
        vocab = [17, 100, 1000][trial % 3]
        logits = torch.randn(4, vocab, generator=gen) * (1 + trial % 4)
        if trial % 5 == 0:  # ties, which a sort may order either way
            logits = logits.round()
        ours, theirs = kept_by_us(logits, params), kept_by_hf(logits, params)
        assert torch.equal(ours, theirs), (
            f"trial {trial}: {ours.sum(-1).tolist()} vs {theirs.sum(-1).tolist()}"
        )


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=-1.0),
        SamplingParams(top_k=0),
        SamplingParams(top_p=0.0),
        SamplingParams(top_p=1.5),
    ],
    ids=repr,
)
def test_validate_rejects(params):
    with pytest.raises(ValueError):
        params.validate()
