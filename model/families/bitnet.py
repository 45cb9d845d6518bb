"""BitNet b1.58: a Llama block whose projections are ternary (:mod:`..bitnet`), with an RMSNorm on the
attention output before ``o_proj`` (``attn_sub_norm``) and on the gated product before ``down_proj``
(``ffn_sub_norm``), and a squared ReLU in place of SiLU.

Only packed checkpoints are read (``quantization_config``: ``quant_method: bitnet``, ``quantization_mode:
offline``), as the hub ships them; the sub-norms live in the projections they feed, and ``aliases``
give them the checkpoint's names.
"""

from __future__ import annotations

from typing import Any

from ..attention import Attention
from ..bitnet import LINEAR_CLASSES, BitNetMLP, TernaryLinear
from ..blocks import DecoderBlock
from ..config import ModelConfig
from ..norms import RMSNorm
from .base import Family


def _read(d: dict[str, Any]) -> dict[str, Any]:
    quant = d.get("quantization_config")
    if not isinstance(quant, dict) or quant.get("quant_method") != "bitnet":
        raise ValueError("a BitNet checkpoint needs quantization_config with quant_method 'bitnet' "
                         "(packed ternary weights)")
    if quant.get("quantization_mode", "offline") != "offline":
        raise ValueError(f"quantization_mode {quant.get('quantization_mode')!r} is not supported: only "
                         "'offline' checkpoints (packed ternary weights) are")
    linear_class = quant.get("linear_class", "bitlinear")
    if linear_class not in LINEAR_CLASSES:
        raise ValueError(f"unsupported linear_class {linear_class!r}; supported: {', '.join(LINEAR_CLASSES)}")
    if quant.get("use_rms_norm", False):
        raise ValueError("use_rms_norm=True (an RMSNorm inside every BitLinear) is not supported")
    return {"bitnet_linear_class": linear_class}


def bitnet_block(config: ModelConfig, layer: int) -> DecoderBlock:
    linear_class = config.bitnet_linear_class or "bitlinear"
    attention = Attention(config, layer)
    hidden, eps = config.hidden_size, config.rms_norm_eps
    for name in ("q_proj", "k_proj", "v_proj"):
        plain = getattr(attention, name)
        setattr(attention, name, TernaryLinear(plain.in_features, plain.out_features, bias=plain.bias is not None,
                                               linear_class=linear_class))
    o_proj = attention.o_proj
    attention.o_proj = TernaryLinear(o_proj.in_features, hidden, bias=o_proj.bias is not None,
                                     linear_class=linear_class, input_norm=RMSNorm(o_proj.in_features, eps))
    mlp = BitNetMLP(hidden, config.intermediate_size, eps, linear_class)
    return DecoderBlock(config, attention, mlp)


BITNET = Family(read=_read, block=bitnet_block,
                aliases=(("self_attn.o_proj.input_norm.", "self_attn.attn_sub_norm."),
                         ("mlp.down_proj.input_norm.", "mlp.ffn_sub_norm.")))
