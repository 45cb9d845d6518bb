"""Weight-only quantization: each quantized linear against its dequantized reference, the paths taken
for shapes torch's kernels reject, the int4 packing layouts, quantized experts, a quantized block of
every supported family against the float one, and the bytes a quantized block takes.

Tolerances (relative to the largest reference output, references in float64 from the dequantized
weights): 1e-5 where the computation is float32 (the dense path, and the kernels run with float32
activations); 4e-3 on torch's kernels' bfloat16 path, which rounds activations and outputs to bfloat16
(8 significant bits); 1.5e-2 on our kernels (homeswarm.model.kernels), which round activations to int8
in blocks of 32 (measured at most 7.7e-3 over 10 inputs of each kernel shape at 1-128 rows); 8e-3 on dense products in bfloat16 (prefill rows, where the CPU is fast at
bfloat16), which round the dequantized weights too. Blocks of every family against the float block holding the dequantized weights:
1e-5 on the float32 path; with the kernels, the median row within 5% and every row within 8% (MoE
blocks: the median only, as a row whose router choice flips under bfloat16 rounding differs wholly;
measured medians 1-3%, dense maxima under 4.5%). Against the float weights, on the
trained demo model: each block's update within 1% (int8) and 8% (int4) of the float block's. (Random
checkpoints say little about accuracy: their peaked attention amplifies any weight error.)
"""

from __future__ import annotations

import gc
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn

from homeswarm.model import (
    DEMO_MODEL_DIR,
    BlockSpan,
    ModelConfig,
    int4_pack,
    kernels,
    load_head,
    load_span,
    quant,
    span_weight_bytes,
)
from homeswarm.model.families import FAMILIES
from homeswarm.model.moe import Experts, GptOssExperts
from homeswarm.model.quant import (
    INT4_GROUP_SIZES,
    QuantizedExperts,
    QuantizedLinearInt4,
    QuantizedLinearInt8,
    dequantize_int4,
    dequantize_int8,
    quantize_block,
    quantize_int4,
    quantize_int8,
)

FLOAT_TOL = 1e-5
BF16_TOL = 4e-3
# dense products in bfloat16 round the dequantized weights too (each to 2^-9 of itself, where the kernels
# keep them exact): measured at most 3.5e-3 (int8) and 4.4e-3 (int4) over 40 inputs of each kernel shape
DENSE_BF16_TOL = 8e-3
OURS_TOL = 1.5e-2


