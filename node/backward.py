"""The node's side of training: deep prompts on Forward, and the stateless Backward RPC.

A Backward request carries a span's forward inputs and the gradient of the loss with respect to its
outputs; the node recomputes the forward pass with autograd over its frozen weights and returns the
gradient with respect to the inputs (and to the deep prompts, when sent). Nothing is kept afterwards,
so any server of the same blocks answers the same, and a client fails over by asking another.

Checks, before any compute, as for Forward: protocol version (FAILED_PRECONDITION), block range,
compression, both tensors' dtype and shape (declared, before decoding), equal shapes and dtypes of
inputs and gradients, NaN/inf, the prompts' shape (INVALID_ARGUMENT); the per-host rate limit
(RESOURCE_EXHAUSTED). A node that serves quantized weights refuses with FAILED_PRECONDITION: its
integer kernels have no autograd, and gradients through rounded weights would not be the model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc
import torch

from homeswarm.model.training import check_prompts, prompted_forward, span_backward
from homeswarm.protocol import CodecError, deserialize_tensor, node_pb2

if TYPE_CHECKING:
    from homeswarm.model import BlockSpan
    from homeswarm.node.service import NodeService

_PROMPT_DTYPES = ("float32", "bfloat16", "float16")


def decode_prompts(service: NodeService, message: node_pb2.Tensor, span: BlockSpan,
                   hidden: torch.Tensor) -> torch.Tensor:
    """A request's deep prompts for ``span``, checked before decoding; raises the service's BadRequest."""
    from homeswarm.node.service import BadRequest

    shape = list(message.shape)
    if message.dtype not in _PROMPT_DTYPES:
        raise BadRequest(f"deep prompts must be {', '.join(_PROMPT_DTYPES)}, got dtype {message.dtype!r}")
    size = span.config.hidden_size
    if len(shape) != 3 or shape[0] != span.num_blocks or shape[2] != size or not 1 <= shape[1] <= hidden.shape[1]:
        raise BadRequest(f"deep prompts must be [{span.num_blocks}, prefix <= {hidden.shape[1]}, {size}] for "
                         f"blocks [{span.start}, {span.end}), got {shape}")
    try:
        prompts = deserialize_tensor(message, max_elements=shape[0] * shape[1] * size)
    except CodecError as e:
        raise BadRequest(f"bad deep prompts: {e}") from None
    if not bool(torch.isfinite(prompts).all()):
        raise BadRequest("deep prompts contain NaN or infinite values")
    prompts = prompts.to(span.device, span.dtype)
    try:
        check_prompts(span, hidden, prompts)
    except ValueError as e:
        raise BadRequest(str(e)) from None
    return prompts


async def forward(service: NodeService, request: node_pb2.ForwardRequest, span: BlockSpan,
                  hidden: torch.Tensor, context: grpc.aio.ServicerContext) -> torch.Tensor:
    """Forward's output: the span's plain forward, or with the request's deep prompts."""
    from homeswarm.node.service import BadRequest

    if not request.HasField("prompts"):
        return await service.executor.run(span.forward, hidden)
    try:
        prompts = decode_prompts(service, request.prompts, span, hidden)
    except BadRequest as e:
        await service._abort(context, e.code, str(e))
    return await service.executor.run(prompted_forward, span, hidden, prompts)


async def checked_inputs(service: NodeService, request: node_pb2.BackwardRequest, context: grpc.aio.ServicerContext
                         ) -> tuple[BlockSpan, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A Backward request's span (with its adapter, when named), inputs, output gradients and deep prompts, after
    every check above (a LoRA backward, node/lora_rpc.py, checks its matrices beside); aborts the call otherwise."""
    from homeswarm.node.service import _COMPRESSIONS, BadRequest

    await service._admit(context, request)
    await service._check_version(request.protocol_version, context)
    if service.identity.quant != "none":
        await service._abort(context, grpc.StatusCode.FAILED_PRECONDITION,
                             f"this node serves {service.identity.quant} weights, which have no backward pass; "
                             "train through nodes serving unquantized weights")
    try:
        service._check_range(request.start_block, request.end_block)
        service._check_adapter(request.adapter)
        if request.response_compression not in _COMPRESSIONS:
            raise BadRequest(f"unknown compression {request.response_compression}")
        if (list(request.grad_output.shape) != list(request.hidden.shape)
                or request.grad_output.dtype != request.hidden.dtype):
            raise BadRequest(f"output gradients must have the hidden states' shape and dtype "
                             f"({list(request.hidden.shape)}, {request.hidden.dtype!r}), got "
                             f"{list(request.grad_output.shape)}, {request.grad_output.dtype!r}")
        hidden = service._decode_hidden(request.hidden, None, service.max_session_length)
        grad_output = service._decode_hidden(request.grad_output, None, service.max_session_length)
        span = service._subspan(request.start_block, request.end_block, request.adapter)
        prompts = decode_prompts(service, request.prompts, span, hidden) if request.HasField("prompts") else None
    except BadRequest as e:
        await service._abort(context, e.code, str(e))
    return span, hidden, grad_output, prompts


def response(service: NodeService, request: node_pb2.BackwardRequest, grad_hidden: torch.Tensor,
             grad_prompts: torch.Tensor | None) -> node_pb2.BackwardResponse:
    """The answer: input gradients, and the deep prompts' when they were sent, in the asked compression."""
    answer = node_pb2.BackwardResponse(grad_hidden=service._encode(grad_hidden, request.response_compression))
    if grad_prompts is not None:
        answer.grad_prompts.CopyFrom(service._encode(grad_prompts, request.response_compression))
    return answer


async def backward(service: NodeService, request: node_pb2.BackwardRequest,
                   context: grpc.aio.ServicerContext) -> node_pb2.BackwardResponse:
    span, hidden, grad_output, prompts = await checked_inputs(service, request, context)
    service.metrics.bytes_received.inc(request.ByteSize())
    grad_hidden, grad_prompts = await service.executor.run(span_backward, span, hidden, grad_output, prompts)
    answer = response(service, request, grad_hidden, grad_prompts)
    service.metrics.bytes_sent.inc(answer.ByteSize())
    return answer
