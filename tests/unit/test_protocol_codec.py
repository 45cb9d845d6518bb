"""Tensor codec: bit-exact lossless path, measured error of each compression, strict decoding."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable

import pytest
import torch

from homeswarm.protocol import (
    CodecError,
    deserialize_tensor,
    node_pb2,
    parse_compression,
    serialize_tensor,
)

HIDDEN = 4096
_INT_VIEW = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern, so that NaN == NaN and -0.0 != 0.0 in comparisons."""
    return tensor.view(_INT_VIEW[tensor.dtype]) if tensor.dtype in _INT_VIEW else tensor


def _assert_bit_exact(decoded: torch.Tensor, original: torch.Tensor) -> None:
    assert decoded.dtype == original.dtype
    assert decoded.shape == original.shape
    assert torch.equal(_bits(decoded.contiguous()), _bits(original.contiguous()))


def _wire_round_trip(message: node_pb2.Tensor) -> node_pb2.Tensor:
    return node_pb2.Tensor.FromString(message.SerializeToString())


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    if dtype == torch.int64:
        return torch.randint(-(2**62), 2**62, shape, generator=generator, dtype=torch.int64)
    values = torch.randn(shape, generator=generator).to(dtype)
    flat = values.view(-1)
    specials = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0], dtype=dtype)
    count = min(flat.numel(), specials.numel())
    flat[:count] = specials[:count]
    return values


def _hidden_states(seed: int = 0, tokens: int = 4) -> torch.Tensor:
    return torch.randn(1, tokens, HIDDEN, generator=torch.Generator().manual_seed(seed))


def _relative_error(decoded: torch.Tensor, original: torch.Tensor) -> float:
    return ((decoded.float() - original.float()).norm() / original.float().norm()).item()


