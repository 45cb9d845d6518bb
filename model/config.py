"""Model hyper-parameters read from a Hugging Face ``config.json``.

Responsibility: turn a checkpoint's ``config.json`` (written by transformers 4.x or 5.x) into one
frozen, validated :class:`ModelConfig` that the block, head and cache code rely on.

Invariants: a ``ModelConfig`` only exists for an architecture this package computes exactly (the
families in ``SUPPORTED_FAMILIES``); anything it cannot reproduce (an unknown ``model_type``, an
unsupported RoPE scaling, a non-SiLU activation, MLP biases, sliding windows a family does not
support) is refused here with a ``ValueError`` rather than computed wrongly later. What sets a family
apart is read by its file in ``families/``; this module reads what all families share.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .prequant import PrequantSpec

# model_type values; families/ has a file for each (a unit test keeps the two lists equal)
SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "qwen2_moe", "mixtral",
                      "gpt_oss", "deepseek_v3", "kimi_k2", "bitnet")

# RoPE types that leave the plain frequencies unchanged.
_PLAIN_ROPE_TYPES = ("default", None)
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
_YARN_KEYS = ("original_max_position_embeddings",)


@dataclass(frozen=True)
class MoEConfig:
    """A Mixture-of-Experts feed-forward layer's settings (the same in every sparse layer)."""

    num_experts: int
    top_k: int
    intermediate_size: int  # of one routed expert
    norm_topk_prob: bool = False  # rescale the chosen experts' weights to sum to 1
    float32_weights: bool = False  # routing weights stay float32 (Mixtral)
    shared_expert_intermediate_size: int = 0  # 0: no shared expert
    shared_expert_gate: bool = False  # a sigmoid gate scales the shared expert (Qwen2-MoE)
    dense_layers: frozenset[int] = frozenset()  # layers whose MLP is dense (intermediate_size of the model)
    # DeepSeek-V3 group-limited routing
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # GPT-OSS clamped SwiGLU
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    def __post_init__(self) -> None:
        for name in ("num_experts", "top_k", "intermediate_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"MoE config field {name} must be a positive integer, got {value!r}")
        if self.top_k > self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.top_k}) exceeds the number of experts ({self.num_experts})")
        if self.n_group < 1 or self.num_experts % self.n_group or not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"invalid expert groups: n_group={self.n_group}, topk_group={self.topk_group} "
                             f"for {self.num_experts} experts")


@dataclass(frozen=True)
class MLAConfig:
    """DeepSeek-V3 Multi-head Latent Attention's low-rank projections and head sizes."""

    q_lora_rank: int | None  # None: queries come from one full projection
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim


