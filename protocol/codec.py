"""Tensor codec: torch tensors to and from `node_pb2.Tensor`, lossless or compressed.

This is on the hot path of every decoding step (a hidden state per hop, both ways), so the
lossless path is a single copy each way through NumPy's buffer protocol.

Invariants:
- The wire is little-endian and C-ordered; `buffer` holds exactly the bytes that `shape`,
  `compression` and (for int8) the element count call for, nothing more.
- `dtype` names the tensor's dtype *before* compression; decoding always returns that dtype and
  `shape`, so compression is invisible to the caller except for the rounding error.
- NONE is bit-exact for every supported dtype (NaN payloads, -0.0 and infinities included).
- Lossy compressions apply to floating dtypes only: token ids are never rounded.
- INT8_BLOCKWISE: the flattened tensor is cut into blocks of `block_size` values (the last one
  may be short, as if zero-padded: `buffer` holds exactly numel int8 values, no padding); each
  block has one float32 scale = absmax / 127 in `scales`, and |x - decoded| <= scale / 2.
- Messages come from other peers and are untrusted: `deserialize_tensor` checks every field and
  raises `CodecError` (never an IndexError, a RuntimeError from torch or a huge allocation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from homeswarm.protocol import node_pb2

Compression = node_pb2.Compression

# A hidden state is [batch, tokens, hidden]; anything deeper than this is a malformed message,
# and the cap keeps torch from failing on absurd ranks with its own error type.
MAX_NDIM = 8
# The default cap on elements per decoded tensor: 2**28 float32 values is 1 GiB, far above any
# hidden state we send (a 8192-token prompt of width 8192 is 2**26), far below exhausting a PC.
DEFAULT_MAX_ELEMENTS = 1 << 28
DEFAULT_BLOCK_SIZE = 64
INT8_MAX = 127


class CodecError(ValueError):
    """A `node_pb2.Tensor` that cannot be decoded: malformed, inconsistent or too large."""


@dataclass(frozen=True)
class _DType:
    name: str
    torch_dtype: torch.dtype
    # How the bytes travel: a little-endian NumPy dtype of the same width. bfloat16 has no NumPy
    # dtype, so it travels as its raw 16-bit pattern and is reinterpreted by torch.
    wire: np.dtype
    floating: bool


_DTYPES: tuple[_DType, ...] = (
    _DType("float32", torch.float32, np.dtype("<f4"), True),
    _DType("float16", torch.float16, np.dtype("<f2"), True),
    _DType("bfloat16", torch.bfloat16, np.dtype("<i2"), True),
    _DType("int64", torch.int64, np.dtype("<i8"), False),
)
_BY_NAME: dict[str, _DType] = {d.name: d for d in _DTYPES}
_BY_TORCH: dict[torch.dtype, _DType] = {d.torch_dtype: d for d in _DTYPES}
# The dtype each cast compression puts on the wire.
_CAST: dict[int, _DType] = {node_pb2.FLOAT16: _BY_NAME["float16"], node_pb2.BFLOAT16: _BY_NAME["bfloat16"]}

_COMPRESSION_BY_NAME: dict[str, int] = {
    "none": node_pb2.NONE,
    "float16": node_pb2.FLOAT16,
    "bfloat16": node_pb2.BFLOAT16,
    "int8": node_pb2.INT8_BLOCKWISE,
}
_KNOWN_COMPRESSIONS = frozenset(_COMPRESSION_BY_NAME.values())


def parse_compression(name: str) -> int:
    """Map a CLI/config name ("none", "float16", "bfloat16", "int8"; any case) to the enum value."""
    try:
        return _COMPRESSION_BY_NAME[name.strip().lower()]
    except KeyError:
        choices = ", ".join(_COMPRESSION_BY_NAME)
        raise ValueError(f"unknown compression {name!r}; expected one of: {choices}") from None


def _to_wire_bytes(tensor: torch.Tensor, spec: _DType) -> bytes:
    """The tensor's data as little-endian C-ordered bytes; `tensor` must already have spec's dtype."""
    if spec.torch_dtype is torch.bfloat16:
        tensor = tensor.view(torch.int16)
    # astype(copy=False) is free on little-endian hosts and byte-swaps on big-endian ones.
    return tensor.numpy().astype(spec.wire, copy=False).tobytes()


def _from_wire_bytes(buffer: bytes, spec: _DType, count: int) -> torch.Tensor:
    """A fresh, writable, flat CPU tensor of `count` values of spec's dtype read from `buffer`."""
    # astype makes the one copy we need anyway: the message's bytes are immutable, and the
    # caller may write into the tensor it gets back.
    array = np.frombuffer(buffer, dtype=spec.wire, count=count).astype(spec.wire.newbyteorder("="))
    flat = torch.from_numpy(array)
    if spec.torch_dtype is torch.bfloat16:
        flat = flat.view(torch.bfloat16)
    return flat


