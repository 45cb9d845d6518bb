"""Tiny DeepSeek-V3 / Kimi K2 (``deepseek2``) and GPT-OSS (``gpt-oss``) GGUF files, written from the random
checkpoints of :mod:`.deepseek_checkpoints` and :mod:`.gpt_oss_checkpoints` as llama.cpp's converter
writes them (its ``DeepseekV2Model`` and ``GptOssModel``): the ``gguf`` package's writer and tensor name
map, DeepSeek's ``kv_b_proj`` split per head into ``attn_k_b`` (transposed) and ``attn_v_b`` (or kept whole
as ``attn_kv_b``, as older files have it), GPT-OSS's interleaved ``gate_up_proj`` split into gate and up
stacks and transposed, and its MXFP4 experts repacked from the hub's blocks into GGML's block layout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)_proj\.weight$")
_QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "Q8_0": gguf.GGMLQuantizationType.Q8_0,
           "Q4_0": gguf.GGMLQuantizationType.Q4_0}


def _add(writer: gguf.GGUFWriter, name: str, data: np.ndarray, qtype: str) -> None:
    data = np.ascontiguousarray(data, dtype=np.float32)
    # rows not a whole number of 32-blocks stay F32, as llama.cpp falls back for them
    if (data.ndim == 1 or qtype == "F32" or data.shape[-1] % 32
            or name.endswith(("_norm.weight", ".bias", "attn_sinks.weight"))):
        writer.add_tensor(name, data)
    else:
        quantized = gguf.quants.quantize(data, _QTYPES[qtype])
        writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=_QTYPES[qtype])


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _common(writer: gguf.GGUFWriter, config: dict, rope: dict) -> None:
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_beta_fast(rope["beta_fast"])
        writer.add_rope_scaling_yarn_beta_slow(rope["beta_slow"])


def write_deepseek_gguf(checkpoint: str | Path, path: str | Path, qtype: str = "F32", *,
                        split_kv_b: bool = True) -> Path:
    """Write the float32 DeepSeek-V3 / Kimi K2 checkpoint folder ``checkpoint`` as a ``deepseek2`` GGUF."""
    checkpoint, path = Path(checkpoint), Path(path)
    config = json.loads((checkpoint / "config.json").read_text())
    rope = config["rope_parameters"]
    writer = gguf.GGUFWriter(path, "deepseek2")
    _common(writer, config, rope)
    heads, kv_lora, rope_dim = config["num_attention_heads"], config["kv_lora_rank"], config["qk_rope_head_dim"]
    nope, v_dim = config["qk_nope_head_dim"], config["v_head_dim"]
    writer.add_head_count_kv(1)  # MLA as llama.cpp's MQA over the latent
    writer.add_key_length(kv_lora + rope_dim)
    writer.add_value_length(kv_lora)
    writer.add_key_length_mla(nope + rope_dim)
    writer.add_value_length_mla(v_dim)
    writer.add_rope_dimension_count(rope_dim)
    writer.add_leading_dense_block_count(config["first_k_dense_replace"])
    if config.get("q_lora_rank") is not None:
        writer.add_q_lora_rank(config["q_lora_rank"])
    writer.add_kv_lora_rank(kv_lora)
    writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
    writer.add_expert_count(config["n_routed_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_expert_shared_count(config["n_shared_experts"])
    writer.add_expert_group_count(config["n_group"])
    writer.add_expert_group_used_count(config["topk_group"])
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    writer.add_expert_weights_scale(config["routed_scaling_factor"])
    if config["norm_topk_prob"]:
        writer.add_expert_weights_norm(True)
    if rope.get("mscale_all_dim") is not None:
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.DEEPSEEK2, config["num_hidden_layers"])
    tensors = load_file(checkpoint / "model.safetensors")
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for hf_name in [n for n in tensors if _EXPERT.match(n)]:
        layer, expert, part = _EXPERT.match(hf_name).groups()  # type: ignore[union-attr]
        stacks.setdefault(f"blk.{layer}.ffn_{part}_exps.weight", {})[int(expert)] = tensors.pop(hf_name)
    for name, parts in stacks.items():
        _add(writer, name, np.stack([parts[e] for e in range(len(parts))]), qtype)
    for hf_name, data in sorted(tensors.items()):
        if hf_name.endswith("e_score_correction_bias"):
            _add(writer, f"blk.{hf_name.split('.')[2]}.exp_probs_b.bias", data, qtype)
        elif hf_name.endswith("kv_b_proj.weight") and split_kv_b:
            kv_b = data.reshape(heads, nope + v_dim, kv_lora)
            prefix = names.get_name(hf_name, try_suffixes=(".weight",)).removesuffix("attn_kv_b.weight")
            _add(writer, prefix + "attn_k_b.weight", kv_b[:, :nope].transpose(0, 2, 1), qtype)
            _add(writer, prefix + "attn_v_b.weight", kv_b[:, nope:], qtype)
        else:
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            assert name is not None, hf_name
            _add(writer, name, data, qtype)
    _finish(writer)
    return path


def _ggml_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """The hub's MXFP4 (``blocks`` [..., groups, 16]: element 2j low nibble, 2j + 1 high; ``scales`` [...,
    groups]) as GGML's blocks (a scale byte, then 16 bytes: element j low nibble, j + 16 high), as
    llama.cpp's ``repack_mxfp4`` does."""
    codes = np.stack((blocks & 15, blocks >> 4), axis=-1).reshape(*blocks.shape[:-1], 32)
    packed = codes[..., :16] | (codes[..., 16:] << 4)
    out = np.concatenate((scales[..., None], packed), axis=-1)
    return out.reshape(*out.shape[:-2], -1).astype(np.uint8)