@dataclass(frozen=True)
class ModelConfig:
    """The subset of a decoder-only checkpoint's config that our block code needs."""

    family: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    attention_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    max_position_embeddings: int
    torch_dtype: str | None
    # Sliding-window attention: a query at position p sees keys in (p - window, p]; on every layer,
    # or on those that ``layer_types`` marks "sliding_attention".
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    o_bias: bool | None = None  # o_proj bias when it differs from attention_bias
    moe: MoEConfig | None = None
    mla: MLAConfig | None = None
    attention_sinks: bool = False  # a learned per-head logit that takes part in the softmax (GPT-OSS)
    bitnet_linear_class: str | None = None  # how BitNet's ternary layers scale (quantization_config)
    prequant: PrequantSpec | None = None  # linear weights stored as 4-bit GPTQ or compressed-tensors ints

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"config field {name} must be a positive integer, got {value!r}")
        if self.family not in SUPPORTED_FAMILIES:
            raise ValueError(f"unsupported model family {self.family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise ValueError(f"rms_norm_eps must be positive, got {self.rms_norm_eps!r}")
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise ValueError(f"rope_theta must be positive, got {self.rope_theta!r}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"sliding_window must be positive or None, got {self.sliding_window!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        if self.layer_types is not None:
            if len(self.layer_types) != self.num_hidden_layers:
                raise ValueError(f"layer_types has {len(self.layer_types)} entries for {self.num_hidden_layers} layers")
            unknown = set(self.layer_types) - {"full_attention", "sliding_attention"}
            if unknown:
                raise ValueError(f"unsupported layer types: {sorted(unknown)}")
            if "sliding_attention" in self.layer_types and self.sliding_window is None:
                raise ValueError("layer_types has sliding_attention layers but sliding_window is not set")

    def window_of(self, layer: int) -> int | None:
        """The sliding window of layer ``layer`` (absolute index), or None for full attention."""
        if self.layer_types is not None:
            return self.sliding_window if self.layer_types[layer] == "sliding_attention" else None
        return self.sliding_window

    def is_sparse(self, layer: int) -> bool:
        """Whether layer ``layer`` has a Mixture-of-Experts feed-forward (else a dense MLP)."""
        return self.moe is not None and layer not in self.moe.dense_layers

    @property
    def rope_dim(self) -> int:
        """How many dimensions of a head RoPE rotates."""
        return self.mla.qk_rope_head_dim if self.mla is not None else self.head_dim

    @property
    def kv_group_size(self) -> int:
        """How many query heads share one key/value head (grouped-query attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def o_proj_bias(self) -> bool:
        # Qwen2 has biases on q/k/v only; Llama/Qwen3 `attention_bias` covers o_proj too.
        return self.attention_bias if self.o_bias is None else self.o_bias

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build from a parsed ``config.json``; raise ``ValueError`` for anything unsupported."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be a JSON object, got {type(d).__name__}")
        family = d.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ValueError(
                f"unsupported model_type {family!r}; supported: {', '.join(SUPPORTED_FAMILIES)}"
            )
        activation = "relu2" if family == "bitnet" else "silu"  # BitNet's squared ReLU
        hidden_act = d.get("hidden_act", activation)
        if hidden_act != activation:
            raise ValueError(f"unsupported hidden_act {hidden_act!r} for {family}; only {activation!r} is supported")
        if d.get("mlp_bias", False):
            raise ValueError(f"mlp_bias=True is not supported ({family})")
        partial = d.get("partial_rotary_factor", 1.0)
        if partial not in (1, 1.0):
            raise ValueError(f"partial_rotary_factor={partial!r} is not supported")

        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in d]
        if missing:
            raise ValueError(f"config.json for {family} lacks required keys: {', '.join(missing)}")
        hidden_size = d["hidden_size"]
        num_heads = d["num_attention_heads"]
        num_kv_heads = d.get("num_key_value_heads") or num_heads
        head_dim = d.get("head_dim") or (hidden_size // num_heads if isinstance(hidden_size, int)
                                         and isinstance(num_heads, int) and num_heads > 0 else 0)

        rope_theta, rope_scaling = _read_rope(d)
        fields: dict[str, Any] = dict(
            family=family,
            vocab_size=d["vocab_size"],
            hidden_size=hidden_size,
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            attention_bias=bool(d.get("attention_bias", False)),
            qk_norm=False,
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            torch_dtype=d.get("torch_dtype", d.get("dtype")),
        )
        from .families import family_of  # the families build on this module
        from .prequant import read_prequant

        try:
            fields["prequant"] = read_prequant(d)
        except ValueError as e:
            raise ValueError(f"{family}: quantization_config: {e}") from None

        try:
            fields.update(family_of(family).read(d))
        except ValueError as e:
            raise ValueError(f"{family}: {e}") from None
        return cls(**fields)

    @classmethod
    def from_dir(cls, model_dir: str | os.PathLike[str]) -> ModelConfig:
        """Read ``model_dir/config.json``."""
        path = Path(model_dir)
        if not path.is_dir():
            raise FileNotFoundError(f"model directory not found: {path}")
        config_path = path / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"no config.json in model directory {path}")
        try:
            data = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{config_path} is not valid JSON: {e}") from e
        return cls.from_dict(data)


def _read_rope(d: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, rope_scaling or None) from either config layout.

    transformers 5.x writes ``rope_parameters: {rope_theta, rope_type, ...}``; 4.x writes a top-level
    ``rope_theta`` and an optional ``rope_scaling`` dict (with ``rope_type`` or the older ``type``).
    """
    params = d.get("rope_parameters")
    if isinstance(params, dict) and params:
        if "rope_type" not in params and "type" not in params and "rope_theta" not in params:
            # A per-layer-type mapping (e.g. {"full_attention": {...}}): not a Llama-family layout.
            raise ValueError(f"unsupported per-layer rope_parameters: {sorted(params)}")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        scaling: dict[str, Any] | None = dict(params)
    else:
        theta = d.get("rope_theta", 10000.0)
        scaling = dict(d["rope_scaling"]) if isinstance(d.get("rope_scaling"), dict) else None
        if d.get("rope_scaling") is not None and scaling is None:
            raise ValueError(f"rope_scaling must be a JSON object, got {d['rope_scaling']!r}")
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise ValueError(f"rope_theta must be a number, got {theta!r}")
    if scaling is not None:
        scaling.pop("rope_theta", None)
        rope_type = scaling.pop("type", None)
        scaling.setdefault("rope_type", rope_type)
        if scaling["rope_type"] in _PLAIN_ROPE_TYPES:
            scaling = None
    return float(theta), scaling


def _check_rope_scaling(scaling: dict[str, Any]) -> None:
    rope_type = scaling.get("rope_type")
    if rope_type == "yarn":
        missing = [k for k in _YARN_KEYS if k not in scaling]
        if missing:
            raise ValueError(f"yarn rope scaling lacks keys: {', '.join(missing)}")
        return
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope scaling type {rope_type!r}; only 'llama3' and 'yarn' are supported")
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise ValueError(f"llama3 rope scaling lacks keys: {', '.join(missing)}")
    if not scaling["high_freq_factor"] > scaling["low_freq_factor"]:
        raise ValueError("llama3 rope scaling needs high_freq_factor > low_freq_factor")


def read_sliding_window(d: dict[str, Any], family: str) -> int | None:
    """The window of a family that slides on every layer (Mistral, Mixtral), or None; refuses windows
    that Qwen families would apply to some layers only."""
    if family in ("mistral", "mixtral"):
        window = d.get("sliding_window")
        if window is not None and (not isinstance(window, int) or isinstance(window, bool)):
            raise ValueError(f"sliding_window must be an integer or null, got {window!r}")
        return window
    if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe"):
        # Qwen applies the window only to some layers; we compute full attention everywhere, so a
        # checkpoint that really uses a window is refused rather than silently computed differently.
        layer_types = d.get("layer_types") or []
        if d.get("use_sliding_window", False) or "sliding_attention" in layer_types:
            raise ValueError(f"{family} sliding-window attention (use_sliding_window=True) is not supported")
    return None