def weight(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(rows, cols, generator=gen) * (1.5 / cols**0.5)


def linear(rows: int, cols: int, *, bias: bool = True, seed: int = 0) -> nn.Linear:
    layer = nn.Linear(cols, rows, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(weight(rows, cols, seed))
        if bias:
            layer.bias.copy_(torch.randn(rows, generator=torch.Generator().manual_seed(seed + 1)))
    return layer


def quantized(layer: nn.Linear, fmt: str, group_size: int = 64) -> nn.Module:
    if fmt == "int8":
        return QuantizedLinearInt8.from_linear(layer)
    return QuantizedLinearInt4.from_linear(layer, group_size)


def reference_weight(layer: nn.Linear, fmt: str, group_size: int = 64) -> torch.Tensor:
    if fmt == "int8":
        return dequantize_int8(*quantize_int8(layer.weight))
    return dequantize_int4(*quantize_int4(layer.weight, group_size), layer.in_features)


def reference(x: torch.Tensor, layer: nn.Linear, fmt: str, group_size: int = 64) -> torch.Tensor:
    y = x.double() @ reference_weight(layer, fmt, group_size).double().T
    return y + layer.bias.double() if layer.bias is not None else y


@pytest.fixture(params=[False, True], ids=["dense-float32", "dense-bfloat16"])
def dense_bfloat16(request, monkeypatch) -> bool:
    """Both choices of quant.dense_bfloat16() (measured per machine) for products past kernel_max_rows."""
    monkeypatch.setattr(quant, "_dense_bfloat16", request.param)
    return request.param


def dense_reference(x: torch.Tensor, layer: nn.Linear, fmt: str, bfloat16: bool,
                    group_size: int = 64) -> tuple[torch.Tensor, float]:
    """The reference and tolerance of a dense product past kernel_max_rows: float32, or the activations
    rounded to bfloat16 (and the weights' and product's rounding: DENSE_BF16_TOL) where dense products
    run in bfloat16."""
    if bfloat16:
        return reference(x.bfloat16().float(), layer, fmt, group_size), DENSE_BF16_TOL
    return reference(x, layer, fmt, group_size), FLOAT_TOL


def rel_max(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.double() - ref).abs().max() / ref.abs().max()).item()


def rel_fro(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --- quantization itself -----------------------------------------------------------------------------


def test_int8_is_symmetric_per_channel_and_within_half_a_step():
    w = weight(48, 96)
    w[3] = 0.0  # an all-zero channel quantizes to zeros, not NaN
    q, scales = quantize_int8(w)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and scales.shape == (48,)
    assert int(q.abs().max()) <= 127
    error = (dequantize_int8(q, scales) - w).abs()
    assert bool((error <= scales.float()[:, None] * 0.5 * (1 + 1e-2)).all())
    assert not bool(q[3].any())


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
def test_int4_is_asymmetric_per_group_and_within_half_a_step(group_size):
    w = weight(32, 256) + 0.3  # off-centre groups: the zero point matters
    q, scales, zeros = quantize_int4(w, group_size)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and q.shape == (32, 256)
    assert scales.shape == zeros.shape == (32, 256 // group_size)
    step = scales.float().repeat_interleave(group_size, dim=1)
    error = (dequantize_int4(q, scales, zeros) - w).abs()
    assert bool((error <= step * 0.5 * (1 + 2e-2)).all())


def test_int4_pads_inputs_to_whole_groups():
    w = weight(16, 80)
    q, scales, zeros = quantize_int4(w, 64)
    assert q.shape == (16, 128) and scales.shape == (16, 2)
    assert dequantize_int4(q, scales, zeros, 80).shape == (16, 80)


def test_non_finite_weights_are_refused():
    w = weight(16, 64)
    w[1, 2] = math.nan
    with pytest.raises(ValueError, match="NaN"):
        quantize_int8(w)
    with pytest.raises(ValueError, match="NaN"):
        quantize_int4(w, 32)


@pytest.mark.parametrize(("fmt", "group_size"), [("int3", 64), ("int4", 16), ("int4", 256), ("INT8", 64)])
def test_unknown_formats_and_group_sizes_are_refused(fmt, group_size):
    with pytest.raises(ValueError):
        quant.check_quant(fmt, group_size)
    with pytest.raises(ValueError):
        load_span(DEMO_MODEL_DIR, 0, 1, quant=fmt, group_size=group_size)


# --- the int4 layouts --------------------------------------------------------------------------------


@pytest.mark.skipif(not int4_pack.kernel_available(), reason="this torch has no int4 CPU kernel")
def test_the_kernel_layout_is_known_and_read_back_exactly():
    layout = int4_pack.kernel_layout()
    assert layout is not None, "torch packs int4 weights in a layout int4_pack does not know"
    block = int4_pack.BLOCK_ROWS[layout]
    for rows in (16, 48, 64, 80, 176):
        values = torch.randint(0, 16, (rows, 96), generator=torch.Generator().manual_seed(rows))
        packed = int4_pack.pack_for_kernel(values)
        assert torch.equal(int4_pack.unpack_columns(packed, layout, 0, rows, 96).T, values.to(torch.uint8))
        for start in range(0, rows, block):  # chunk by chunk, as the dense path reads it
            end = min(start + block, rows)
            part = int4_pack.unpack_columns(packed, layout, start, end, 96, out=torch.empty(96, end - start))
            assert torch.equal(part.T, values[start:end].float())


def test_the_plain_layout_round_trips():
    values = torch.randint(0, 16, (7, 10), generator=torch.Generator().manual_seed(0))
    assert torch.equal(int4_pack.unpack_plain(int4_pack.pack_plain(values)), values.to(torch.uint8))


# --- quantized linears against their dequantized reference --------------------------------------------

# (out, in): shapes the kernels take, and shapes they reject
KERNEL_SHAPES = [(64, 64), (48, 128), (80, 192), (256, 512)]
REJECTED = {
    "int8": [(32, 24), (64, 40), (10, 200)],  # inputs not a multiple of 16
    "int4": [(40, 64), (24, 128), (64, 96), (33, 200)],  # outputs not a multiple of 16, inputs of the group
}


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize(("rows", "cols"), KERNEL_SHAPES)
def test_kernel_shapes_match_the_dequantized_reference(fmt, rows, cols, dense_bfloat16):
    layer = linear(rows, cols)
    module = quantized(layer, fmt)
    assert module.uses_kernel
    for batch in (1, 3, module.kernel_max_rows):  # the kernel's rows
        x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
        # float32 activations: torch's exact (scalar) kernel code, which checks our packing and scales
        exact = module.kernel_matmul(x, torch.float32) + layer.bias
        assert rel_max(exact, reference(x, layer, fmt)) < FLOAT_TOL
        # what forward runs: ours (activations rounded to int8 blocks), or torch's vectorised code on
        # bfloat16 activations
        if module.uses_ours and batch <= module.ours_max_rows():
            assert rel_max(module(x), reference(x, layer, fmt)) < OURS_TOL
        else:
            assert rel_max(module(x), reference(x.bfloat16().float(), layer, fmt)) < BF16_TOL
    x = torch.randn(module.kernel_max_rows + 1, cols)  # more rows: dequantized chunks, a dense product
    want, tol = dense_reference(x, layer, fmt, dense_bfloat16)
    assert module(x).dtype == torch.float32
    assert rel_max(module(x), want) < tol
    assert rel_max(module(x.view(1, *x.shape)), want) < tol  # any leading dims
    assert rel_max(module.dense_matmul(x) + layer.bias, reference(x, layer, fmt)) < FLOAT_TOL  # float32 itself


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_rejected_shapes_take_the_dense_path(fmt, monkeypatch):
    monkeypatch.setenv(kernels.ENV, "off")  # torch's kernels, as where ours are not built

    def no_kernel(*args: object) -> None:
        raise AssertionError("the kernel must not run on a shape it rejects")

    for rows, cols in REJECTED[fmt]:
        layer = linear(rows, cols, bias=rows % 2 == 0)
        module = quantized(layer, fmt)
        assert not module.uses_kernel
        monkeypatch.setattr(module, "kernel_matmul", no_kernel)
        for batch in (1, 5, 40):
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            assert rel_max(module(x), reference(x, layer, fmt)) < FLOAT_TOL, (rows, cols, batch)


@pytest.mark.skipif(not kernels.available(), reason="our kernels are not built here")
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_our_kernels_take_the_shapes_torchs_reject(fmt):
    for rows, cols in REJECTED[fmt]:
        layer = linear(rows, cols, bias=rows % 2 == 0)
        module = quantized(layer, fmt)
        assert module.uses_ours
        for batch in (1, 5, 8):
            x = torch.randn(batch, cols, generator=torch.Generator().manual_seed(batch))
            assert rel_max(module(x), reference(x, layer, fmt)) < OURS_TOL, (rows, cols, batch)


@pytest.mark.parametrize("group_size", INT4_GROUP_SIZES)
def test_every_group_size_matches_its_reference(group_size, dense_bfloat16):
    layer = linear(64, 256)
    module = QuantizedLinearInt4.from_linear(layer, group_size)
    assert module.uses_kernel and module.group_size == group_size
    x = torch.randn(1, 256)
    assert rel_max(module.kernel_matmul(x, torch.float32) + layer.bias, reference(x, layer, "int4", group_size)) \
        < FLOAT_TOL
    x = torch.randn(module.kernel_max_rows + 1, 256)
    want, tol = dense_reference(x, layer, "int4", dense_bfloat16, group_size)
    assert rel_max(module(x), want) < tol


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_large_weights_are_dequantized_in_chunks(fmt, monkeypatch, dense_bfloat16):
    monkeypatch.setattr(quant, "_DEQUANT_CHUNK_BYTES", 64 * 4 * 64)  # 64 rows of 64 float32 inputs
    layer = linear(16 * 64 + 80, 64)  # 16 whole chunks and a partial one (80 rows: a partial 64-row block)
    module = quantized(layer, fmt)
    assert module._chunk_rows() == 64
    x = torch.randn(module.kernel_max_rows + 1, 64)
    want, tol = dense_reference(x, layer, fmt, dense_bfloat16)
    assert rel_max(module(x), want) < tol


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("choice", [False, True])
def test_prefill_rows_take_the_dense_product_in_the_dtype_chosen(fmt, choice, monkeypatch):
    layer = linear(64, 128)
    module = quantized(layer, fmt)
    monkeypatch.setattr(quant, "_dense_bfloat16", choice)
    seen = []
    dense = module.dense_matmul
    monkeypatch.setattr(module, "dense_matmul", lambda x: seen.append(x.dtype) or dense(x))
    module(torch.randn(module.kernel_rows(), 128))  # a kernel's rows (ours, or torch's)
    assert seen == []
    y = module(torch.randn(module.kernel_rows() + 1, 128))
    assert seen == [torch.bfloat16 if choice else torch.float32] and y.dtype == torch.float32


def test_the_dense_dtype_is_measured_once_per_process(monkeypatch):
    calls = []
    monkeypatch.setattr(quant, "_dense_bfloat16", None)
    monkeypatch.setattr(quant, "_bfloat16_products_are_faster", lambda: calls.append(1) or False)
    assert not quant.dense_bfloat16() and not quant.dense_bfloat16()
    assert calls == [1]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_activations(fmt, dtype):
    layer = linear(64, 128).to(dtype)
    module = quantized(layer, fmt)
    assert module.bias.dtype == dtype
    for batch in (1, 200):  # the kernel, then the dense path
        x = torch.randn(batch, 128).to(dtype)
        y = module(x)
        assert y.dtype == dtype and y.shape == (batch, 64)
        # half-precision products and sums: their own rounding on top of the bfloat16 kernel's
        assert rel_max(y, reference(x.float(), layer.float(), fmt)) < 2e-2


@pytest.mark.parametrize("ours", [False, True], ids=["torch", "ours"])
def test_a_misaligned_view_is_fed_to_the_int8_kernel_safely(ours, monkeypatch):
    if not ours:
        monkeypatch.setenv(kernels.ENV, "off")
    elif not kernels.available():
        pytest.skip("our kernels are not built here")
    layer = linear(32, 64)
    module = QuantizedLinearInt8.from_linear(layer)
    flat = torch.randn(64 + 1).bfloat16()
    x = flat[1:].view(1, 64)  # 2 bytes past an aligned address: torch's kernel would crash on it
    assert rel_max(module(x).float(), reference(x.float(), layer, "int8")) < (OURS_TOL if ours else BF16_TOL)


# --- experts and blocks ------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_experts_match_experts_with_dequantized_weights(fmt, dense_bfloat16):
    experts = Experts(4, 64, 32)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(4, 64, 64, generator=gen) / 8)
        experts.down_proj.copy_(torch.randn(4, 64, 32, generator=gen) / 6)
    q = QuantizedExperts.from_experts(experts, fmt, 32)
    dequantized = Experts(4, 64, 32)
    with torch.no_grad():
        dequantized.gate_up_proj.copy_(torch.stack([m.dequantized_weight() for m in q.gate_up]))
        dequantized.down_proj.copy_(torch.stack([m.dequantized_weight() for m in q.down]))
    x = torch.randn(6, 64, generator=gen)
    weights = torch.rand(6, 2, generator=gen)
    indices = torch.tensor([[0, 1], [1, 2], [3, 0], [0, 2], [1, 3], [2, 0]])
    # 6 rows: our kernels (every expert's first projections in one call, then the down ones), else
    # torch's on bfloat16 activations; twice in a row
    tol = 2 * (OURS_TOL if kernels.available() else BF16_TOL)
    assert rel_max(q(x, weights, indices), dequantized(x, weights, indices).double()) < tol
    x = torch.randn(4 * (q.gate_up[0].kernel_max_rows + 1), 64, generator=gen)
    weights = torch.rand(len(x), 1, generator=gen)
    indices = torch.arange(len(x))[:, None] % 4
    # more rows per expert: the dense products, in float32 or (where the CPU is fast at it) bfloat16
    want = dequantized(x.bfloat16().float() if dense_bfloat16 else x, weights, indices).double()
    assert rel_max(q(x, weights, indices), want) < (2 * DENSE_BF16_TOL if dense_bfloat16 else FLOAT_TOL)


def _dense(family: str) -> Callable[[Path], Path]:
    from tests.helpers.checkpoints import make_checkpoint

    return lambda path: make_checkpoint(path, family)


def _moe(family: str) -> Callable[[Path], Path]:
    from tests.helpers.moe_checkpoints import make_moe_checkpoint

    return lambda path: make_moe_checkpoint(path, family)


def _gpt_oss(path: Path) -> Path:
    from tests.helpers.gpt_oss_checkpoints import make_gpt_oss_checkpoint

    return make_gpt_oss_checkpoint(path)


def _deepseek(variant: str) -> Callable[[Path], Path]:
    def make(path: Path) -> Path:
        from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint

        return make_deepseek_checkpoint(path, variant)

    return make


# a tiny checkpoint for every supported model_type but BitNet (its loader refuses --quant: its weights are
# ternary already; tests/unit/test_model_bitnet.py): a new family without one fails here
MAKERS: dict[str, Callable[[Path], Path]] = {
    "llama": _dense("llama3"), "mistral": _dense("mistral"), "qwen2": _dense("qwen2"), "qwen3": _dense("qwen3"),
    "qwen3_moe": _moe("qwen3_moe"), "qwen2_moe": _moe("qwen2_moe"), "mixtral": _moe("mixtral"),
    "gpt_oss": _gpt_oss, "deepseek_v3": _deepseek("deepseek_v3"), "kimi_k2": _deepseek("kimi_k2"),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """family -> a tiny random checkpoint of it, written on first use."""
    made: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in made:
            made[family] = MAKERS[family](tmp_path_factory.mktemp(family))
        return made[family]

    return get


def with_dequantized_weights(path: Path, span: BlockSpan) -> BlockSpan:
    """The float span of ``path`` whose quantized layers hold what ``span``'s quantized ones dequantize to."""
    twin = load_span(path, span.start, span.end)
    inside_experts = [f"{name}." for name, m in span.named_modules() if isinstance(m, QuantizedExperts)]
    with torch.no_grad():
        for name, module in span.named_modules():
            if any(name.startswith(prefix) for prefix in inside_experts):
                continue
            if isinstance(module, QuantizedExperts):
                experts = twin.get_submodule(name)
                experts.gate_up_proj.copy_(torch.stack([m.dequantized_weight() for m in module.gate_up]))
                experts.down_proj.copy_(torch.stack([m.dequantized_weight() for m in module.down]))
            elif isinstance(module, (QuantizedLinearInt8, QuantizedLinearInt4)):
                twin.get_submodule(name).weight.copy_(module.dequantized_weight())
    return twin


def run(span: BlockSpan, seed: int = 0) -> list[torch.Tensor]:
    """A 12-token prefill (dense path) and three decoding steps (kernels) at batch 2, as rows."""
    gen = torch.Generator().manual_seed(seed)
    hidden = span.config.hidden_size
    cache = span.new_cache(2, 16)
    inputs = [torch.randn(2, 12, hidden, generator=gen)] + [torch.randn(2, 1, hidden, generator=gen) for _ in range(3)]
    return [span(x, cache).reshape(-1, hidden) for x in inputs]


def row_errors(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    return (got - want).norm(dim=-1) / want.norm(dim=-1)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"bitnet"}))  # BitNet's weights are ternary already
def test_a_block_of_every_family_runs_quantized(family, fmt, checkpoints, monkeypatch):
    path = checkpoints(family)
    config = ModelConfig.from_dir(path)
    span = load_span(path, 0, config.num_hidden_layers, quant=fmt, group_size=32)
    for name, module in span.named_modules():
        last = name.rsplit(".", 1)[-1]
        assert not isinstance(module, nn.Linear) or last in quant.UNQUANTIZED_NAMES, f"{name} left in float"
        assert type(module) is not Experts, f"{name} left in float"
    assert any(isinstance(m, (QuantizedLinearInt8, QuantizedLinearInt4)) for m in span.modules())
    if family == "gpt_oss":  # its interleaved, biased experts keep the model dtype
        assert any(isinstance(m, GptOssExperts) for m in span.modules())
    elif config.moe is not None:
        assert any(isinstance(m, QuantizedExperts) for m in span.modules())
    twin = run(with_dequantized_weights(path, span))

    # with the kernels, as a node runs: bfloat16 activations (these random checkpoints' peaked attention
    # amplifies their rounding to a median row error of 1-3%); in MoE blocks a row whose router choice
    # flips under that rounding differs wholly, so only the median holds there
    errors = torch.cat([row_errors(got, want) for got, want in zip(run(span), twin, strict=True)])
    assert bool(torch.isfinite(errors).all())
    assert errors.median() < 0.05, (family, fmt, errors.median().item())
    if config.moe is None:
        assert errors.max() < 0.08, (family, fmt, errors.max().item())

    # every product dense and float32: the same computation as the float block with those weights
    monkeypatch.setattr(quant, "_dense_bfloat16", False)
    monkeypatch.setattr(QuantizedLinearInt8, "kernel_max_rows", 0)
    monkeypatch.setattr(QuantizedLinearInt4, "kernel_max_rows", 0)
    for got, want in zip(run(span), twin, strict=True):
        assert rel_max(got, want.double()) < FLOAT_TOL


@pytest.mark.parametrize(("fmt", "group_size", "tolerance"),
                         [("int8", 64, 0.01), ("int4", 32, 0.08), ("int4", 64, 0.08), ("int4", 128, 0.08)])
def test_the_demo_models_quantized_blocks_stay_close_to_float(fmt, group_size, tolerance):
    # a trained model: each block's update (output minus input) within 1% (int8) or 8% (int4) of the
    # float block's; measured 0.3% and 3-5%
    head = load_head(DEMO_MODEL_DIR)
    # 2 x 100 rows: past both kernels' rows, so the prefill takes the dense product (in bfloat16 where
    # this machine's CPU is fast at it)
    ids = torch.randint(0, head.config.vocab_size, (2, 100), generator=torch.Generator().manual_seed(0))
    x = head.embed(ids)
    for layer in range(head.config.num_hidden_layers):
        exact = load_span(DEMO_MODEL_DIR, layer, layer + 1)
        span = load_span(DEMO_MODEL_DIR, layer, layer + 1, quant=fmt, group_size=group_size)
        for rows in (x, x[:, -1:]):  # a prefill and one decoding step
            want = exact(rows)
            assert rel_fro(span(rows) - rows, want - rows) < tolerance, (layer, rows.shape)
        x = exact(x)


# --- bytes -------------------------------------------------------------------------------------------


def nbytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


@pytest.mark.parametrize(("fmt", "group_size", "ratio"),
                         [("int8", 64, 0.27), ("int4", 32, 0.16), ("int4", 64, 0.16), ("int4", 128, 0.16)])
def test_quantized_blocks_take_their_share_of_float32_bytes(fmt, group_size, ratio):
    config = ModelConfig.from_dir(DEMO_MODEL_DIR)
    for layer in range(config.num_hidden_layers):
        float_bytes = nbytes(load_span(DEMO_MODEL_DIR, layer, layer + 1))
        span = load_span(DEMO_MODEL_DIR, layer, layer + 1, quant=fmt, group_size=group_size)
        assert nbytes(span) <= ratio * float_bytes
        assert nbytes(span) == span_weight_bytes(config, layer, layer + 1, torch.float32, fmt, group_size)


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral", "deepseek_v3"])
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_span_weight_bytes_counts_quantized_bytes(family, fmt, checkpoints):
    path = checkpoints(family)
    config = ModelConfig.from_dir(path)
    span = load_span(path, 0, config.num_hidden_layers, quant=fmt, group_size=32)
    params = sum(p.numel() * p.element_size() for p in span.parameters())
    buffers = sum(b.numel() * b.element_size() for m in span.modules()
                  if isinstance(m, (QuantizedLinearInt8, QuantizedLinearInt4)) for b in m.buffers())
    assert params + buffers == span_weight_bytes(config, 0, config.num_hidden_layers, torch.float32, fmt, 32)


def test_quantize_block_with_none_changes_nothing():
    block = nn.Sequential(nn.Linear(16, 16))
    assert quantize_block(block, "none") is block and isinstance(block[0], nn.Linear)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps")
def test_no_span_keeps_the_checkpoint_file_mapped():
    # a mapped file has every weight page read through it counted as the node's memory, beside the
    # copies that conversion, fusion or quantization make: spans read into memory of their own
    def mapped() -> int:
        return sum("model.safetensors" in line for line in Path("/proc/self/maps").read_text().splitlines())

    gc.collect()
    before = mapped()  # transformers' reference models, loaded by other tests, may map the file
    exact = load_span(DEMO_MODEL_DIR, 0, 2)
    assert mapped() == before
    span = load_span(DEMO_MODEL_DIR, 0, 2, quant="int8")
    assert mapped() == before
    for loaded in (exact, span):
        assert loaded(torch.randn(1, 3, span.config.hidden_size)).shape == (1, 3, span.config.hidden_size)
