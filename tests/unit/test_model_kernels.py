"""Our quantized products (homeswarm.model.kernels) against plain references, on every instruction set
this CPU has (scalar, AVX2, AVX-512), on shapes whose sizes are not multiples of the vector width.

Two references, both in float64 from the dequantized weights: the activations rounded exactly as the
kernels round them (int8 in blocks of 32), where only the float32 sums' order differs (tolerance 1e-5
of the largest output); and the activations as given, where the rounding of the activations shows:
each of a block's 32 inputs is off by at most max|x| / 254 of its block, so an output is off by at most
sqrt(32) / 254 (2.2%) of |x| |w| (its row's and weight row's norms; measured at most 0.67% here).
"""

from __future__ import annotations

import itertools

import pytest
import torch

from homeswarm.model import kernels
from homeswarm.model.int4_pack import pack_plain

pytestmark = pytest.mark.skipif(kernels.best_isa() < 0, reason="the kernels' library is not built here")

EXACT_TOL = 1e-5
PLAIN_BOUND = 32**0.5 / 254 * (1 + 1e-4)


def isas() -> list[int]:
    return list(range(kernels.best_isa() + 1))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def quantized_activations(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the kernels see it: int8 in blocks of 32, dequantized, in float64."""
    rows, cols = x.shape
    padded = -(-cols // 32) * 32
    blocks = torch.nn.functional.pad(x.float(), (0, padded - cols)).view(rows, -1, 32)
    d = blocks.abs().amax(dim=-1, keepdim=True) / 127  # float32, as the kernels divide
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    q = torch.round(blocks * inv)  # half to even, as the vector conversions round
    return (q.double() * d.double()).view(rows, padded)[:, :cols]


def rel_max(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-30)).item()


def check(y: torch.Tensor, x: torch.Tensor, w: torch.Tensor, what: object) -> None:
    assert rel_max(y, quantized_activations(x) @ w.T) < EXACT_TOL, what
    bound = PLAIN_BOUND * x.double().norm(dim=1)[:, None] * w.norm(dim=1)[None]
    assert bool(((y.double() - x.double() @ w.T).abs() <= bound).all()), what


def int8_weight(rows: int, cols: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    q = torch.randint(-128, 128, (rows, cols), generator=gen, dtype=torch.int8)
    scales = (torch.rand(rows, generator=gen) + 0.5) / 64
    return q, scales


def int4_weight(rows: int, cols: int, group: int, zeros: bool, dtype: torch.dtype,
                gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(packed plain uint8 [N, K/2], scales [N, K/g, Z] in ``dtype``, the float64 weight)."""
    v = torch.randint(0, 16, (rows, cols), generator=gen)
    s = ((torch.rand(rows, cols // group, generator=gen) + 0.5) / 16).to(dtype)
    parts = [s]
    if zeros:
        parts.append((torch.randn(rows, cols // group, generator=gen) / 16).to(dtype))
    sz = torch.stack(parts, dim=-1).contiguous()
    z = sz[..., 1].double() if zeros else torch.zeros(rows, cols // group, dtype=torch.float64)
    w = (v.double() - 8).view(rows, -1, group) * sz[..., 0].double()[..., None] + z[..., None]
    return pack_plain(v), sz, w.view(rows, cols)


def activations(rows: int, cols: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(rows, cols, generator=gen)
    x[:, ::7] *= 10  # a few large inputs, as activations have
    return x


INT8_SHAPES = [(1, 1), (7, 31), (33, 64), (5, 100), (17, 200), (3, 544), (9, 1000)]


@pytest.mark.parametrize("isa", isas(), ids=lambda i: kernels.ISAS[i])
def test_int8_products_match_the_reference(isa):
    gen = torch.Generator().manual_seed(isa)
    for (n, k), dtype in itertools.product(INT8_SHAPES, (torch.bfloat16, torch.float16, torch.float32)):
        q, scales = int8_weight(n, k, gen)
        scales = scales.to(dtype)
        w = q.double() * scales.double()[:, None]
        for m in range(1, 9):
            x = activations(m, k, gen)
            y = kernels.qmm(x, [q], [scales], isa_index=isa)
            assert y.shape == (m, n) and y.dtype == torch.float32
            check(y, x, w, (n, k, m, dtype))


INT4_SHAPES = {32: [(1, 32), (7, 96), (33, 160), (5, 416)], 64: [(3, 64), (17, 192), (9, 320)],
               128: [(5, 128), (11, 384), (2, 640)]}


@pytest.mark.parametrize("isa", isas(), ids=lambda i: kernels.ISAS[i])
@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_products_match_the_reference(isa, group):
    gen = torch.Generator().manual_seed(group + isa)
    for (n, k), zeros, dtype in itertools.product(INT4_SHAPES[group], (False, True),
                                                  (torch.bfloat16, torch.float16, torch.float32)):
        packed, sz, w = int4_weight(n, k, group, zeros, dtype, gen)
        for m in (1, 2, 3, 4, 5, 8):
            x = activations(m, k, gen)
            y = kernels.qmm(x, [packed], [sz], group, isa_index=isa)
            assert y.shape == (m, n)
            check(y, x, w, (n, k, m, zeros, dtype))


@pytest.mark.parametrize("isa", isas(), ids=lambda i: kernels.ISAS[i])
def test_every_instruction_set_gives_the_same_numbers_within_float_rounding(isa):
    gen = torch.Generator().manual_seed(7)
    packed, sz, _ = int4_weight(65, 352, 32, True, torch.bfloat16, gen)
    x = activations(6, 352, gen)
    ref = kernels.qmm(x, [packed], [sz], 32, isa_index=0)
    assert rel_max(kernels.qmm(x, [packed], [sz], 32, isa_index=isa), ref.double()) < EXACT_TOL


@pytest.mark.parametrize("group", [0, 32])
def test_several_experts_in_one_call(group):
    gen = torch.Generator().manual_seed(3)
    n, k, experts = 24, 160, 5
    if group:
        made = [int4_weight(n, k, group, False, torch.float16, gen)[:2] for _ in range(experts)]
    else:
        made = [int8_weight(n, k, gen) for _ in range(experts)]
    weights, scales = [w for w, _ in made], [s for _, s in made]
    x = activations(3, k, gen)
    # expert 0 takes rows 2, 0; expert 1 none; expert 2 row 1; expert 3 rows 0, 1, 2; expert 4 row 2
    row_index = torch.tensor([2, 0, 1, 0, 1, 2, 2])
    offsets = torch.tensor([0, 2, 2, 3, 6, 7])
    for isa in isas():
        y = kernels.qmm(x, weights, scales, group, row_index, offsets, isa_index=isa)
        assert y.shape == (7, n)
        for e in range(experts):
            for t in range(int(offsets[e]), int(offsets[e + 1])):
                one = kernels.qmm(x[row_index[t]][None], [weights[e]], [scales[e]], group, isa_index=isa)
                assert torch.equal(y[t], one[0]), (isa, e, t)


def test_shapes_the_kernels_cannot_take_are_refused():
    gen = torch.Generator().manual_seed(0)
    packed, sz, _ = int4_weight(8, 96, 32, False, torch.bfloat16, gen)
    with pytest.raises(RuntimeError, match="multiple of the group"):
        kernels.qmm(torch.randn(1, 96), [packed], [sz[:, :1].contiguous()], 64)  # 96 inputs, groups of 64
    with pytest.raises(RuntimeError, match="int8 weights"):
        kernels.qmm(torch.randn(1, 96), [packed], [torch.ones(8)], 0)  # uint8 weights as int8
    with pytest.raises(RuntimeError, match="not available"):
        kernels.qmm(torch.randn(1, 96), [packed], [sz], 32, isa_index=len(kernels.ISAS))


def test_the_environment_chooses_the_instruction_set(monkeypatch):
    best = kernels.best_isa()
    monkeypatch.setenv(kernels.ENV, "off")
    assert not kernels.available()
    monkeypatch.setenv(kernels.ENV, "scalar")
    assert kernels.isa() == 0
    monkeypatch.setenv(kernels.ENV, "avx512")
    assert kernels.isa() == min(2, best)
    monkeypatch.setenv(kernels.ENV, "auto")
    assert kernels.isa() == best
    monkeypatch.setenv(kernels.ENV, "sse")
    with pytest.raises(ValueError):
        kernels.isa()


@pytest.mark.parametrize("isa", isas(), ids=lambda i: kernels.ISAS[i])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(isa):
    # AVX-512 computes 2-8 rows two weight rows at a time and one row one at a time: the same numbers
    gen = torch.Generator().manual_seed(11)
    for zeros in (False, True):
        packed, sz, _ = int4_weight(37, 416, 32, zeros, torch.bfloat16, gen)
        x = activations(8, 416, gen)
        together = kernels.qmm(x, [packed], [sz], 32, isa_index=isa)
        for m in range(8):
            assert torch.equal(together[m], kernels.qmm(x[m : m + 1], [packed], [sz], 32, isa_index=isa)[0]), (m, zeros)