def write_gpt_oss_gguf(checkpoint: str | Path, path: str | Path, *, mxfp4_from: str | Path | None = None) -> Path:
    """Write the float32 GPT-OSS checkpoint folder ``checkpoint`` as a ``gpt-oss`` GGUF; with ``mxfp4_from``
    (the same model as the hub stores it, :func:`.gpt_oss_checkpoints.make_mxfp4_checkpoint`), its experts'
    MXFP4 blocks and scales are repacked into the file as llama.cpp does, every other tensor F32."""
    checkpoint, path = Path(checkpoint), Path(path)
    config = json.loads((checkpoint / "config.json").read_text())
    writer = gguf.GGUFWriter(path, "gpt-oss")
    _common(writer, config, config["rope_parameters"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_key_length(config["head_dim"])
    writer.add_value_length(config["head_dim"])
    writer.add_sliding_window(config["sliding_window"])
    writer.add_expert_feed_forward_length(config["intermediate_size"])
    writer.add_expert_count(config["num_local_experts"])
    writer.add_expert_used_count(config["num_experts_per_tok"])
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE if mxfp4_from else gguf.LlamaFileType.ALL_F32)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT_OSS, config["num_hidden_layers"])
    tensors = load_file(checkpoint / "model.safetensors")
    hub = load_file(Path(mxfp4_from) / "model.safetensors") if mxfp4_from else {}
    for hf_name, data in sorted(tensors.items()):
        layer = hf_name.split(".")[2] if hf_name.startswith("model.layers.") else None
        if hf_name.endswith("experts.gate_up_proj_bias"):
            _add(writer, f"blk.{layer}.ffn_gate_exps.bias", data[..., ::2], "F32")
            _add(writer, f"blk.{layer}.ffn_up_exps.bias", data[..., 1::2], "F32")
        elif hf_name.endswith("experts.down_proj_bias"):
            _add(writer, f"blk.{layer}.ffn_down_exps.bias", data, "F32")
        elif hf_name.endswith("experts.gate_up_proj") and mxfp4_from:
            blocks, scales = hub[f"{hf_name}_blocks"], hub[f"{hf_name}_scales"]
            for part, offset in (("gate", 0), ("up", 1)):
                packed = _ggml_mxfp4(blocks[:, offset::2], scales[:, offset::2])
                writer.add_tensor(f"blk.{layer}.ffn_{part}_exps.weight", packed,
                                  raw_shape=packed.shape, raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        elif hf_name.endswith("experts.down_proj") and mxfp4_from:
            packed = _ggml_mxfp4(hub[f"{hf_name}_blocks"], hub[f"{hf_name}_scales"])
            writer.add_tensor(f"blk.{layer}.ffn_down_exps.weight", packed, raw_shape=packed.shape,
                              raw_dtype=gguf.GGMLQuantizationType.MXFP4)
        elif hf_name.endswith("experts.gate_up_proj"):  # [E, H, 2I], gate and up interleaved -> [E, I, H] each
            _add(writer, f"blk.{layer}.ffn_gate_exps.weight", data[..., ::2].transpose(0, 2, 1), "F32")
            _add(writer, f"blk.{layer}.ffn_up_exps.weight", data[..., 1::2].transpose(0, 2, 1), "F32")
        elif hf_name.endswith("experts.down_proj"):  # [E, I, H] -> [E, H, I]
            _add(writer, f"blk.{layer}.ffn_down_exps.weight", data.transpose(0, 2, 1), "F32")
        else:
            name = names.get_name(hf_name.replace("self_attn.sinks", "self_attn.sinks.weight"),
                                  try_suffixes=(".weight", ".bias"))
            assert name is not None, hf_name
            _add(writer, name, data, "F32")
    _finish(writer)
    return path
