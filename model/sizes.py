"""How many bytes a block's weights take, in all and per token, computed from the config alone.

Responsibility: the real size of blocks of every family (a MoE block counts all its experts), so that
a node can say what a span costs before loading it, and benchmarks can state what one decoding step
must read: every dense weight, but of the routed experts only the ``top_k`` that a token uses. With a
weight format (``quant``), the layers :func:`~.quant.quantize_block` quantizes count their quantized
bytes, scales and zero points included; a module's ``held_in_float`` children count in the model dtype.
Invariant: counts come from the very modules ``BlockSpan`` builds (on the meta device, no memory),
so they cannot drift from the code.
"""

from __future__ import annotations

import torch
from torch import nn

from .blocks import build_block
from .config import ModelConfig
from .moe import Experts
from .quant import DEFAULT_INT4_GROUP_SIZE, check_quant, is_quantizable, matrix_bytes


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def block_parameters(config: ModelConfig, layer: int) -> tuple[int, int]:
    """(all parameters, parameters one token uses) of block ``layer``."""
    with torch.device("meta"):
        block = build_block(config, layer)
    total = sum(p.numel() for p in block.parameters())
    routed = 0
    if config.is_sparse(layer) and config.moe is not None:
        experts = block.get_submodule("mlp.experts")
        routed = sum(p.numel() for p in experts.parameters())
        routed -= routed * config.moe.top_k // config.moe.num_experts
    return total, total - routed


def _module_bytes(name: str, module: nn.Module, element: int, quant: str, group_size: int) -> int:
    """Bytes of ``module``'s own weights (its whole subtree), quantized as :func:`quantize_block` would."""
    stored_bytes = getattr(module, "stored_bytes", None)
    if stored_bytes is not None:  # a layer that keeps the checkpoint's own packed form (BitNet's)
        return stored_bytes(element)
    if quant != "none" and is_quantizable(name, module):
        if isinstance(module, Experts):
            _, two_i, hidden = module.gate_up_proj.shape
            return module.num_experts * (matrix_bytes(two_i, hidden, quant, group_size)
                                         + matrix_bytes(hidden, two_i // 2, quant, group_size))
        assert isinstance(module, nn.Linear)
        bias = module.bias.numel() * element if module.bias is not None else 0
        return matrix_bytes(module.out_features, module.in_features, quant, group_size) + bias
    own = sum(p.numel() for p in module.parameters(recurse=False)) * element
    floats = getattr(module, "held_in_float", ())  # children a module keeps in the model dtype (MLA's kv_b_proj)
    return own + sum(_float_bytes(sub, element) if child in floats
                     else _module_bytes(f"{name}.{child}" if name else child, sub, element, quant, group_size)
                     for child, sub in module.named_children())


def _float_bytes(layer: nn.Module, element: int) -> int:
    """Bytes of a linear layer's weight and bias in the model dtype, whatever form it is loaded in."""
    bias = getattr(layer, "bias", None)
    return (layer.out_features * layer.in_features + (bias.numel() if bias is not None else 0)) * element


def block_bytes(config: ModelConfig, layer: int, dtype: torch.dtype, quant: str = "none",
                group_size: int = DEFAULT_INT4_GROUP_SIZE) -> tuple[int, int]:
    """(bytes of all weights, bytes one token's step reads) of block ``layer`` in ``dtype``, with its
    linear weights and experts in ``quant`` (norms, routers and biases stay in ``dtype``)."""
    check_quant(quant, group_size)
    with torch.device("meta"):
        block = build_block(config, layer)
    element = _element_size(dtype)
    total = _module_bytes("", block, element, quant, group_size)
    routed = 0
    if config.is_sparse(layer) and config.moe is not None:
        routed = _module_bytes("mlp.experts", block.get_submodule("mlp.experts"), element, quant, group_size)
        routed -= routed * config.moe.top_k // config.moe.num_experts
    return total, total - routed


def span_weight_bytes(config: ModelConfig, start: int, end: int, dtype: torch.dtype, quant: str = "none",
                      group_size: int = DEFAULT_INT4_GROUP_SIZE) -> int:
    """Bytes of the weights of blocks ``[start, end)`` in ``dtype``, quantized as ``quant`` says."""
    return sum(block_bytes(config, layer, dtype, quant, group_size)[0] for layer in range(start, end))


def span_active_bytes(config: ModelConfig, start: int, end: int, dtype: torch.dtype, quant: str = "none",
                      group_size: int = DEFAULT_INT4_GROUP_SIZE) -> int:
    """Bytes of weights that one token's decoding step reads in blocks ``[start, end)`` (the chosen
    experts only)."""
    return sum(block_bytes(config, layer, dtype, quant, group_size)[1] for layer in range(start, end))
