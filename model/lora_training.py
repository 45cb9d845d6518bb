"""A client's own LoRA matrices on a span: the forward pass with them, and their gradients.

Responsibility: place LoRA matrices that come with a request (a client trains them; the node keeps
nothing) on a span's linear layers, as :mod:`.lora` places a served adapter's, and give the gradients of
a loss with respect to the span's inputs, the deep prompts and those matrices for a given gradient of
its outputs, by recomputing the forward pass with autograd over the frozen weights.

Invariants: every check (block in the span, a linear layer the blocks have, shapes, dtype) happens before
any compute and raises ``AdapterError``; the caller's tensors are never changed; the forward pass with
the matrices is :func:`.training.prompted_forward` over an adapted view, so without prompts it computes
what ``span.forward`` computes plus the low-rank terms.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .blocks import BlockSpan
from .families import family_of
from .lora import AdapterError, LoraPart, adapted_span, our_path, place
from .training import prompted_forward, span_backward


@dataclass(frozen=True)
class ClientMatrices:
    """LoRA matrices for one projection of one block: ``module`` is its checkpoint path in the block
    ("self_attn.q_proj", Mixtral's "block_sparse_moe.gate"); ``a`` [r, in_features], ``b`` [out_features, r]."""

    block: int
    module: str
    a: Tensor
    b: Tensor
    scale: float


def client_parts(span: BlockSpan, matrices: list[ClientMatrices]) -> dict[int, dict[str, list[LoraPart]]]:
    """The matrices placed on the span's layers (by :func:`.lora.place`); AdapterError for a block outside
    the span, a projection given twice, or matrices that do not fit."""
    parts: dict[int, dict[str, list[LoraPart]]] = {}
    seen: set[tuple[int, str]] = set()
    aliases = family_of(span.config.family).aliases
    for m in matrices:
        if not span.start <= m.block < span.end:
            raise AdapterError(f"LoRA matrices for block {m.block}, outside blocks [{span.start}, {span.end})")
        if (m.block, m.module) in seen:
            raise AdapterError(f"LoRA matrices for block {m.block} {m.module} given twice")
        seen.add((m.block, m.module))
        if m.a.dtype != span.dtype or m.b.dtype != span.dtype:
            raise AdapterError(f"LoRA matrices must be {span.dtype}, got {m.a.dtype} and {m.b.dtype}")
        try:
            where, part = place(span.layers[m.block - span.start], our_path(m.module, aliases), m.a, m.b, m.scale)
        except AdapterError as e:
            raise AdapterError(f"block {m.block}: {e}") from None
        parts.setdefault(m.block, {}).setdefault(where, []).append(part)
    return parts


def lora_forward(span: BlockSpan, hidden: Tensor, matrices: list[ClientMatrices],
                 prompts: Tensor | None = None) -> Tensor:
    """The span's output for ``hidden`` with the client's matrices (and deep prompts)."""
    view = adapted_span(span, client_parts(span, matrices)) if matrices else span
    return prompted_forward(view, hidden, prompts)


def lora_backward(span: BlockSpan, hidden: Tensor, grad_output: Tensor, matrices: list[ClientMatrices],
                  prompts: Tensor | None = None) -> tuple[Tensor, Tensor | None, list[tuple[Tensor, Tensor]]]:
    """(d loss / d hidden, d loss / d prompts or None, [(d loss / d a, d loss / d b) per matrices entry]) for
    ``grad_output`` = d loss / d output of :func:`lora_forward`. Recomputes the forward pass."""
    if not matrices:
        grad_hidden, grad_prompts = span_backward(span, hidden, grad_output, prompts)
        return grad_hidden, grad_prompts, []
    if grad_output.shape != hidden.shape or grad_output.dtype != hidden.dtype:
        raise ValueError(f"output gradients must match the hidden states ({list(hidden.shape)}, {hidden.dtype}), "
                         f"got {list(grad_output.shape)}, {grad_output.dtype}")
    leaves = [ClientMatrices(m.block, m.module, m.a.detach().requires_grad_(True),
                             m.b.detach().requires_grad_(True), m.scale) for m in matrices]
    view = adapted_span(span, client_parts(span, leaves))
    inputs = [hidden.detach().requires_grad_(True)]
    if prompts is not None:
        inputs.append(prompts.detach().requires_grad_(True))
    weights = [t for m in leaves for t in (m.a, m.b)]
    with torch.enable_grad():
        output = prompted_forward(view, inputs[0], inputs[1] if prompts is not None else None)
        grads = torch.autograd.grad(output, inputs + weights, grad_output.to(output.device))
    n = len(inputs)
    pairs = [(grads[n + 2 * i], grads[n + 2 * i + 1]) for i in range(len(leaves))]
    return grads[0], grads[1] if prompts is not None else None, pairs