# --- lossless -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int64])
@pytest.mark.parametrize("shape", [(), (0,), (3, 0, 7), (1, 1, HIDDEN), (2, 3, 5)])
def test_none_is_bit_exact(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    original = _sample(dtype, shape)
    message = serialize_tensor(original)
    assert message.compression == node_pb2.NONE
    assert list(message.shape) == list(shape)
    assert len(message.buffer) == original.numel() * original.element_size()
    _assert_bit_exact(deserialize_tensor(_wire_round_trip(message)), original)


def test_none_keeps_nan_inf_and_negative_zero() -> None:
    original = torch.tensor([math.nan, math.inf, -math.inf, -0.0, 0.0, 1e-45])
    decoded = deserialize_tensor(serialize_tensor(original))
    assert torch.equal(decoded.view(torch.int32), original.view(torch.int32))
    assert math.copysign(1.0, decoded[3].item()) == -1.0


def test_dtype_names_on_the_wire() -> None:
    names = {d: serialize_tensor(torch.zeros(2, dtype=d)).dtype for d in _INT_VIEW}
    assert names == {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}
    assert serialize_tensor(torch.zeros(2, dtype=torch.int64)).dtype == "int64"


def test_wire_bytes_are_little_endian() -> None:
    message = serialize_tensor(torch.tensor([1.0, -2.0], dtype=torch.float32))
    assert message.buffer == b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    message = serialize_tensor(torch.tensor([1.0], dtype=torch.bfloat16))
    assert message.buffer == b"\x80\x3f"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
@pytest.mark.parametrize(
    "make_view",
    [
        lambda t: t.transpose(0, 2),
        lambda t: t[:, ::2, 1:],
        lambda t: t[..., :1].expand(4, 6, 5),  # stride 0
        lambda t: t.permute(2, 0, 1)[1],
    ],
    ids=["transpose", "strided-slice", "expand", "permute-index"],
)
def test_none_handles_non_contiguous(dtype: torch.dtype, make_view: Callable[..., torch.Tensor]) -> None:
    view = make_view(_sample(dtype, (4, 6, 5), seed=1))
    assert not view.is_contiguous()
    decoded = deserialize_tensor(serialize_tensor(view))
    assert decoded.is_contiguous()
    _assert_bit_exact(decoded, view)


def test_decoded_tensor_is_writable_and_does_not_alias_the_message() -> None:
    original = torch.arange(6, dtype=torch.float32).view(2, 3)
    message = serialize_tensor(original)
    decoded = deserialize_tensor(message)
    decoded += 1  # must not raise nor touch the message's bytes
    assert torch.equal(deserialize_tensor(message), original)


def test_serialize_detaches_and_ignores_autograd() -> None:
    original = torch.randn(2, 3, requires_grad=True)
    decoded = deserialize_tensor(serialize_tensor(original * 2))
    assert not decoded.requires_grad
    assert torch.equal(decoded, original.detach() * 2)


def test_device_argument() -> None:
    message = serialize_tensor(torch.ones(2, 2))
    assert deserialize_tensor(message, device=torch.device("cpu")).device.type == "cpu"
    on_meta = deserialize_tensor(message, device="meta")
    assert on_meta.device.type == "meta" and on_meta.shape == (2, 2)


def test_lossless_hot_path_is_fast() -> None:
    # The budget is well under 100 us per round trip for one decoding step's hidden state; 16 us
    # measured with one core kept busy by another process. 1 ms leaves room for a busy shared machine.
    hidden = torch.randn(1, 1, HIDDEN)
    timings = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(50):
            deserialize_tensor(_wire_round_trip(serialize_tensor(hidden)))
        timings.append((time.perf_counter() - start) / 50)
    assert statistics.median(timings) < 1e-3


# --- compression ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("compression", "max_error", "payload_ratio"),
    [
        (node_pb2.FLOAT16, 5e-4, 0.5),
        (node_pb2.BFLOAT16, 3e-3, 0.5),
        (node_pb2.INT8_BLOCKWISE, 1e-2, (HIDDEN + 4 * HIDDEN / 64) / (4 * HIDDEN)),
    ],
    ids=["float16", "bfloat16", "int8"],
)
def test_compression_error_and_size(compression: int, max_error: float, payload_ratio: float) -> None:
    hidden = _hidden_states(seed=2)
    message = _wire_round_trip(serialize_tensor(hidden, compression))
    decoded = deserialize_tensor(message)
    assert decoded.dtype == torch.float32 and decoded.shape == hidden.shape
    error = _relative_error(decoded, hidden)
    # Measured on randn: float16 2.0e-4, bfloat16 1.7e-3, int8 5.8e-3. Above 0: it did compress.
    assert 0 < error < max_error
    payload = len(message.buffer) + len(message.scales)
    assert payload == pytest.approx(payload_ratio * 4 * hidden.numel())
    # The whole message shrinks the same way: field headers are a few bytes.
    assert message.ByteSize() <= payload_ratio * serialize_tensor(hidden).ByteSize() + 32


@pytest.mark.parametrize("compression", [node_pb2.FLOAT16, node_pb2.BFLOAT16, node_pb2.INT8_BLOCKWISE])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_compression_returns_the_original_dtype(compression: int, dtype: torch.dtype) -> None:
    hidden = _hidden_states(seed=3, tokens=1).to(dtype)
    message = serialize_tensor(hidden, compression)
    assert message.dtype == str(dtype).removeprefix("torch.")
    decoded = deserialize_tensor(message)
    assert decoded.dtype == dtype and decoded.shape == hidden.shape
    assert _relative_error(decoded, hidden) < 1e-2


def test_cast_compression_of_own_dtype_is_exact() -> None:
    hidden = _hidden_states(seed=4, tokens=1).to(torch.bfloat16)
    _assert_bit_exact(deserialize_tensor(serialize_tensor(hidden, node_pb2.BFLOAT16)), hidden)


