"""A span's forward pass with deep prompts, and its backward pass: what training through a node computes.

Responsibility: run blocks ``[start, end)`` of a :class:`BlockSpan` without a cache, adding a per-block
prompt to the hidden states of the first positions before each block (deep prompt tuning, as Petals
does), and give the gradients of a loss with respect to the span's inputs (and prompts) for a given
gradient of its outputs. The span's weights stay frozen: autograd records only what the inputs touch.

Invariants: without prompts, :func:`prompted_forward` computes exactly what ``span.forward(hidden)``
computes (the same operations in the same order); prompts never change the caller's tensors; all
checks happen before any compute and raise ``ValueError``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .attention import Segment
from .blocks import BlockSpan


def check_prompts(span: BlockSpan, hidden: Tensor, prompts: Tensor | None) -> None:
    """Raise ValueError unless ``prompts`` is None or [span.num_blocks, prefix, hidden] with 1 <= prefix <=
    the number of positions, in the span's dtype and on its device."""
    if prompts is None:
        return
    expected = (span.num_blocks, span.config.hidden_size)
    if prompts.dim() != 3 or (prompts.shape[0], prompts.shape[2]) != expected:
        raise ValueError(f"deep prompts must be [{span.num_blocks}, prefix, {span.config.hidden_size}] for blocks "
                         f"[{span.start}, {span.end}), got {list(prompts.shape)}")
    if not 1 <= prompts.shape[1] <= hidden.shape[1]:
        raise ValueError(f"deep prompts cover {prompts.shape[1]} positions; the hidden states have "
                         f"{hidden.shape[1]}")
    if prompts.dtype != span.dtype or prompts.device != span.device:
        raise ValueError(f"deep prompts are {prompts.dtype} on {prompts.device}, the span is {span.dtype} "
                         f"on {span.device}")


def prompted_forward(span: BlockSpan, hidden: Tensor, prompts: Tensor | None = None) -> Tensor:
    """Blocks of ``span`` over ``hidden`` [B, T, H], no cache, with ``prompts[i]`` [prefix, H] added to
    positions ``:prefix`` of every sequence before block i. Records autograd when grad mode is on."""
    span.check(hidden)
    check_prompts(span, hidden, prompts)
    if prompts is None:
        return span._run([(hidden, None)])[0]
    batch, length, size = hidden.shape
    prefix = prompts.shape[1]
    # one layer at a time over the flat rows, as BlockSpan._run does for a single cache-less item
    segments = [Segment(0, batch, length, None, 0)]
    cos, sin = span._rope_rows(0, length, span.dtype, hidden.device)
    if batch > 1:
        cos, sin = cos.repeat(batch, 1), sin.repeat(batch, 1)
    cos, sin = cos[:, None], sin[:, None]
    x = hidden
    for i, layer in enumerate(span.layers):
        # out of place: the prompt's gradient flows, and the caller's hidden states stay untouched
        x = torch.cat([x[:, :prefix] + prompts[i], x[:, prefix:]], dim=1)
        x = layer(x.reshape(-1, size), cos, sin, segments, i).view(batch, length, size)
    return x


def span_backward(span: BlockSpan, hidden: Tensor, grad_output: Tensor,
                  prompts: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """(d loss / d hidden, d loss / d prompts or None) for ``grad_output`` = d loss / d output of
    :func:`prompted_forward` (same shape and dtype as ``hidden``). Recomputes the forward pass."""
    if grad_output.shape != hidden.shape or grad_output.dtype != hidden.dtype:
        raise ValueError(f"output gradients must match the hidden states ({list(hidden.shape)}, {hidden.dtype}), "
                         f"got {list(grad_output.shape)}, {grad_output.dtype}")
    inputs = [hidden.detach().requires_grad_(True)]
    if prompts is not None:
        inputs.append(prompts.detach().requires_grad_(True))
    with torch.enable_grad():
        output = prompted_forward(span, inputs[0], inputs[1] if prompts is not None else None)
        grads = torch.autograd.grad(output, inputs, grad_output.to(output.device))
    return grads[0], grads[1] if prompts is not None else None
