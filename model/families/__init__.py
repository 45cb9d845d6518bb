"""Model families: what sets each apart from a plain Llama block, one short file per family.

Responsibility: for every supported ``model_type``, a :class:`Family` that reads the family's own
``config.json`` fields, composes a block from the shared parts (attention variants, MLP and expert
variants, routers, norms), and names where its checkpoint's tensor names differ from ours.
Invariant: the keys of ``FAMILIES`` are exactly ``config.SUPPORTED_FAMILIES``.
"""

from __future__ import annotations

from .base import Family
from .bitnet import BITNET
from .deepseek import DEEPSEEK_V3
from .dense import LLAMA, MISTRAL, QWEN2, QWEN3
from .gpt_oss import GPT_OSS
from .mixtral import MIXTRAL
from .qwen_moe import QWEN2_MOE, QWEN3_MOE

FAMILIES: dict[str, Family] = {
    "llama": LLAMA,
    "mistral": MISTRAL,
    "qwen2": QWEN2,
    "qwen3": QWEN3,
    "qwen3_moe": QWEN3_MOE,
    "qwen2_moe": QWEN2_MOE,
    "mixtral": MIXTRAL,
    "gpt_oss": GPT_OSS,
    "deepseek_v3": DEEPSEEK_V3,
    "kimi_k2": DEEPSEEK_V3,
    "bitnet": BITNET,
}


def family_of(model_type: str) -> Family:
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(FAMILIES)}") from None


__all__ = ["FAMILIES", "Family", "family_of"]
