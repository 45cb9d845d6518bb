"""What a GGUF file's metadata and tensor names mean in Hugging Face terms: one table per architecture.

Responsibility: turn a GGUF's ``general.architecture`` and ``<arch>.*`` metadata into the ``config.json``
dictionary that :meth:`~.config.ModelConfig.from_dict` reads, and map each Hugging Face tensor name our
loader asks for (``model.layers.3.self_attn.q_proj.weight``) to llama.cpp's (``blk.3.attn_q.weight``).

Invariants: an architecture without a table here is refused with a ``ValueError`` naming the supported
ones; a metadata value we cannot reproduce (per-layer head counts, an unknown RoPE scaling) is refused
rather than guessed. Which tensors llama.cpp stores with its permuted Q/K rows is stated here
(:data:`PERMUTED_QK`), undone by the reader.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .gguf_arch import ARCHITECTURES as OWN_TABLES
from .gguf_arch import arch_config

# GGUF architecture -> our model_type (a llama file with experts is Mixtral: llama.cpp writes it so)
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "qwen2moe": "qwen2_moe",
                 "qwen3moe": "qwen3_moe", **OWN_TABLES}
# architectures whose converter permutes q/k rows for its interleaved RoPE (LlamaModel.permute)
PERMUTED_QK = frozenset({"llama"})

# Hugging Face block-relative names -> llama.cpp's, per block (``{i}``: the block index)
_BLOCK_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
    # Mixture of experts: the router, and the shared expert of Qwen2-MoE
    "mlp.gate.weight": "ffn_gate_inp.weight",
    "block_sparse_moe.gate.weight": "ffn_gate_inp.weight",
    "mlp.shared_expert.gate_proj.weight": "ffn_gate_shexp.weight",
    "mlp.shared_expert.up_proj.weight": "ffn_up_shexp.weight",
    "mlp.shared_expert.down_proj.weight": "ffn_down_shexp.weight",
    "mlp.shared_expert_gate.weight": "ffn_gate_inp_shexp.weight",
}
# stacked experts (transformers 5's fused names): gate_up is llama.cpp's gate and up, concatenated
STACKED_EXPERTS = {
    "experts.gate_up_proj": ("ffn_gate_exps.weight", "ffn_up_exps.weight"),
    "experts.down_proj": ("ffn_down_exps.weight",),
}
_HEAD_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(?:mlp\.|block_sparse_moe\.)?(.+)$")
FULL_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def gguf_names(hf_name: str) -> tuple[str, ...] | None:
    """The llama.cpp tensor name(s) holding Hugging Face tensor ``hf_name`` (two for a fused gate/up
    stack, concatenated along rows), or None where there is no such tensor in any GGUF."""
    if hf_name in _HEAD_NAMES:
        return (_HEAD_NAMES[hf_name],)
    match = FULL_LAYER.match(hf_name)
    if match is None:
        return None
    layer, key = match.groups()
    if key in _BLOCK_NAMES:
        return (f"blk.{layer}.{_BLOCK_NAMES[key]}",)
    stacked = _LAYER.match(hf_name)
    if stacked is not None and stacked.group(2) in STACKED_EXPERTS:
        return tuple(f"blk.{layer}.{name}" for name in STACKED_EXPERTS[stacked.group(2)])
    return None


def hf_names(present: set[str], num_layers: int, *, moe_prefix: str = "mlp.") -> list[str]:
    """Every Hugging Face name whose llama.cpp tensors the file holds (``moe_prefix``: where the family
    keeps its router and experts: ``mlp.``, or Mixtral's ``block_sparse_moe.``)."""
    out = [hf for hf, g in _HEAD_NAMES.items() if g in present]
    for i in range(num_layers):
        for key, g in _BLOCK_NAMES.items():
            if key.startswith("block_sparse_moe."):
                continue
            if f"blk.{i}.{g}" in present:
                out.append(f"model.layers.{i}.{key.replace('mlp.gate.', moe_prefix + 'gate.')}")
        for key, parts in STACKED_EXPERTS.items():
            if all(f"blk.{i}.{p}" in present for p in parts):
                out.append(f"model.layers.{i}.{moe_prefix}{key}")
    return out


def _get(meta: dict[str, Any], key: str, default: Any = None, *, required: bool = False) -> Any:
    if key not in meta:
        if required:
            raise ValueError(f"the GGUF's metadata lacks {key}")
        return default
    value = meta[key]
    if isinstance(value, list):
        raise ValueError(f"{key}: per-layer values ({value[:4]}...) are not supported")
    return value


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that reads back to it (1e-05, not 9.99999974e-06):
    the value the source config held."""
    return float(str(np.float32(value)))


def config_dict(meta: dict[str, Any], tensor_names: set[str], vocab_size: int) -> dict[str, Any]:
    """The ``config.json`` equivalent of a GGUF's metadata (``meta``: key -> value), its tensor names and
    its vocabulary size (the embedding's rows)."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise ValueError(f"unsupported GGUF architecture {arch!r}; supported: {', '.join(ARCHITECTURES)}")
    model_type = ARCHITECTURES[arch]
    experts = _get(meta, f"{arch}.expert_count", 0) or 0
    if arch == "llama" and experts:
        model_type = "mixtral"
    hidden = _get(meta, f"{arch}.embedding_length", required=True)
    heads = _get(meta, f"{arch}.attention.head_count", required=True)
    d: dict[str, Any] = {
        "model_type": model_type,
        "vocab_size": vocab_size,
        "hidden_size": hidden,
        "intermediate_size": _get(meta, f"{arch}.feed_forward_length", required=True),
        "num_hidden_layers": _get(meta, f"{arch}.block_count", required=True),
        "num_attention_heads": heads,
        "num_key_value_heads": _get(meta, f"{arch}.attention.head_count_kv", heads),
        "head_dim": _get(meta, f"{arch}.attention.key_length", hidden // heads if heads else 0),
        "rms_norm_eps": _f32(_get(meta, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": _f32(_get(meta, f"{arch}.rope.freq_base", 10000.0)),
        "max_position_embeddings": _get(meta, f"{arch}.context_length", 2048),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "torch_dtype": "float32",
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
    }
    if arch in OWN_TABLES:  # DeepSeek-V3 / K2 and GPT-OSS: their own keys and tables
        return arch_config(meta, tensor_names, vocab_size, d, _get, _f32)
    value_length = _get(meta, f"{arch}.attention.value_length", d["head_dim"])
    if value_length != d["head_dim"]:
        raise ValueError(f"{arch}: value heads of {value_length} with key heads of {d['head_dim']} are not supported")
    rope_dims = _get(meta, f"{arch}.rope.dimension_count", d["head_dim"])
    if rope_dims != d["head_dim"]:
        raise ValueError(f"{arch}: RoPE on {rope_dims} of {d['head_dim']} head dimensions is not supported")
    scaling = _get(meta, f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"{arch}: RoPE scaling {scaling!r} in a GGUF is not supported yet")
    if experts:
        d["num_experts" if model_type != "mixtral" else "num_local_experts"] = experts
        d["num_experts_per_tok"] = _get(meta, f"{arch}.expert_used_count", required=True)
        if model_type != "mixtral":
            d["moe_intermediate_size"] = _get(meta, f"{arch}.expert_feed_forward_length", required=True)
        if model_type == "qwen3_moe":
            d["norm_topk_prob"] = True  # llama.cpp always renormalizes Qwen3-MoE's chosen experts
        # layers without a router are dense (Qwen's mlp_only_layers, decoder_sparse_step)
        d["mlp_only_layers"] = [i for i in range(d["num_hidden_layers"]) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names]
        if model_type == "mixtral" and d["mlp_only_layers"]:
            raise ValueError(f"{arch}: dense layers among experts are not supported for Mixtral")
        if model_type == "qwen2_moe":
            d["shared_expert_intermediate_size"] = _get(meta, f"{arch}.expert_shared_feed_forward_length", 0)
    return d


def _llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float,
                    original: float) -> list[float]:
    """llama.cpp's ``rope_freqs`` for a llama3 RoPE scaling: each frequency's divisor."""
    out = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * theta ** (i / head_dim)
        if wavelength < original / high:
            out.append(1.0)
        elif wavelength > original / low:
            out.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return out


def llama3_rope_scaling(factors: list[float], head_dim: int, theta: float) -> dict[str, Any] | None:
    """The llama3 RoPE scaling whose per-frequency divisors are ``factors`` (llama.cpp's ``rope_freqs``
    tensor; ``low_freq_factor`` 1 as in every Llama 3 release), or None where none matches."""
    if not factors or max(factors) <= 1:
        return None
    factor = float(max(factors))
    candidates = [(1.0, 4.0, 8192.0)]
    wavelengths = [2 * math.pi * theta ** (i / head_dim) for i in range(0, head_dim, 2)]
    # in the band between, smooth = original / wavelength * 1/(high-low) - low/(high-low): fit the line
    band = [((1 / f - 1 / factor) / (1 - 1 / factor), w) for f, w in zip(factors, wavelengths, strict=False)
            if 1 + 1e-6 < f < factor * (1 - 1e-6)]
    if band:  # Llama 3's high_freq_factor 4, the original context from one point of the band
        smooth, wavelength = band[0]
        candidates.insert(0, (1.0, 4.0, float(round(wavelength * (3 * smooth + 1)))))
    if len(band) >= 2:
        (s1, w1), (s2, w2) = band[0], band[-1]
        if w1 != w2:
            slope = (s1 - s2) / (1 / w1 - 1 / w2)
            intercept = s1 - slope / w1
            if intercept < 0:
                high = round(1 - 1 / intercept, 3)
                candidates.insert(0, (1.0, high, float(round(slope * (high - 1)))))
    for low, high, original in candidates:
        want = _llama3_factors(head_dim, theta, factor, low, high, original)
        if all(abs(a - b) <= 1e-4 * b for a, b in zip(want, factors, strict=False)) and len(want) == len(factors):
            return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                    "high_freq_factor": high, "original_max_position_embeddings": int(original)}
    return None
