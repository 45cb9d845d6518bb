"""What a node announces as its weight format: how the weights it computes with differ from the
checkpoint's floats, span by span, so that a client demanding exact results (``--exact``) routes
around any node whose weights are not the checkpoint's own.

Formats: ``none`` (the checkpoint's floats, in the announced dtype), ``int8`` / ``int4`` (``--quant``:
every linear layer and expert quantized at load, or a checkpoint shipped 4-bit in more than its routed
experts), ``int4-experts`` (a checkpoint shipped with 4-bit routed experts only, as Kimi K2 Thinking
is: the rest in the announced dtype). A span whose blocks hold none of a pre-quantized checkpoint's
4-bit layers (K2's dense first block) announces ``none``, or ``--quant``'s format when one is asked.
``--quant int8|int4`` over a span that holds 4-bit layers of the checkpoint quantizes what is still
float (attention, shared experts): the span then holds 4-bit weights beyond its routed experts, and
announces ``int4`` whichever ``--quant`` it was (its coarsest weights, the ones the error bound of a
verifying client must allow for; the records have no mixed format, and an older node drops a record
whose format it does not know).
Computed from the config alone, on the meta device: blocks are built as :class:`~.blocks.BlockSpan`
builds them, so the answer cannot drift from what the loader makes.
"""

from __future__ import annotations

import torch

from .blocks import build_block
from .config import ModelConfig
from .prequant import PrequantExperts
from .quant import QuantizedLinearInt4, check_quant

WEIGHT_FORMATS = ("none", "int8", "int4", "int4-experts")


def _prequant_layers(config: ModelConfig, start: int, end: int) -> tuple[bool, bool]:
    """Whether blocks ``[start, end)`` hold a pre-quantized checkpoint's 4-bit routed experts, and 4-bit
    layers other than those."""
    experts = other = False
    if config.prequant is None:
        return experts, other
    for layer in range(start, end):
        with torch.device("meta"):
            block = build_block(config, layer)
        inside = [name for name, module in block.named_modules() if isinstance(module, PrequantExperts)]
        experts = experts or bool(inside)
        other = other or any(isinstance(module, QuantizedLinearInt4) and not name.startswith(tuple(
            f"{prefix}." for prefix in inside)) for name, module in block.named_modules())
    return experts, other


def weight_format(config: ModelConfig, quant: str, start: int, end: int) -> str:
    """The format a node serving blocks ``[start, end)`` of ``config``'s checkpoint with ``--quant
    quant`` announces (one of :data:`WEIGHT_FORMATS`)."""
    check_quant(quant)
    experts, other = _prequant_layers(config, start, end)
    if quant != "none":  # what --quant leaves unquantized (routers, norms) was never 4-bit either
        return "int4" if experts or other else quant
    if other:
        return "int4"
    return "int4-experts" if experts else "none"
