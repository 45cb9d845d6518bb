"""A sub-span shares its parent's weights and computes exactly what a span loaded alone computes."""

from __future__ import annotations

import pytest
import torch

from homeswarm.model import load_span
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sub") / "qwen3", "qwen3", num_layers=4)


def test_subspan_matches_span_loaded_alone(checkpoint):
    whole = load_span(checkpoint, 0, 4)
    part = whole.subspan(1, 3)
    alone = load_span(checkpoint, 1, 3)
    assert part.layers[0].mlp.down_proj.weight.data_ptr() == whole.layers[1].mlp.down_proj.weight.data_ptr()
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(part(hidden), alone(hidden), rtol=0, atol=0)
    cache_a, cache_b = part.new_cache(2, 16), alone.new_cache(2, 16)
    part(hidden, cache_a)
    alone(hidden, cache_b)
    step = torch.randn(2, 1, 64)
    torch.testing.assert_close(part(step, cache_a), alone(step, cache_b), rtol=0, atol=0)
    assert cache_a.num_blocks == 2 and cache_a.length == 10


@pytest.mark.parametrize("bounds", [(0, 0), (2, 1), (0, 5), (-1, 2)])
def test_subspan_out_of_range(checkpoint, bounds):
    whole = load_span(checkpoint, 0, 4)
    with pytest.raises(ValueError, match="not a non-empty part"):
        whole.subspan(*bounds)
