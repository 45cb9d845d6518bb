"""DeepSeek-V3 / Kimi K2 (GGUF ``deepseek2``) and GPT-OSS (``gpt-oss``) in a GGUF: their config and tensors.

Responsibility: the ``config.json`` each architecture's metadata stands for (:func:`arch_config`), and
for each Hugging Face name of its blocks the llama.cpp tensors that hold it and how they are laid out
(:func:`sources`), as llama.cpp's converter writes them: DeepSeek's ``kv_b_proj`` split per head into
``attn_k_b`` (transposed) and ``attn_v_b`` (older files: one ``attn_kv_b``), the router's score
correction as ``exp_probs_b.bias``; GPT-OSS's interleaved ``gate_up_proj`` [E, H, 2I] split into
``ffn_gate_exps`` and ``ffn_up_exps`` [E, I, H] (and their biases), ``down_proj`` [E, I, H] transposed.
:func:`shape` and :func:`read` put such parts back into the Hugging Face tensor.

Invariants: neither architecture's rows are permuted (llama.cpp's deepseek2 rotates interleaved pairs,
which is DeepSeek's own layout; GPT-OSS rotates halves). What a GGUF cannot say is fixed to what every
release of the family has and stated here: DeepSeek's ``mscale`` equals ``mscale_all_dim`` (llama.cpp
stores only the latter), GPT-OSS's SwiGLU limit is 7 and its YaRN is not truncated. A softmax-routed
deepseek2 file (DeepSeek-V2) is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_DENSE = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.o_proj.weight": "attn_output.weight", "mlp.gate_proj.weight": "ffn_gate.weight",
          "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight"}
# Hugging Face block-relative name -> (layout, llama.cpp tensors) alternatives, the first whose tensors
# the file holds being read
_TABLES: dict[str, dict[str, list[tuple[str, tuple[str, ...]]]]] = {
    "deepseek2": {
        **{hf: [("plain", (g,))] for hf, g in _DENSE.items()},
        "self_attn.q_proj.weight": [("plain", ("attn_q.weight",))],
        "self_attn.q_a_proj.weight": [("plain", ("attn_q_a.weight",))],
        "self_attn.q_a_layernorm.weight": [("plain", ("attn_q_a_norm.weight",))],
        "self_attn.q_b_proj.weight": [("plain", ("attn_q_b.weight",))],
        "self_attn.kv_a_proj_with_mqa.weight": [("plain", ("attn_kv_a_mqa.weight",))],
        "self_attn.kv_a_layernorm.weight": [("plain", ("attn_kv_a_norm.weight",))],
        "self_attn.kv_b_proj.weight": [("plain", ("attn_kv_b.weight",)),
                                       ("kv_b", ("attn_k_b.weight", "attn_v_b.weight"))],
        "mlp.gate.weight": [("plain", ("ffn_gate_inp.weight",))],
        "mlp.gate.e_score_correction_bias": [("plain", ("exp_probs_b.bias",))],
        "mlp.shared_experts.gate_proj.weight": [("plain", ("ffn_gate_shexp.weight",))],
        "mlp.shared_experts.up_proj.weight": [("plain", ("ffn_up_shexp.weight",))],
        "mlp.shared_experts.down_proj.weight": [("plain", ("ffn_down_shexp.weight",))],
        "mlp.experts.gate_up_proj": [("rows", ("ffn_gate_exps.weight", "ffn_up_exps.weight"))],
        "mlp.experts.down_proj": [("plain", ("ffn_down_exps.weight",))],
    },
    "gpt-oss": {
        "input_layernorm.weight": [("plain", ("attn_norm.weight",))],
        "post_attention_layernorm.weight": [("plain", ("post_attention_norm.weight",))],
        **{f"self_attn.{p}_proj.{k}": [("plain", (f"attn_{g}.{k}",))]
           for p, g in (("q", "q"), ("k", "k"), ("v", "v"), ("o", "output")) for k in ("weight", "bias")},
        "self_attn.sinks": [("plain", ("attn_sinks.weight",))],
        "mlp.router.weight": [("plain", ("ffn_gate_inp.weight",))],
        "mlp.router.bias": [("plain", ("ffn_gate_inp.bias",))],
        "mlp.experts.gate_up_proj": [("oss_gate_up", ("ffn_gate_exps.weight", "ffn_up_exps.weight"))],
        "mlp.experts.gate_up_proj_bias": [("oss_gate_up_bias", ("ffn_gate_exps.bias", "ffn_up_exps.bias"))],
        "mlp.experts.down_proj": [("oss_down", ("ffn_down_exps.weight",))],
        "mlp.experts.down_proj_bias": [("plain", ("ffn_down_exps.bias",))],
    },
}
ARCHITECTURES = {"deepseek2": "deepseek_v3", "gpt-oss": "gpt_oss"}
_SIGMOID = 2  # llama.cpp's expert_gating_func


def sources(arch: str, layer: int, key: str, present: set[str] | dict[str, Any]) -> tuple[str, list[str]] | None:
    """(layout, llama.cpp names) holding block ``layer``'s ``key`` (a Hugging Face block-relative name) in
    a file of ``arch`` whose tensors are ``present``, or None."""
    for layout, parts in _TABLES[arch].get(key, ()):
        names = [f"blk.{layer}.{p}" for p in parts]
        if all(n in present for n in names):
            return layout, names
    return None


def block_keys(arch: str) -> list[str]:
    """Every Hugging Face block-relative name a file of ``arch`` may hold."""
    return list(_TABLES[arch])


def shape(layout: str, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
    """The Hugging Face shape of parts of ``shapes`` (torch's order) in ``layout``."""
    first = shapes[0]
    if layout == "plain":
        return first
    if layout == "rows":  # stacks [E, rows, cols] one after the other along rows
        return (first[0], sum(s[1] for s in shapes), *first[2:])
    if layout == "kv_b":  # k_b [H, lora, nope] and v_b [H, v, lora] -> [H * (nope + v), lora]
        heads, lora, nope = first
        return (heads * (nope + shapes[1][1]), lora)
    if layout == "oss_gate_up":  # [E, I, H] twice -> [E, H, 2I]
        return (first[0], first[2], 2 * first[1])
    if layout == "oss_gate_up_bias":  # [E, I] twice -> [E, 2I]
        return (first[0], 2 * first[1])
    if layout == "oss_down":  # [E, H, I] -> [E, I, H]
        return (first[0], first[2], first[1])
    raise ValueError(f"unknown GGUF tensor layout {layout!r}")


def read(layout: str, parts: list[Any], out: Tensor, convert: Callable[[Any, Tensor, Any], None],
         data: Callable[[Any], Any]) -> None:
    """Read ``parts`` (GGUF tensors) in ``layout`` into ``out``: ``convert(t, target, rows)`` converts
    tensor ``t`` (or ``rows``, a part of ``data(t)``) into ``target``; a transposed part goes through a
    float32 buffer one expert (or one head) at a time, so no whole stack is held twice."""
    if layout == "plain":
        convert(parts[0], out, None)
    elif layout == "rows":
        begin = 0
        for t in parts:
            rows = int(t.shape[1])  # GGML's order: [columns, rows, experts]
            stack = data(t)
            for e in range(out.shape[0]):  # expert by expert: each target is contiguous
                convert(t, out[e, begin : begin + rows], stack[e])
            begin += rows
    elif layout == "kv_b":
        k_b, v_b = parts
        heads, lora, nope = (int(d) for d in reversed(k_b.shape))
        v_dim = int(v_b.shape[1])
        per_head = out.view(heads, nope + v_dim, lora)
        k_data, v_data = data(k_b), data(v_b)
        for h in range(heads):
            buffer = torch.empty(lora, nope)
            convert(k_b, buffer, k_data[h])
            per_head[h, :nope].copy_(buffer.t())
            convert(v_b, per_head[h, nope:], v_data[h])
    elif layout in ("oss_gate_up", "oss_down"):
        for offset, t in enumerate(parts):  # gate at even columns, up at odd ones
            stack = data(t)
            rows, cols = int(t.shape[1]), int(t.shape[0])
            for e in range(out.shape[0]):
                buffer = torch.empty(rows, cols)
                convert(t, buffer, stack[e])
                target = out[e, :, offset::2] if layout == "oss_gate_up" else out[e]
                target.copy_(buffer.t())
    elif layout == "oss_gate_up_bias":
        for offset, t in enumerate(parts):
            buffer = torch.empty(int(t.shape[1]), int(t.shape[0]))
            convert(t, buffer, None)
            out[:, offset::2].copy_(buffer)
    else:
        raise ValueError(f"unknown GGUF tensor layout {layout!r}")


def _yarn(meta: dict[str, Any], arch: str, get: Callable[..., Any], f32: Callable[[Any], float]) -> dict[str, Any]:
    """The YaRN scaling of the file's ``rope.scaling.*``, or none."""
    theta = f32(get(meta, f"{arch}.rope.freq_base", 10000.0))
    scaling = get(meta, f"{arch}.rope.scaling.type", "none")
    if scaling in ("none", None):
        return {"rope_type": "default", "rope_theta": theta}
    if scaling != "yarn":
        raise ValueError(f"{arch}: RoPE scaling {scaling!r} in a GGUF is not supported")
    return {"rope_type": "yarn", "rope_theta": theta,
            "factor": f32(get(meta, f"{arch}.rope.scaling.factor", required=True)),
            "original_max_position_embeddings": get(meta, f"{arch}.rope.scaling.original_context_length", required=True),
            "beta_fast": f32(get(meta, f"{arch}.rope.scaling.yarn_beta_fast", 32.0)),
            "beta_slow": f32(get(meta, f"{arch}.rope.scaling.yarn_beta_slow", 1.0))}


def arch_config(meta: dict[str, Any], tensor_names: set[str], vocab_size: int, common: dict[str, Any],
                get: Callable[..., Any], f32: Callable[[Any], float]) -> dict[str, Any]:
    """The ``config.json`` of a ``deepseek2`` or ``gpt-oss`` file: ``common`` (the keys every architecture
    shares, from :func:`.gguf_names.config_dict`) and its own; ``get(meta, key, default, required=)`` and
    ``f32`` read metadata values as :mod:`.gguf_names` does."""
    arch = meta["general.architecture"]
    d = {**common, "model_type": ARCHITECTURES[arch]}
    rope = _yarn(meta, arch, get, f32)
    if arch == "gpt-oss":
        rope["truncate"] = False  # GPT-OSS's YaRN keeps the fractional correction range (its config says so)
        return {**d, "head_dim": get(meta, f"{arch}.attention.key_length", required=True),
                "intermediate_size": get(meta, f"{arch}.expert_feed_forward_length", required=True),
                "num_local_experts": get(meta, f"{arch}.expert_count", required=True),
                "num_experts_per_tok": get(meta, f"{arch}.expert_used_count", required=True),
                "sliding_window": get(meta, f"{arch}.attention.sliding_window", required=True),
                "attention_bias": True, "rope_parameters": rope, "swiglu_limit": 7.0}
    if get(meta, f"{arch}.expert_gating_func", None) != _SIGMOID:
        raise ValueError(f"{arch}: only sigmoid-routed files (DeepSeek-V3, Kimi K2) are supported; this one "
                         "routes by softmax (DeepSeek-V2) or does not say")
    rope_dim = get(meta, f"{arch}.rope.dimension_count", required=True)
    heads = d["num_attention_heads"]
    if f"{arch}.attention.key_length_mla" in meta:  # the MQA form: key/value lengths are the latent's
        nope = get(meta, f"{arch}.attention.key_length_mla") - rope_dim
        v_dim = get(meta, f"{arch}.attention.value_length_mla", required=True)
    else:
        nope = get(meta, f"{arch}.attention.key_length", required=True) - rope_dim
        v_dim = get(meta, f"{arch}.attention.value_length", required=True)
    log_mul = get(meta, f"{arch}.rope.scaling.yarn_log_multiplier", None)
    if rope["rope_type"] == "yarn" and log_mul:  # 0.1 * mscale_all_dim; mscale equal to it in every release
        rope["mscale"] = rope["mscale_all_dim"] = round(f32(log_mul) / 0.1, 6)
    mtp = get(meta, f"{arch}.nextn_predict_layers", 0) or 0  # multi-token prediction layers: not the model's
    q_lora = get(meta, f"{arch}.attention.q_lora_rank", None) if "blk.0.attn_q_a.weight" in tensor_names else None
    return {**d, "num_hidden_layers": d["num_hidden_layers"] - mtp, "num_key_value_heads": heads,
            "head_dim": rope_dim, "moe_intermediate_size": get(meta, f"{arch}.expert_feed_forward_length", required=True),
            "n_routed_experts": get(meta, f"{arch}.expert_count", required=True),
            "num_experts_per_tok": get(meta, f"{arch}.expert_used_count", required=True),
            "n_shared_experts": get(meta, f"{arch}.expert_shared_count", required=True),
            "first_k_dense_replace": get(meta, f"{arch}.leading_dense_block_count", 0),
            "n_group": get(meta, f"{arch}.expert_group_count", 1),
            "topk_group": get(meta, f"{arch}.expert_group_used_count", 1),
            "norm_topk_prob": bool(get(meta, f"{arch}.expert_weights_norm", False)),
            "routed_scaling_factor": f32(get(meta, f"{arch}.expert_weights_scale", 1.0)),
            "q_lora_rank": q_lora, "kv_lora_rank": get(meta, f"{arch}.attention.kv_lora_rank", required=True),
            "qk_nope_head_dim": nope, "qk_rope_head_dim": rope_dim, "v_head_dim": v_dim,
            "rope_interleave": True, "rope_parameters": rope}
