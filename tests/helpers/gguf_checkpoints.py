"""Tiny GGUF files written from the random checkpoints of :mod:`.checkpoints`, as llama.cpp's converter
writes them: the ``gguf`` package's writer and tensor name map, llama's permuted Q/K rows, norms in F32,
matrices in the type asked for (F32, F16, Q8_0, Q4_0 ...), and optionally a tokenizer and chat template.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors.numpy import load_file

_ARCH = {"llama2": "llama", "llama3": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
         "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe", "mixtral": "llama"}
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$")
# per-expert matrices -> llama.cpp's stacked tensors (Mixtral's w1/w3/w2 are gate/up/down)
_STACKS = {"gate_proj": "ffn_gate_exps", "w1": "ffn_gate_exps", "up_proj": "ffn_up_exps", "w3": "ffn_up_exps",
           "down_proj": "ffn_down_exps", "w2": "ffn_down_exps"}
_QTYPES = {"F32": gguf.GGMLQuantizationType.F32, "F16": gguf.GGMLQuantizationType.F16,
           "BF16": gguf.GGMLQuantizationType.BF16,
           "Q8_0": gguf.GGMLQuantizationType.Q8_0, "Q4_0": gguf.GGMLQuantizationType.Q4_0,
           "Q4_1": gguf.GGMLQuantizationType.Q4_1, "Q4_K": gguf.GGMLQuantizationType.Q4_K}
_FILE_TYPES = {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
               "BF16": gguf.LlamaFileType.MOSTLY_BF16,
               "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
               "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1, "Q4_K": gguf.LlamaFileType.MOSTLY_Q4_K_M}


def quantize_q4_k(data: np.ndarray) -> np.ndarray:
    """``data`` float32 ``[..., K]`` (K a multiple of 256) as Q4_K's bytes ``[..., K / 256 * 144]`` (the
    ``gguf`` package reads Q4_K but does not write it): per super-block float16 ``d`` and ``dmin``, 6-bit
    scales and mins of its 8 groups of 32 packed in 12 bytes, then the 4-bit values, 4 runs of 32 bytes
    each holding two groups (low nibbles, high nibbles). A plain min/max fit: llama.cpp's search is not
    needed to test reading."""
    shape = data.shape
    groups = data.reshape(-1, 8, 32).astype(np.float32)
    low = np.minimum(groups.min(axis=-1), 0)  # [blocks, 8]: Q4_K's mins are subtracted, never added
    span = (groups.max(axis=-1) - low) / 15
    d = (span.max(axis=-1) / 63).astype(np.float16)  # [blocks]
    dmin = (-low.min(axis=-1) / 63).astype(np.float16)
    df, dminf = d.astype(np.float32)[:, None], dmin.astype(np.float32)[:, None]
    sc = np.where(df > 0, np.round(span / np.where(df > 0, df, 1)), 0).clip(0, 63).astype(np.uint8)
    mn = np.where(dminf > 0, np.round(-low / np.where(dminf > 0, dminf, 1)), 0).clip(0, 63).astype(np.uint8)
    scale, offset = (df * sc)[..., None], (dminf * mn)[..., None]
    q = np.where(scale > 0, np.round((groups + offset) / np.where(scale > 0, scale, 1)), 0).clip(0, 15).astype(np.uint8)
    packed = np.concatenate([sc[:, :4] | ((sc[:, 4:] >> 4) << 6), mn[:, :4] | ((mn[:, 4:] >> 4) << 6),
                             (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)], axis=-1)
    q = q.reshape(-1, 4, 2, 32)
    nibbles = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(-1, 128)
    blocks = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), packed, nibbles],
                            axis=-1)
    return blocks.reshape(*shape[:-1], shape[-1] // 256 * 144)


def _permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's ``LlamaModel.permute``: each head's rotary halves interleaved."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def byte_level_tokenizer(extra_merges: int = 40) -> dict[str, Any]:
    """A byte-level BPE vocabulary (``gpt2``) of 256 bytes, some merges, a control and a user-defined
    token: ``tokenizer.ggml.*`` values."""
    from homeswarm.model.gguf_tokenizer import _bytes_to_unicode

    spelled = _bytes_to_unicode()
    tokens = [spelled[b] for b in range(256)]
    merges = []
    for pair in ("Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "r e", "Ġ s", "a t", "Ġ w", "Ġ o",
                 "e n", "i s", "Ġ b", "Ġ c", "o u", "e d", "Ġ f", "Ġ m", "Ġ p", "i t", "a n", "o r")[:extra_merges]:
        a, b = pair.split(" ")
        merges.append(pair)
        tokens.append(a + b)
    tokens += ["<|endoftext|>", "<think>"]
    types = [1] * (len(tokens) - 2) + [3, 4]
    return {"model": "gpt2", "pre": "qwen2", "tokens": tokens, "merges": merges, "token_type": types,
            "eos": len(tokens) - 2, "bos": len(tokens) - 2, "add_bos": False}


def sentencepiece_tokenizer() -> dict[str, Any]:
    """A SentencePiece BPE vocabulary (``llama``): unk, bos, eos, 256 byte tokens, scored pieces."""
    pieces = ["▁", "t", "h", "e", "a", "o", "n", "s", "i", "r", "▁t", "he", "▁the", "in", "er", "on", "▁a",
              "re", "at", "▁s", "▁w", "en", "is", "it", "an", "or", "▁o", "▁b", "ou", "ed"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * (3 + 256) + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return {"model": "llama", "tokens": tokens, "scores": scores, "token_type": types, "bos": 1, "eos": 2,
            "unk": 0, "add_bos": True}


def write_gguf(checkpoint: str | Path, path: str | Path, family: str, qtype: str = "F32", *,
               tokenizer: dict[str, Any] | None = None, chat_template: str | None = None,
               split_max_tensors: int = 0, promoted: dict[str, str] | None = None) -> Path:
    """Write the float32 checkpoint folder ``checkpoint`` (of test ``family``) as a GGUF at ``path``; return
    the path of its (first) file."""
    file_qtype = qtype
    checkpoint, path = Path(checkpoint), Path(path)
    config = json.loads((checkpoint / "config.json").read_text())
    arch = _ARCH[family]
    n_layers, heads, kv_heads = config["num_hidden_layers"], config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(path, arch, split_max_tensors=split_max_tensors)
    writer.add_block_count(n_layers)
    writer.add_vocab_size(config["vocab_size"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    rope = config.get("rope_parameters") or {"rope_theta": config.get("rope_theta"), "rope_type": "default"}
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_file_type(_FILE_TYPES[qtype])
    experts = config.get("num_experts") or config.get("num_local_experts")
    if experts:
        writer.add_expert_count(experts)
        writer.add_expert_used_count(config["num_experts_per_tok"])
        if "moe_intermediate_size" in config:
            writer.add_expert_feed_forward_length(config["moe_intermediate_size"])
        if config.get("shared_expert_intermediate_size"):
            writer.add_expert_shared_feed_forward_length(config["shared_expert_intermediate_size"])
    if tokenizer is not None:
        writer.add_tokenizer_model(tokenizer["model"])
        if "pre" in tokenizer:
            writer.add_tokenizer_pre(tokenizer["pre"])
        writer.add_token_list(tokenizer["tokens"])
        writer.add_token_types(tokenizer["token_type"])
        if "scores" in tokenizer:
            writer.add_token_scores(tokenizer["scores"])
        if "merges" in tokenizer:
            writer.add_token_merges(tokenizer["merges"])
        writer.add_bos_token_id(tokenizer["bos"])
        writer.add_eos_token_id(tokenizer["eos"])
        if "unk" in tokenizer:
            writer.add_unk_token_id(tokenizer["unk"])
        writer.add_add_bos_token(tokenizer["add_bos"])
    if chat_template is not None:
        writer.add_chat_template(chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_layers)
    dense = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_layers)  # a MoE's dense layers, as llama.cpp names them
    tensors = load_file(checkpoint / "model.safetensors")
    if rope.get("rope_type") == "llama3":  # llama.cpp stores the scaling as each frequency's divisor
        from homeswarm.model.gguf_names import _llama3_factors

        factors = _llama3_factors(head_dim, rope["rope_theta"], rope["factor"], rope["low_freq_factor"],
                                  rope["high_freq_factor"], rope["original_max_position_embeddings"])
        writer.add_tensor("rope_freqs.weight", np.array(factors, dtype=np.float32))
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for hf_name in [n for n in tensors if _EXPERT.match(n)]:
        layer, expert, part = _EXPERT.match(hf_name).groups()  # type: ignore[union-attr]
        stacks.setdefault(f"blk.{layer}.{_STACKS[part]}.weight", {})[int(expert)] = tensors.pop(hf_name)
    for name, parts in stacks.items():
        tensors[name] = np.stack([parts[e] for e in range(len(parts))])
    for hf_name, data in sorted(tensors.items()):
        name = hf_name if hf_name.startswith("blk.") else (names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
                                                            or dense.get_name(hf_name, try_suffixes=(".weight", ".bias")))
        assert name is not None, hf_name
        if arch == "llama" and name.endswith(("attn_q.weight", "attn_q.bias")):
            data = _permute(data, heads)
        elif arch == "llama" and name.endswith(("attn_k.weight", "attn_k.bias")):
            data = _permute(data, kv_heads)
        data = np.ascontiguousarray(data, dtype=np.float32)
        # ``promoted``: a type per tensor name ending (``attn_v.weight``), as llama.cpp's mixes raise some
        qtype = next((t for end, t in (promoted or {}).items() if name.endswith(end)), file_qtype)
        if data.ndim == 1 or qtype == "F32":
            writer.add_tensor(name, data)
        elif qtype == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        elif qtype == "Q4_K":
            quantized = quantize_q4_k(data)
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=_QTYPES[qtype])
        else:
            quantized = gguf.quants.quantize(data, _QTYPES[qtype])
            writer.add_tensor(name, quantized, raw_shape=quantized.shape, raw_dtype=_QTYPES[qtype])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if split_max_tensors:
        return sorted(path.parent.glob(f"{path.stem}-00001-of-*.gguf"))[0]
    return path


def logits_against_transformers(model: Any, root: Path, path: Path, prompt: Any,
                                source: Path | None = None) -> tuple[Any, Any]:
    """(ours, transformers') float32 logits of ``prompt``: ``model`` (a LocalModel on the file) against transformers
    loading the GGUF file ``path`` from ``root``, with ``source``'s config where given (transformers reads no
    expert_feed_forward_length from a GGUF: the source's config, the file's weights)."""
    import torch
    import transformers

    config = transformers.AutoConfig.from_pretrained(source) if source is not None else None
    reference = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, config=config,
                                                                  dtype=torch.float32).eval()
    with torch.no_grad():
        return model.head.logits(model.forward(model.head.embed(prompt))), reference(prompt).logits

