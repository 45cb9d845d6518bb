"""The weight format a node announces: --quant's, or what a pre-quantized checkpoint's span holds (4-bit
routed experts only: ``int4-experts``; more than those: ``int4``; none of them: ``none``); the record
carries it, and an exact client's planner routes around such nodes."""

from __future__ import annotations

import pytest

from homeswarm.model import ModelConfig
from homeswarm.model.weight_format import WEIGHT_FORMATS, weight_format
from homeswarm.routing.planner import QuantizedOnlyError, plan_exact_route, plan_route
from homeswarm.routing.records import QUANT_FORMATS, InvalidRecord, PeerId, ServerRecord, ServerState
from tests.helpers.prequant_checkpoints import EXPERTS_ONLY_IGNORE


def kimi(ignore: list[str] | None) -> ModelConfig:
    """A small Kimi K2 config (layer 0 dense, 1-2 MoE), 4-bit as compressed-tensors when ``ignore`` is given."""
    data = {"model_type": "kimi_k2", "hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
            "num_key_value_heads": 4, "vocab_size": 256, "intermediate_size": 160, "moe_intermediate_size": 32,
            "n_routed_experts": 8, "num_experts_per_tok": 2, "n_shared_experts": 1, "first_k_dense_replace": 1,
            "n_group": 1, "topk_group": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.827,
            "q_lora_rank": 64, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
            "rms_norm_eps": 1e-6, "max_position_embeddings": 1024, "rope_theta": 50000.0,
            "attention_bias": False, "tie_word_embeddings": False}
    if ignore is not None:
        data["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ignore,
            "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": None, "weights": {
                "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32,
                "dynamic": False, "actorder": None}}}}
    return ModelConfig.from_dict(data)


def test_formats_say_what_the_span_holds():
    experts_only, everything, plain = kimi(EXPERTS_ONLY_IGNORE), kimi(["lm_head"]), kimi(None)
    assert weight_format(experts_only, "none", 0, 3) == weight_format(experts_only, "none", 2, 3) == "int4-experts"
    assert weight_format(experts_only, "none", 0, 1) == "none"  # the dense first block: the checkpoint's floats
    assert weight_format(everything, "none", 0, 1) == weight_format(everything, "none", 1, 3) == "int4"
    assert weight_format(plain, "none", 0, 3) == "none"
    assert weight_format(plain, "int8", 0, 3) == weight_format(experts_only, "int8", 0, 1) == "int8"
    # --quant over 4-bit experts: the rest int8 or int4, the span's coarsest weights 4-bit
    assert weight_format(experts_only, "int8", 0, 3) == weight_format(experts_only, "int4", 1, 3) == "int4"
    assert weight_format(everything, "int8", 0, 3) == "int4"
    assert weight_format(plain, "int4", 1, 2) == "int4"
    with pytest.raises(ValueError, match="quantization"):
        weight_format(plain, "int3", 0, 1)
    assert set(WEIGHT_FORMATS) <= set(QUANT_FORMATS)  # every format it gives passes records' validation


def rec(peer: str, start: int, end: int, quant: str = "none", throughput: float = 100.0) -> ServerRecord:
    return ServerRecord(peer_id=PeerId(peer), address=f"{peer}.lan:31337", model="k2", start=start, end=end,
                        state=ServerState.ONLINE, protocol_version=1, dtype="bfloat16", throughput=throughput,
                        cache_tokens_left=10**6, quant=quant)


def test_a_node_of_4_bit_experts_announces_so_and_exact_routes_avoid_it():
    data = rec("k2-thinking", 0, 8, "int4-experts").to_dict()
    assert data["quant"] == "int4-experts"
    record = ServerRecord.from_dict(data)
    assert record.quant == "int4-experts" and not record.exact
    with pytest.raises(InvalidRecord, match="quant"):
        ServerRecord.from_dict({**data, "quant": "int4-everything"})
    records = [record.__class__(**{**record.__dict__, "throughput": 1000.0}), rec("a", 0, 4), rec("b", 4, 8)]
    assert [h.peer_id for h in plan_route(records, 0, 8)] == ["k2-thinking"]
    assert [(h.peer_id, h.start, h.end) for h in plan_exact_route(records, 0, 8)] == [("a", 0, 4), ("b", 4, 8)]
    with pytest.raises(QuantizedOnlyError, match=r"served only by quantized nodes \(int4-experts\)"):
        plan_exact_route([record, rec("a", 0, 4)], 0, 8, model="k2")
