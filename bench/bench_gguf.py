"""Q4_0 and Q4_K GGUF spans, held 4-bit as read, against the same float weights quantized by ``--quant int4``.

    python bench/bench_gguf.py [--rounds 9] [--steps 20] [--threads 0]

One Llama block of hidden 2048, MLP 5632, 32 heads, 4 key/value heads (bench_quant.py's block) with
random weights, written as a Q4_0 GGUF file and as a Q4_K one (llama.cpp's permuted Q/K rows, its block
layouts; Q4_K by the tests' plain min/max fit) and loaded as ``join-swarm FILE.gguf`` loads them; beside it the same float32 block, and that block quantized as
``--quant int4`` (groups of 32) quantizes it. A decoding step at batch 1 after a 128-token prefill, and
a 512-token prefill, timed in paired rounds (bench_quant.compare: the order rotates, the table gives
medians and the median of per-round ratios to float32).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_quant import block_config, compare, random_span  # noqa: E402
from homeswarm.model import load_span  # noqa: E402
from homeswarm.model.gguf_files import gguf_folder  # noqa: E402
from homeswarm.model.quant import quantize_block  # noqa: E402
from tests.helpers.gguf_checkpoints import quantize_q4_k  # noqa: E402

_NAMES = {"input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
          "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
          "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
          "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
          "mlp.down_proj.weight": "ffn_down.weight"}


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_q4(span: torch.nn.Module, path: Path, qtype: str = "Q4_0") -> None:
    """Block 0 of ``span`` as a one-block Q4_0 or Q4_K GGUF (a 256-token vocabulary: only the block is timed)."""
    config = span.config
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0 if qtype == "Q4_0" else gguf.LlamaFileType.MOSTLY_Q4_K_M)
    kind = gguf.GGMLQuantizationType[qtype]
    writer.add_tensor("token_embd.weight", np.zeros((256, config.hidden_size), dtype=np.float32))
    writer.add_tensor("output_norm.weight", np.ones(config.hidden_size, dtype=np.float32))
    for name, tensor in span.layers[0].state_dict().items():
        data = tensor.float().numpy()
        if name == "self_attn.q_proj.weight":
            data = _permute(data, config.num_attention_heads)
        elif name == "self_attn.k_proj.weight":
            data = _permute(data, config.num_key_value_heads)
        if data.ndim == 1:
            writer.add_tensor(f"blk.0.{_NAMES[name]}", data)
        else:
            data = np.ascontiguousarray(data)
            q = quantize_q4_k(data) if qtype == "Q4_K" else gguf.quants.quantize(data, kind)
            writer.add_tensor(f"blk.0.{_NAMES[name]}", q, raw_shape=q.shape, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    config = block_config(2048, 5632, 32, 4)
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        base = random_span(config, torch.float32)
        spans = {"float32": base,
                 "int4 g32 (--quant int4)": quantize_block(random_span(config, torch.float32), "int4", 32)}
        for qtype in ("Q4_0", "Q4_K"):
            write_q4(base, Path(tmp) / f"block-{qtype}.gguf", qtype)
            folder = gguf_folder(Path(tmp) / f"block-{qtype}.gguf", cache_dir=tmp)
            spans[f"GGUF {qtype}, held 4-bit"] = load_span(folder, 0, 1)
        compare(spans, args, "one Llama block, hidden 2048, MLP 5632")


if __name__ == "__main__":
    main()