@pytest.mark.parametrize(("numel", "block_size"), [(1000, 64), (64, 64), (5, 64), (37, 1), (130, 7), (0, 64)])
def test_int8_error_is_within_half_a_step_per_block(numel: int, block_size: int) -> None:
    values = torch.randn(numel, generator=torch.Generator().manual_seed(5)) * 3
    message = serialize_tensor(values, node_pb2.INT8_BLOCKWISE, block_size=block_size)
    num_blocks = -(-numel // block_size)
    assert message.block_size == block_size
    assert len(message.buffer) == numel
    assert len(message.scales) == 4 * num_blocks
    decoded = deserialize_tensor(message)
    assert decoded.shape == (numel,)
    padded = torch.nn.functional.pad(values, (0, num_blocks * block_size - numel))
    scales = padded.view(num_blocks, block_size).abs().amax(dim=1) / 127
    step = scales.repeat_interleave(block_size)[:numel]
    assert bool(((decoded - values).abs() <= step / 2 + 1e-6).all())


def test_int8_outliers_only_cost_their_own_block() -> None:
    hidden = _hidden_states(seed=6)
    outlier_channels = [7, 1000, 3001]  # LLM activations have a few huge channels
    hidden[..., outlier_channels] = 300.0
    in_outlier_block = torch.zeros(HIDDEN, dtype=torch.bool)
    for channel in outlier_channels:
        in_outlier_block[channel // 64 * 64 : channel // 64 * 64 + 64] = True
    normal = hidden[..., ~in_outlier_block]

    blockwise = deserialize_tensor(serialize_tensor(hidden, node_pb2.INT8_BLOCKWISE))
    one_scale = deserialize_tensor(
        serialize_tensor(hidden, node_pb2.INT8_BLOCKWISE, block_size=hidden.numel())
    )
    assert _relative_error(blockwise, hidden) < 2e-2
    # Away from the outliers' blocks, blockwise keeps randn precision (measured 5.8e-3)...
    assert _relative_error(blockwise[..., ~in_outlier_block], normal) < 1e-2
    # ...where a single scale rounds most normal values to zero (relative error near 1).
    assert _relative_error(one_scale[..., ~in_outlier_block], normal) > 0.5


def test_int8_exact_on_grid_and_zero_blocks() -> None:
    grid = torch.arange(-127, 128, dtype=torch.float32) * 0.5  # absmax 63.5 = 127 steps of 0.5
    _assert_bit_exact(deserialize_tensor(serialize_tensor(grid, node_pb2.INT8_BLOCKWISE, block_size=255)), grid)
    zeros = torch.zeros(3, 100)
    message = serialize_tensor(zeros, node_pb2.INT8_BLOCKWISE)
    assert message.scales == bytes(4 * 5)
    _assert_bit_exact(deserialize_tensor(message), zeros)


# --- serialize-side errors and names --------------------------------------------------------------


def test_serialize_rejects_bad_arguments() -> None:
    with pytest.raises(TypeError, match="float64"):
        serialize_tensor(torch.zeros(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="unknown compression"):
        serialize_tensor(torch.zeros(2), 9)
    with pytest.raises(ValueError, match="int64"):
        serialize_tensor(torch.zeros(2, dtype=torch.int64), node_pb2.FLOAT16)
    with pytest.raises(ValueError, match="block_size"):
        serialize_tensor(torch.zeros(2), node_pb2.INT8_BLOCKWISE, block_size=0)
    with pytest.raises(ValueError, match="non-finite"):
        serialize_tensor(torch.tensor([1.0, math.inf]), node_pb2.INT8_BLOCKWISE)


def test_parse_compression() -> None:
    assert parse_compression("none") == node_pb2.NONE
    assert parse_compression("float16") == node_pb2.FLOAT16
    assert parse_compression("bfloat16") == node_pb2.BFLOAT16
    assert parse_compression("int8") == node_pb2.INT8_BLOCKWISE
    assert parse_compression(" BFloat16 ") == node_pb2.BFLOAT16
    for bad in ("", "fp16", "int4", "int8_blockwise"):
        with pytest.raises(ValueError, match="unknown compression"):
            parse_compression(bad)


# --- malformed messages ---------------------------------------------------------------------------


def _valid(compression: int = node_pb2.NONE, numel: int = 100) -> node_pb2.Tensor:
    return serialize_tensor(torch.randn(numel), compression)


def _with(message: node_pb2.Tensor, **fields: object) -> node_pb2.Tensor:
    changed = node_pb2.Tensor()
    changed.CopyFrom(message)
    for name, value in fields.items():
        if name == "shape":
            del changed.shape[:]
            changed.shape.extend(value)  # type: ignore[arg-type]
        else:
            setattr(changed, name, value)
    return changed


_INT8 = node_pb2.INT8_BLOCKWISE
_MALFORMED: dict[str, Callable[[], node_pb2.Tensor]] = {
    "unknown-dtype": lambda: _with(_valid(), dtype="float64"),
    "empty-dtype": lambda: _with(_valid(), dtype=""),
    "unknown-compression": lambda: _with(_valid(), compression=7),
    "buffer-short": lambda: _with(_valid(), buffer=_valid().buffer[:-1]),
    "buffer-long": lambda: _with(_valid(), buffer=_valid().buffer + b"\0\0\0\0"),
    "shape-mismatch": lambda: _with(_valid(), shape=[10, 11]),
    "negative-dim": lambda: _with(_valid(), shape=[-1, -100]),
    "too-many-dims": lambda: _with(_valid(), shape=[1] * 9 + [100]),
    "huge-shape": lambda: _with(_valid(), shape=[2**62, 2**62, 1]),
    "float16-buffer-as-float32": lambda: _with(_valid(node_pb2.FLOAT16), compression=node_pb2.NONE),
    "float32-buffer-as-bfloat16": lambda: _with(_valid(), compression=node_pb2.BFLOAT16),
    "scales-without-int8": lambda: _with(_valid(), scales=b"\0\0\0\0"),
    "block-size-without-int8": lambda: _with(_valid(node_pb2.FLOAT16), block_size=64),
    "lossy-int64": lambda: _with(serialize_tensor(torch.arange(4)), compression=node_pb2.FLOAT16, buffer=bytes(8)),
    "int8-no-block-size": lambda: _with(_valid(_INT8), block_size=0),
    "int8-buffer-short": lambda: _with(_valid(_INT8), buffer=bytes(99)),
    "int8-scales-short": lambda: _with(_valid(_INT8), scales=_valid(_INT8).scales[:-4]),
    "int8-scales-ragged": lambda: _with(_valid(_INT8), scales=_valid(_INT8).scales + b"\0"),
    "int8-block-size-changed": lambda: _with(_valid(_INT8), block_size=32),
    "int8-nan-scale": lambda: _with(_valid(_INT8), scales=torch.tensor([1.0, math.nan]).numpy().tobytes()),
    "int8-inf-scale": lambda: _with(_valid(_INT8), scales=torch.tensor([math.inf, 1.0]).numpy().tobytes()),
    "int8-negative-scale": lambda: _with(_valid(_INT8), scales=torch.tensor([1.0, -1.0]).numpy().tobytes()),
}


@pytest.mark.parametrize("make_message", _MALFORMED.values(), ids=_MALFORMED.keys())
def test_malformed_messages_raise_codec_error(make_message: Callable[[], node_pb2.Tensor]) -> None:
    with pytest.raises(CodecError):
        deserialize_tensor(make_message())


def test_element_limit() -> None:
    message = serialize_tensor(torch.zeros(11))
    assert deserialize_tensor(message, max_elements=11).shape == (11,)
    with pytest.raises(CodecError, match="limit is 10"):
        deserialize_tensor(message, max_elements=10)


def test_int8_huge_block_size_is_harmless() -> None:
    # A peer picks block_size; a tiny tensor with a 2**32 - 1 block must not allocate the block.
    values = torch.randn(10)
    message = _with(serialize_tensor(values, _INT8), block_size=2**32 - 1)
    assert torch.allclose(deserialize_tensor(message), values, atol=0.02)


def test_codec_error_is_a_value_error() -> None:
    assert issubclass(CodecError, ValueError)
