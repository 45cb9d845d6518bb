"""KV cache accounting, cache and shape errors, half-precision spans, head id checks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from homeswarm.model import KVCache, LocalModel, ModelConfig, cache_bytes, load_head, load_span
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("c") / "qwen3", "qwen3")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize(("num_blocks", "batch", "max_length"), [(1, 1, 1), (3, 2, 17), (4, 5, 300)])
def test_cache_bytes_equals_allocated(ckpt, dtype, num_blocks, batch, max_length):
    config = ModelConfig.from_dir(ckpt)
    cache = KVCache(config, num_blocks, batch, max_length, dtype=dtype)
    expected = 2 * num_blocks * batch * 2 * max_length * 16 * torch.empty((), dtype=dtype).element_size()
    assert cache.nbytes == cache_bytes(config, num_blocks, batch, max_length, dtype) == expected
    span_cache = load_span(ckpt, 0, num_blocks, dtype=dtype).new_cache(batch, max_length)
    assert span_cache.nbytes == expected and span_cache.dtype == dtype and span_cache.length == 0


def test_cache_overflow_leaves_cache_unchanged(ckpt):
    span = load_span(ckpt, 1, 3)
    cache = span.new_cache(2, 10)
    hidden = torch.randn(2, 8, 64)
    span(hidden, cache)
    # Positions past `length` are uninitialized memory: only the stored ones are compared.
    snapshot = [t[:, :, :8].clone() for t in cache.keys + cache.values]
    with pytest.raises(ValueError, match="overflow"):
        span(torch.randn(2, 3, 64), cache)
    assert cache.length == 8
    assert all(torch.equal(a, b[:, :, :8]) for a, b in zip(snapshot, cache.keys + cache.values, strict=True))
    span(torch.randn(2, 2, 64), cache)  # exactly fills it
    assert cache.length == 10
    with pytest.raises(ValueError, match="overflow"):
        span(torch.randn(2, 1, 64), cache)


def test_shape_batch_dtype_and_cache_mismatches(ckpt):
    span = load_span(ckpt, 0, 2)
    cache = span.new_cache(2, 16)
    bad = {
        "3-D": torch.randn(2, 64),
        "hidden size": torch.randn(2, 4, 32),
        "non-empty": torch.randn(2, 0, 64),
        "dtype": torch.randn(2, 4, 64, dtype=torch.float64),
    }
    for message, hidden in bad.items():
        with pytest.raises(ValueError, match=message):
            span(hidden, cache)
    with pytest.raises(ValueError, match="batch size"):
        span(torch.randn(3, 4, 64), cache)
    with pytest.raises(ValueError, match="blocks"):
        span(torch.randn(2, 4, 64), load_span(ckpt, 0, 3).new_cache(2, 16))
    with pytest.raises(ValueError, match="cache is"):
        span(torch.randn(2, 4, 64), load_span(ckpt, 0, 2, dtype=torch.bfloat16).new_cache(2, 16))
    assert cache.length == 0
    with pytest.raises(ValueError, match="positive"):
        span.new_cache(0, 16)


def test_head_rejects_bad_ids(ckpt):
    head = load_head(ckpt)
    for ids in (torch.tensor([[0, 256]]), torch.tensor([[-1, 3]])):
        with pytest.raises(ValueError, match=r"\[0, 256\)"):
            head.embed(ids)
    with pytest.raises(ValueError, match="2-D"):
        head.embed(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="integer"):
        head.embed(torch.tensor([[1.0, 2.0]]))
    assert head.embed(torch.tensor([[0, 255]], dtype=torch.int32)).shape == (1, 2, 64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_spans_stay_close(ckpt, dtype):
    hidden = torch.randn(2, 24, 64, generator=torch.Generator().manual_seed(0))
    full = load_span(ckpt, 0, 4)(hidden)
    span = load_span(ckpt, 0, 4, dtype=dtype)
    assert all(p.dtype == dtype for p in span.parameters())
    out = span(hidden.to(dtype))
    assert out.dtype == dtype and torch.isfinite(out).all()
    assert rel_err(out, full) < 0.05
    # The cached path agrees with the uncached one in this dtype as well.
    cache = span.new_cache(2, 24)
    stepped = torch.cat([span(hidden[:, :20].to(dtype), cache)]
                        + [span(hidden[:, t:t + 1].to(dtype), cache) for t in range(20, 24)], dim=1)
    assert rel_err(stepped, out) < 0.02
    # Whole-model generation runs in this dtype.
    tokens = LocalModel(ckpt, dtype=dtype).generate_greedy(torch.randint(0, 256, (1, 8)), 4)
    assert tokens.shape == (1, 12)


def test_cache_truncate_and_reset(ckpt):
    span = load_span(ckpt, 0, 1)
    cache = span.new_cache(1, 8)
    hidden = torch.randn(1, 5, 64)
    first = span(hidden, cache)
    cache.truncate(3)
    # Replaying the dropped positions gives the same outputs.
    assert torch.allclose(span(hidden[:, 3:], cache), first[:, 3:], atol=1e-6)
    with pytest.raises(ValueError):
        cache.truncate(6)
    cache.reset()
    assert cache.length == 0 and cache.remaining == 8