def serialize_tensor(
    tensor: torch.Tensor,
    compression: int = node_pb2.NONE,
    *,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> node_pb2.Tensor:
    """Encode `tensor` (any device, any strides) as a `node_pb2.Tensor`.

    Raises TypeError for an unsupported dtype and ValueError for an unknown compression, a lossy
    compression of an integer tensor, a block_size < 1, or non-finite values under INT8_BLOCKWISE.
    """
    spec = _BY_TORCH.get(tensor.dtype)
    if spec is None:
        supported = ", ".join(_BY_NAME)
        raise TypeError(f"cannot serialize dtype {tensor.dtype}; supported: {supported}")
    if compression not in _KNOWN_COMPRESSIONS:
        raise ValueError(f"unknown compression {compression}")
    if compression != node_pb2.NONE and not spec.floating:
        raise ValueError(f"lossy compression {Compression.Name(compression)} of a {spec.name} tensor")

    # No .contiguous(): NumPy's tobytes() and torch's reshape already gather any strides (even
    # stride 0 from expand) in C order, so a copy here would only add a second one.
    data = tensor.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    shape = data.shape

    if compression == node_pb2.NONE:
        return node_pb2.Tensor(buffer=_to_wire_bytes(data, spec), shape=shape, dtype=spec.name)
    if compression in _CAST:
        wire = _CAST[compression]
        buffer = _to_wire_bytes(data.to(wire.torch_dtype), wire)
        return node_pb2.Tensor(buffer=buffer, shape=shape, dtype=spec.name, compression=compression)

    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    quantized, scales = _quantize_int8(data.reshape(-1), block_size)
    return node_pb2.Tensor(
        buffer=quantized.numpy().tobytes(),
        shape=shape,
        dtype=spec.name,
        compression=node_pb2.INT8_BLOCKWISE,
        scales=scales.numpy().astype("<f4", copy=False).tobytes(),
        block_size=block_size,
    )


def _quantize_int8(flat: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-block int8: returns (numel int8 values, one float32 scale per block)."""
    values = flat.to(torch.float32)
    absmax = _per_block(values, block_size, lambda block, rows: block.abs().amax(dim=-1))
    if not bool(torch.isfinite(absmax).all()):
        # An inf would make its block's scale inf and decode every value there as NaN or 0.
        raise ValueError("INT8_BLOCKWISE cannot encode non-finite values; send this tensor with NONE")
    scales = absmax / INT8_MAX
    # An all-zero block has scale 0: divide by 1 instead, its values quantize to 0 either way.
    divisor = torch.where(scales > 0, scales, torch.ones_like(scales))
    scaled = _per_block(values, block_size, lambda block, rows: block / divisor[rows].unsqueeze(-1)).numpy()
    # NumPy's rint, not torch.round: the latter took ~8 ms for 4096 values on torch 2.13 CPU
    # (about 1000x slower than rint); both round half to even. `scaled` is a fresh buffer.
    np.rint(scaled, out=scaled)
    np.clip(scaled, -INT8_MAX, INT8_MAX, out=scaled)
    return torch.from_numpy(scaled.astype(np.int8)), scales


def _per_block(
    values: torch.Tensor, block_size: int, fn: Callable[[torch.Tensor, slice], torch.Tensor]
) -> torch.Tensor:
    """Apply `fn(blocks, rows)` to the full [n, block_size] view of flat `values`, then to the short
    last block if any, and concatenate the flattened results; `rows` selects the blocks' indices.

    Never pads: padding would allocate up to block_size values, and a peer chooses block_size
    (up to 2**32 - 1), so a 1-value message could make us allocate 16 GiB.
    """
    full = values.numel() // block_size
    split = full * block_size
    result = fn(values[:split].view(full, block_size), slice(0, full)).reshape(-1)
    if values.numel() > split:
        tail = fn(values[split:].unsqueeze(0), slice(full, full + 1)).reshape(-1)
        result = torch.cat((result, tail))
    return result


def deserialize_tensor(
    message: node_pb2.Tensor,
    *,
    device: torch.device | str = "cpu",
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Decode `message` into a tensor of its original dtype and shape on `device`.

    Raises CodecError for any malformed message, or one with more than `max_elements` values.
    """
    spec = _BY_NAME.get(message.dtype)
    if spec is None:
        raise CodecError(f"unknown dtype {message.dtype!r}; supported: {', '.join(_BY_NAME)}")
    compression = message.compression
    if compression not in _KNOWN_COMPRESSIONS:
        raise CodecError(f"unknown compression {compression}")
    if compression != node_pb2.NONE and not spec.floating:
        raise CodecError(f"lossy compression {Compression.Name(compression)} of a {spec.name} tensor")
    shape = tuple(message.shape)
    if len(shape) > MAX_NDIM:
        raise CodecError(f"tensor has {len(shape)} dimensions, at most {MAX_NDIM} allowed")
    if any(dim < 0 for dim in shape):
        raise CodecError(f"negative dimension in shape {list(shape)}")
    # math.prod on Python ints cannot overflow, so a shape of huge dims is caught here, not in torch.
    count = math.prod(shape)
    if count > max_elements:
        raise CodecError(f"tensor of shape {list(shape)} has {count} elements, limit is {max_elements}")
    if compression != node_pb2.INT8_BLOCKWISE and (message.scales or message.block_size):
        raise CodecError("scales/block_size are only allowed with INT8_BLOCKWISE")

    if compression == node_pb2.INT8_BLOCKWISE:
        flat = _dequantize_int8(message, count)
        result = flat.view(shape).to(spec.torch_dtype)
    else:
        wire = _CAST.get(compression, spec)
        expected = count * wire.wire.itemsize
        if len(message.buffer) != expected:
            raise CodecError(
                f"buffer has {len(message.buffer)} bytes, shape {list(shape)} of {wire.name} "
                f"needs {expected}"
            )
        result = _from_wire_bytes(message.buffer, wire, count).view(shape)
        if wire is not spec:
            result = result.to(spec.torch_dtype)
    if torch.device(device).type != "cpu":
        result = result.to(device)
    return result


def _dequantize_int8(message: node_pb2.Tensor, count: int) -> torch.Tensor:
    """The flat float32 values of an INT8_BLOCKWISE message, after checking its sizes and scales."""
    block_size = message.block_size
    if block_size < 1:
        raise CodecError("INT8_BLOCKWISE message without a block_size")
    if len(message.buffer) != count:
        raise CodecError(f"buffer has {len(message.buffer)} bytes, {count} int8 values expected")
    num_blocks = -(-count // block_size)
    if len(message.scales) != 4 * num_blocks:
        raise CodecError(
            f"scales has {len(message.scales)} bytes, {num_blocks} float32 scales expected "
            f"({count} values in blocks of {block_size})"
        )
    int8 = np.dtype("i1")
    quantized = torch.from_numpy(np.frombuffer(message.buffer, dtype=int8).astype(np.float32))
    scales = torch.from_numpy(np.frombuffer(message.scales, dtype="<f4").astype(np.float32))
    # A negative, NaN or infinite scale can't come from our encoder and would poison the output.
    if not bool((torch.isfinite(scales) & (scales >= 0)).all()):
        raise CodecError("INT8_BLOCKWISE scales must be finite and non-negative")
    return _per_block(quantized, block_size, lambda block, rows: block * scales[rows].unsqueeze(-1))
