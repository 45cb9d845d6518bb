"""forward_batch computes exactly what one forward per session computes, and leaves the same caches."""

from __future__ import annotations

import pytest
import torch

from homeswarm.model import load_span
from tests.helpers.checkpoints import make_checkpoint

FAMILIES = ("llama3", "qwen2", "qwen3", "mistral")  # mistral: sliding window 48, crossed below


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("batch") / request.param, request.param, num_layers=2)


def _sessions(span, specs, seed=0):
    """Per spec (batch, prefix, new): a prefilled cache and the next step's hidden states, twice (a, b)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for batch, prefix, new in specs:
        cache_a, cache_b = span.new_cache(batch, 80), span.new_cache(batch, 80)
        if prefix:
            pre = torch.randn(batch, prefix, 64, generator=gen).to(span.dtype)
            span(pre, cache_a)
            span(pre, cache_b)
        out.append((torch.randn(batch, new, 64, generator=gen).to(span.dtype), cache_a, cache_b))
    return out


def _assert_caches_equal(a, b):
    assert a.length == b.length
    for ka, kb, va, vb in zip(a.keys, b.keys, a.values, b.values, strict=True):
        torch.testing.assert_close(ka[:, :, : a.length], kb[:, :, : b.length], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(va[:, :, : a.length], vb[:, :, : b.length], rtol=1e-5, atol=1e-5)


# (batch, prefix length, new tokens): decode steps at different positions, prefills, a mix; past 48
# for mistral's window.
MIXES = {
    "decode": [(1, 5, 1), (1, 60, 1), (2, 17, 1), (1, 0, 1)],
    "prefill": [(1, 0, 9), (2, 0, 3), (1, 0, 55)],
    "mixed": [(1, 50, 1), (2, 0, 12), (1, 30, 20), (3, 2, 1), (1, 0, 1)],
}


@pytest.mark.parametrize("mix", MIXES)
def test_forward_batch_matches_forward_float32(checkpoint, mix):
    span = load_span(checkpoint, 0, 2)
    sessions = _sessions(span, MIXES[mix])
    expected = [span(hidden, cache_a) for hidden, cache_a, _ in sessions]
    outputs = span.forward_batch([(hidden, cache_b) for hidden, _, cache_b in sessions])
    assert len(outputs) == len(sessions)
    for out, ref, (hidden, cache_a, cache_b) in zip(outputs, expected, sessions, strict=True):
        assert out.shape == hidden.shape
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        _assert_caches_equal(cache_a, cache_b)


def test_forward_batch_bfloat16_and_repeated_steps(checkpoint):
    span = load_span(checkpoint, 0, 2, dtype=torch.bfloat16)
    sessions = _sessions(span, [(1, 3, 1), (2, 47, 1), (1, 0, 6)])
    for _ in range(3):  # several decode steps in a row: positions advance per session
        expected = [span(hidden, cache_a) for hidden, cache_a, _ in sessions]
        outputs = span.forward_batch([(hidden, cache_b) for hidden, _, cache_b in sessions])
        for out, ref in zip(outputs, expected, strict=True):
            assert out.dtype == torch.bfloat16
            torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)
        sessions = [(out[:, -1:], a, b) for out, (_, a, b) in zip(outputs, sessions, strict=True)]
    assert [b.length for _, _, b in sessions] == [6, 50, 8]


def test_forward_batch_single_item_and_no_cache(checkpoint):
    span = load_span(checkpoint, 0, 2)
    hidden = torch.randn(2, 7, 64, generator=torch.Generator().manual_seed(3))
    (out,) = span.forward_batch([(hidden, None)])
    torch.testing.assert_close(out, span(hidden), rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def llama_span(tmp_path_factory):
    return load_span(make_checkpoint(tmp_path_factory.mktemp("bad") / "llama3", "llama3", num_layers=2), 0, 2)


def test_forward_batch_rejects_bad_items_before_touching_caches(llama_span):
    span = llama_span
    good = span.new_cache(1, 8)
    full = span.new_cache(1, 2)
    span(torch.randn(1, 2, 64), full)
    cases = [
        ([], "non-empty list"),
        ([(torch.randn(1, 1, 64), good), (torch.randn(1, 1, 32), span.new_cache(1, 8))], "item 1: hidden size"),
        ([(torch.randn(1, 1, 64), good), (torch.randn(1, 1, 64), full)], "item 1: cache overflow"),
        ([(torch.randn(1, 1, 64), good), (torch.randn(1, 1, 64), good)], "same cache appears twice"),
        ([(torch.randn(2, 1, 64), good)], "item 0: batch size mismatch"),
        ([(torch.randn(1, 1, 64), "cache")], "item 0: cache must be a KVCache"),
        ([torch.randn(1, 1, 64)], "item 0 must be a"),
    ]
    for items, message in cases:
        with pytest.raises(ValueError, match=message):
            span.forward_batch(items)
    assert good.length == 0 and full.length == 2
