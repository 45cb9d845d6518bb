"""Forward and Backward with LoRA: a served adapter (``adapter``) and a client's own matrices (``lora``).

A client that trains its own LoRA for remote blocks sends the matrices of the request's blocks with
every Forward and Backward request (``LoraMatrices``); the node applies them on top of its weights (and
of a served adapter, when one is named), and Backward returns their gradients beside the inputs' and
the deep prompts'. Nothing is kept once the request is answered: volunteers hold no user state, and any
server of the same blocks answers the same. An inference session may carry matrices too (OpenSession.lora),
kept as an adapted view of the span for the session's life, so generation runs with the client's LoRA.

Checks, before any compute or decoding, beyond Forward's and Backward's own: at most ``MAX_PER_BLOCK``
entries per block, each for a block of the request and a projection the blocks have, rank in
1..``MAX_RANK``, declared shapes that fit the projection, a float dtype, ``MAX_ELEMENTS`` values in all
(INVALID_ARGUMENT); then
decoded values finite. An adapter the node does not serve: NOT_FOUND. A quantized node refuses Backward
(FAILED_PRECONDITION), as it does without LoRA.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import grpc
import torch

from homeswarm.model.lora import AdapterError, adapted_span
from homeswarm.model.lora_training import ClientMatrices, client_parts, lora_backward, lora_forward
from homeswarm.node import backward as backward_rpc
from homeswarm.node.backward import decode_prompts
from homeswarm.protocol import CodecError, deserialize_tensor, node_pb2

if TYPE_CHECKING:
    from homeswarm.model import BlockSpan
    from homeswarm.node.service import NodeService

MAX_PER_BLOCK = 32
MAX_RANK = 256
# values of all matrices of one request or session (256 MiB in float32): rank 16 on every projection of ten
# 70B-sized blocks is 26M
MAX_ELEMENTS = 64 * 2**20
_MODULE_CHARS = 200
_MAX_DIM = 2**24  # a projection's width; larger declared sizes are refused before anything is made of them
_DTYPES = ("float32", "bfloat16", "float16")  # cast to the span's dtype, as hidden states are


def decode_matrices(entries: list[node_pb2.LoraMatrices], span: BlockSpan) -> list[ClientMatrices]:
    """A request's LoRA matrices for ``span``, their declared shapes checked (on the meta device, against the
    span's projections) before any value is decoded; raises the service's BadRequest."""
    from homeswarm.node.service import BadRequest

    if len(entries) > MAX_PER_BLOCK * span.num_blocks:
        raise BadRequest(f"at most {MAX_PER_BLOCK} LoRA matrices per block, got {len(entries)} for "
                         f"{span.num_blocks} block(s)")
    declared = []
    for entry in entries:
        shapes = list(entry.a.shape), list(entry.b.shape)
        if len(entry.module) > _MODULE_CHARS or not entry.module:
            raise BadRequest(f"bad LoRA module name {entry.module[:80]!r}")
        if entry.a.dtype not in _DTYPES or entry.b.dtype not in _DTYPES:
            raise BadRequest(f"LoRA matrices must be {', '.join(_DTYPES)}, got {entry.a.dtype!r} and "
                             f"{entry.b.dtype!r}")
        if (len(shapes[0]) != 2 or len(shapes[1]) != 2 or not 1 <= shapes[0][0] <= MAX_RANK
                or not all(1 <= d <= _MAX_DIM for shape in shapes for d in shape)):
            raise BadRequest(f"LoRA matrices must be a [r <= {MAX_RANK}, in] and b [out, r], got {shapes[0]} and "
                             f"{shapes[1]} for block {entry.block} {entry.module[:80]}")
        if not math.isfinite(entry.scale):
            raise BadRequest(f"LoRA scale must be finite, got {entry.scale}")
        meta = [torch.empty(shape, dtype=span.dtype, device="meta") for shape in shapes]
        declared.append(ClientMatrices(entry.block, entry.module, meta[0], meta[1], entry.scale))
    try:
        client_parts(span, declared)  # every placement and shape, before decoding
    except AdapterError as e:
        raise BadRequest(str(e)) from None
    total = sum(m.a.numel() + m.b.numel() for m in declared)
    if total > MAX_ELEMENTS:
        raise BadRequest(f"LoRA matrices of {total} values; at most {MAX_ELEMENTS} per request or session")
    matrices = []
    for entry, meta in zip(entries, declared, strict=True):
        try:
            a = deserialize_tensor(entry.a, max_elements=meta.a.numel())
            b = deserialize_tensor(entry.b, max_elements=meta.b.numel())
        except CodecError as e:
            raise BadRequest(f"bad LoRA matrices for block {entry.block} {entry.module}: {e}") from None
        if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise BadRequest(f"LoRA matrices for block {entry.block} {entry.module} contain NaN or infinite values")
        matrices.append(ClientMatrices(entry.block, entry.module, a.to(span.device, span.dtype),
                                       b.to(span.device, span.dtype), entry.scale))
    return matrices


def session_view(service: NodeService, request: node_pb2.OpenSession) -> BlockSpan | None:
    """The span a session with the client's own LoRA matrices runs (None: it sent none), built once when the
    session opens and dropped with it; raises the service's BadRequest (NOT_FOUND for an unserved adapter)."""
    if not request.lora:
        return None
    service._check_range(request.start_block, request.end_block)
    service._check_adapter(request.adapter)
    span = service._subspan(request.start_block, request.end_block, request.adapter)
    return adapted_span(span, client_parts(span, decode_matrices(list(request.lora), span)))


async def forward(service: NodeService, request: node_pb2.ForwardRequest, span: BlockSpan,
                  hidden: torch.Tensor, context: grpc.aio.ServicerContext) -> torch.Tensor:
    """Forward's output with the request's LoRA matrices (``span``: already with its adapter, if named)."""
    from homeswarm.node.service import BadRequest

    try:
        matrices = decode_matrices(list(request.lora), span)
        prompts = decode_prompts(service, request.prompts, span, hidden) if request.HasField("prompts") else None
    except BadRequest as e:
        await service._abort(context, e.code, str(e))
    return await service.executor.run(lora_forward, span, hidden, matrices, prompts)


async def backward(service: NodeService, request: node_pb2.BackwardRequest,
                   context: grpc.aio.ServicerContext) -> node_pb2.BackwardResponse:
    """Backward through the request's adapter and LoRA matrices: input, prompt and matrix gradients."""
    from homeswarm.node.service import BadRequest

    span, hidden, grad_output, prompts = await backward_rpc.checked_inputs(service, request, context)
    try:
        matrices = decode_matrices(list(request.lora), span)
    except BadRequest as e:
        await service._abort(context, e.code, str(e))
    service.metrics.bytes_received.inc(request.ByteSize())
    grad_hidden, grad_prompts, grads = await service.executor.run(lora_backward, span, hidden, grad_output,
                                                                  matrices, prompts)
    answer = backward_rpc.response(service, request, grad_hidden, grad_prompts)
    for grad_a, grad_b in grads:
        answer.grad_lora.add(a=service._encode(grad_a, request.response_compression),
                             b=service._encode(grad_b, request.response_compression))
    service.metrics.bytes_sent.inc(answer.ByteSize())
    return answer
