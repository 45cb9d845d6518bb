"""homeswarm.model: Transformer blocks of dense and Mixture-of-Experts families, checkpoint slices, KV cache.

Responsibility: everything about computing a model, and nothing about the network. A node loads a
:class:`BlockSpan` (``load_span``) and runs it with a :class:`KVCache` per session; the client loads
a :class:`ClientHead` (``load_head``) for embeddings and logits; :class:`LocalModel` runs it all in one
process.

Invariants: results equal transformers' for the same checkpoint (exact greedy tokens in float32);
this package imports no other homeswarm subpackage and never imports ``transformers``.
"""

from pathlib import Path

from .blocks import BlockSpan, DecoderBlock
from .checkpoint import CheckpointReader, MissingShardsError, MissingTensorsError
from .config import ModelConfig
from .head import ClientHead
from .kv_cache import KVCache, cache_bytes
from .loader import load_head, load_span, parse_dtype
from .local import LocalModel
from .sizes import span_active_bytes, span_weight_bytes

# The small demo checkpoint shipped with the package (filled by scripts/, not by this package).
DEMO_MODEL_DIR = Path(__file__).parent / "demo"
# Its draft model for speculative decoding: the same tokenizer, 2 blocks, trained on the demo's outputs.
DEMO_DRAFT_DIR = Path(__file__).parent / "demo_draft"

__all__ = [
    "DEMO_DRAFT_DIR",
    "DEMO_MODEL_DIR",
    "BlockSpan",
    "CheckpointReader",
    "ClientHead",
    "DecoderBlock",
    "KVCache",
    "LocalModel",
    "MissingShardsError",
    "MissingTensorsError",
    "ModelConfig",
    "cache_bytes",
    "load_head",
    "load_span",
    "parse_dtype",
    "span_active_bytes",
    "span_weight_bytes",
]
