"""What Multi-head Latent Attention's cache costs per token and layer, against keys and values kept per head.

    python bench/bench_mla_cache.py

An MLA block keeps the compressed latent (``kv_lora_rank``) and the rotated key part
(``qk_rope_head_dim``) of each token, shared by all heads; keeping the expanded keys
(``qk_nope_head_dim + qk_rope_head_dim`` per head) and values (``v_head_dim`` per head) instead would
take ``heads * (qk_head_dim + v_head_dim)`` numbers. The configs are the published DeepSeek-V3 (671B)
and Kimi K2 ``config.json`` values; the MLA sizes come from the cache code itself (``cache_bytes``).
Nothing is downloaded.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import table  # noqa: E402
from homeswarm.model import ModelConfig, cache_bytes  # noqa: E402

_COMMON: dict[str, Any] = dict(
    num_hidden_layers=61, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
    kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
    num_experts_per_tok=8, n_shared_experts=1, norm_topk_prob=True, rms_norm_eps=1e-6, hidden_act="silu",
    scoring_func="sigmoid", topk_method="noaux_tc", tie_word_embeddings=False,
)
CONFIGS: dict[str, dict[str, Any]] = {
    "DeepSeek-V3 (671B)": dict(
        _COMMON, model_type="deepseek_v3", vocab_size=129280, num_attention_heads=128, num_key_value_heads=128,
        n_routed_experts=256, n_group=8, topk_group=4, first_k_dense_replace=3, routed_scaling_factor=2.5,
        max_position_embeddings=163840, rope_theta=10000,
        rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                      "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}),
    "Kimi K2": dict(
        _COMMON, model_type="kimi_k2", vocab_size=163840, num_attention_heads=64, num_key_value_heads=64,
        n_routed_experts=384, n_group=1, topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.827,
        max_position_embeddings=131072, rope_theta=50000.0,
        rope_scaling={"type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096, "beta_fast": 1.0,
                      "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}),
}
SESSION_TOKENS = 32768


def main() -> None:
    rows = []
    for name, raw in CONFIGS.items():
        config = ModelConfig.from_dict(raw)
        assert config.mla is not None
        expanded_values = config.num_attention_heads * (config.mla.qk_head_dim + config.mla.v_head_dim)
        for dtype in (torch.bfloat16, torch.float32):
            size = torch.empty((), dtype=dtype).element_size()
            mla = cache_bytes(config, 1, 1, 1, dtype)
            expanded = expanded_values * size
            session = cache_bytes(config, config.num_hidden_layers, 1, SESSION_TOKENS, dtype)
            rows.append([name, str(dtype).removeprefix("torch."), mla // size, mla, expanded, f"{expanded / mla:.1f}x",
                         f"{session / 2**30:.2f}", f"{SESSION_TOKENS * config.num_hidden_layers * expanded / 2**30:.1f}"])
    print(table(["model", "dtype", "MLA values", "MLA bytes", "expanded K+V bytes", "ratio",
                 f"MLA GiB, {SESSION_TOKENS} tokens x all layers", "expanded GiB, same"], rows))


if __name__ == "__main__":
    main()
