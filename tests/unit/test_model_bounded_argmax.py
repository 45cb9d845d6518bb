"""The greedy LM head from a low-precision copy (int8, bfloat16): its bound holds, and its token is the float32
product's argmax."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from homeswarm.model import DEMO_MODEL_DIR, LocalModel, load_head
from homeswarm.model.bounded_argmax import BoundedArgmax
from tests.helpers.checkpoints import make_checkpoint


def _weights(seed: int) -> list[torch.Tensor]:
    """Heads of several kinds: plain Gaussian, rows of very different norms, a few huge entries."""
    gen = torch.Generator().manual_seed(seed)
    plain = torch.randn(3000, 96, generator=gen) * 0.05
    scaled = torch.randn(3000, 96, generator=gen) * torch.logspace(-3, 1, 3000)[:, None]
    spiky = torch.randn(3000, 96, generator=gen) * 0.05
    spiky[torch.randint(0, 3000, (40,), generator=gen), torch.randint(0, 96, (40,), generator=gen)] = 30.0
    return [plain, scaled, spiky]


def _inputs(seed: int, rows: int) -> torch.Tensor:
    """Hidden states of several scales, some with an outlier feature, as trained models have."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 96, generator=gen) * torch.logspace(-2, 2, rows)[:, None]
    x[::3, 7] *= 50
    return x


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
@pytest.mark.parametrize("kind", range(3))
def test_every_float32_logit_lies_within_the_bound(kind, precision):
    weight = _weights(0)[kind]
    argmax = BoundedArgmax(weight, precision=precision)
    assert argmax.precision == precision
    x = _inputs(1, 64)
    y, bound = argmax.bounds(x)
    exact = F.linear(x.double(), weight.double())  # the real product
    computed = F.linear(x, weight)  # the float32 one that greedy decoding compares
    assert bound.shape == y.shape == (64, 3000)
    assert bool(((computed.double() - y.double()).abs() <= bound.double()).all())
    assert bool(((exact - y.double()).abs() <= bound.double()).all())
    assert float((bound / y.abs().amax(dim=1, keepdim=True)).median()) < 0.05  # a bound, not a blank cheque


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
@pytest.mark.parametrize("kind", range(3))
def test_the_token_is_the_float32_products_argmax(kind, precision):
    weight = _weights(2)[kind]
    argmax = BoundedArgmax(weight, precision=precision)
    x = _inputs(3, 200)
    assert argmax(x).tolist() == F.linear(x, weight).argmax(dim=-1).tolist()
    assert argmax.fallbacks == 0
    assert argmax.candidates < 200 * 40  # a few rows recomputed per input, not the whole head


@pytest.mark.parametrize("precision", ["int8", "bfloat16"])
def test_near_ties_and_exact_ties(precision):
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(500, 64, generator=gen) * 0.05
    x = torch.randn(1, 64, generator=gen)
    best = int(F.linear(x, weight).argmax())
    # a row equal to the best but one unit in the last place larger in its largest contribution, which
    # bfloat16 cannot tell apart from the best
    near = weight[best].clone()
    j = int((near * x[0]).argmax())
    near[j] = torch.nextafter(near[j], torch.tensor(float("inf")) * torch.sign(x[0, j]))
    weight[17] = near
    for row in (weight[best], near):
        assert torch.equal(row.to(torch.bfloat16), near.to(torch.bfloat16))
    expected = int(F.linear(x, weight).argmax())
    assert BoundedArgmax(weight, precision=precision)(x).item() == expected
    # exact ties go to the lowest index, as torch.argmax
    weight[3] = weight[expected]
    assert BoundedArgmax(weight, precision=precision)(x).item() == 3 == int(F.linear(x, weight).argmax())
    # with more candidates than are recomputed first (rows of equal norm, each one unit in the last place
    # apart in one entry), the winner among the rest is still found
    many = weight[expected].repeat(40, 1)
    for k in range(40):
        many[k, j] = many[k, j] + k * torch.finfo(torch.float32).eps * many[k, j].abs() * torch.sign(x[0, j])
    order = torch.randperm(40, generator=gen)
    many = many[order].contiguous()
    argmax = BoundedArgmax(many, precision=precision, max_candidates=40)
    assert argmax(x).item() == int(F.linear(x, many).argmax())
    assert argmax.fallbacks == 0


def test_too_many_candidates_or_anything_not_finite_falls_back_to_the_full_product():
    weight = torch.randn(200, 32).mul(0.05).expand(200, 32).contiguous()
    weight[:] = weight[0]  # every row the same: every row is a candidate
    argmax = BoundedArgmax(weight, max_candidates=10)
    x = torch.randn(2, 32)
    assert argmax(x).tolist() == [0, 0]
    assert argmax.fallbacks == 2
    argmax = BoundedArgmax(torch.randn(200, 32))
    x[1, 5] = float("nan")
    x[0, 5] = float("inf")
    assert argmax(x).tolist() == F.linear(x, argmax.weight).argmax(dim=-1).tolist()
    bad = torch.randn(200, 32)
    bad[9, 3] = float("nan")
    assert not BoundedArgmax(bad).usable


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="float32 weight"):
        BoundedArgmax(torch.randn(10, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="precision"):
        BoundedArgmax(torch.randn(10, 4), precision="int4")
    with pytest.raises(ValueError, match="max_candidates"):
        BoundedArgmax(torch.randn(10, 4), max_candidates=0)
    with pytest.raises(ValueError, match=r"float32 \[rows, 4\]"):
        BoundedArgmax(torch.randn(10, 4))(torch.randn(3, 5))


@pytest.mark.parametrize("tie", [False, True])
def test_client_head_greedy_matches_its_logits(tmp_path, tie):
    path = make_checkpoint(tmp_path / "m", "llama3", tie_word_embeddings=tie, vocab_size=4096)
    head = load_head(path)
    plain = head.greedy(torch.randn(3, 5, head.config.hidden_size))  # before prepare_greedy: the full product
    assert plain.shape == (3,)
    assert not head.prepare_greedy()  # a small head: the full product is as fast
    assert head.prepare_greedy(min_entries=0)
    hidden = torch.randn(8, 5, head.config.hidden_size) * 4
    assert head.greedy(hidden).tolist() == head.logits(hidden)[:, -1].float().argmax(dim=-1).tolist()
    assert head.greedy(hidden, every_position=True).tolist() == head.logits(hidden).float().argmax(dim=-1).tolist()
    assert head.bounded_argmax is not None and head.bounded_argmax.fallbacks == 0
    assert not load_head(path, dtype=torch.bfloat16).prepare_greedy(min_entries=0)  # read as it is
    with pytest.raises(ValueError, match="dtype"):
        head.greedy(hidden.double())


def test_the_demo_models_greedy_text_needs_few_float32_rows():
    """Along the bundled (trained) model's own greedy text, the token is the full product's and only a
    few rows of the head are recomputed per token."""
    model = LocalModel(DEMO_MODEL_DIR)
    assert model.head.prepare_greedy(min_entries=0)
    caches = [span.new_cache(1, 200) for span in model.spans]
    hidden = model.forward(model.head.embed(torch.tensor([[1, 50, 60, 70]])), caches)
    for _ in range(120):
        expected = model.head.logits(hidden[:, -1:])[:, -1].float().argmax(dim=-1)
        assert model.head.greedy(hidden).tolist() == expected.tolist()
        hidden = model.forward(model.head.embed(expected[:, None]), caches)
    argmax = model.head.bounded_argmax
    assert argmax is not None and argmax.fallbacks == 0
    assert argmax.candidates / 120 < 32
