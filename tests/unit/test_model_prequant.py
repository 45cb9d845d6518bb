"""Checkpoints shipped 4-bit (GPTQ, compressed-tensors pack-quantized), loaded without a float copy.

Each format, symmetric and asymmetric, is written from one tiny Llama checkpoint with its dequantized
twin beside it (tests/helpers/prequant_checkpoints.py); the span loaded from the packed tensors is
held against transformers on the twin. Every product dense and float32, it computes the twin's
weights exactly: hidden states within 1e-5 relative, greedy tokens equal. Through torch's kernel
(bfloat16 activations, as a node runs small batches) the rows stay within 5% (median 1-3% on these
random checkpoints, as for every int4 layer); through ours (homeswarm.model.kernels: activations
rounded to int8 in blocks of 32) within 8%, as test_model_quant.py holds every family's blocks
(measured 3.9-5.0% over the four formats). In memory: 4-bit values and 16-bit (symmetric) or
float32 (asymmetric) scales and zero points, counted exactly by span_weight_bytes. A Kimi K2 checkpoint
with its routed experts alone stored 4-bit (as Kimi K2 Thinking ships) is held to the same checks, and
under --quant int8|int4 its attention and shared expert are quantized beside the 4-bit experts.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from homeswarm.model import kernels, quant
from homeswarm.model.config import ModelConfig
from homeswarm.model.loader import load_head, load_span
from homeswarm.model.prequant import GPTQLinear, PackedInt4Linear, pack_int32, unpack_int32
from homeswarm.model.quant import QuantizedLinearInt4
from homeswarm.model.sizes import span_weight_bytes
from tests.helpers.checkpoints import make_checkpoint, reference_greedy, reference_model
from tests.helpers.prequant_checkpoints import FORMATS, write_prequantized
from tests.helpers.reference import last_hidden_states, rel_err

NUM_LAYERS = 4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("prequant")
    source = make_checkpoint(root / "float", "llama3", num_layers=NUM_LAYERS)
    return {fmt: write_prequantized(source, root / fmt, root / f"{fmt}-dequantized", fmt) for fmt in FORMATS}


def test_int32_packing_round_trips():
    values = torch.randint(0, 16, (16, 24), generator=torch.Generator().manual_seed(0))
    for dim in (0, 1):
        packed = pack_int32(values, dim)
        assert packed.dtype == torch.int32 and packed.shape[dim] * 8 == values.shape[dim]
        assert torch.equal(unpack_int32(packed, dim).long(), values)
    assert int(pack_int32(torch.tensor([[1, 0, 0, 0, 0, 0, 0, 15]]), 1)) == 1 - 2**32 + (15 << 28)


@pytest.mark.parametrize("fmt", FORMATS)
def test_packed_checkpoint_computes_its_dequantized_weights(fmt, checkpoints, monkeypatch):
    packed, plain = checkpoints[fmt]
    span, head = load_span(packed, 0, NUM_LAYERS), load_head(packed)
    layers = [m for m in span.modules() if isinstance(m, (GPTQLinear, PackedInt4Linear))]
    assert len(layers) == 7 * NUM_LAYERS
    assert not any(type(m) is nn.Linear for m in span.modules())
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    reference = reference_model(plain)
    want, _ = last_hidden_states(reference, ids)
    # through a kernel (ours, or torch's on bfloat16 activations) for the decoding steps, as a node runs
    cache = span.new_cache(2, 32)
    steps = [span(head.embed(ids[:, :26]), cache)] + [span(head.embed(ids[:, i : i + 1]), cache) for i in range(26, 30)]
    rows = (torch.cat(steps, 1) - want).norm(dim=-1) / want.norm(dim=-1)
    assert rows.max() < (0.08 if kernels.available() else 0.05), rows.max().item()
    # every product dense, float32: the dequantized weights themselves
    monkeypatch.setattr(quant, "_dense_bfloat16", False)
    monkeypatch.setattr(QuantizedLinearInt4, "kernel_max_rows", 0)
    assert rel_err(span(head.embed(ids)), want) < 1e-5
    prompt = ids[:, :10]
    expected = reference_greedy(plain, prompt, 16, reference)
    cache, got = span.new_cache(2, 26), prompt
    for i in range(16):
        hidden = span(head.embed(prompt if i == 0 else got[:, -1:]), cache)
        got = torch.cat([got, head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("fmt", FORMATS)
def test_memory_holds_4_bit_weights_only(fmt, checkpoints):
    packed, plain = checkpoints[fmt]
    config = ModelConfig.from_dir(packed)
    span = load_span(packed, 0, NUM_LAYERS)
    held = sum(t.numel() * t.element_size() for t in span.state_dict().values())
    assert held == span_weight_bytes(config, 0, NUM_LAYERS, torch.float32)
    float_held = sum(t.numel() * t.element_size() for t in load_span(plain, 0, NUM_LAYERS).state_dict().values())
    # groups of 32: 4 bits plus 2 x 16 (or 32) bits per 32 weights; norms stay float32
    assert held <= (0.2 if fmt.endswith("asym") else 0.16) * float_held
    for layer in span.modules():
        if isinstance(layer, (GPTQLinear, PackedInt4Linear)):
            assert layer.weight.dtype == torch.uint8
            assert layer.scales_and_zeros.element_size() == (4 if fmt.endswith("asym") else 2)


@pytest.mark.parametrize(("change", "message"), [
    ({"desc_act": True}, "desc_act"), ({"bits": 8}, "bits"), ({"group_size": 100}, "groups of 100"),
    ({"checkpoint_format": "marlin"}, "checkpoint_format"), ({"quant_method": "awq"}, "quant_method"),
])
def test_unreadable_gptq_forms_are_refused(change, message, checkpoints):
    config = json.loads((checkpoints["gptq"][0] / "config.json").read_text())
    config["quantization_config"].update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(config)


@pytest.mark.parametrize(("change", "message"), [
    ({"format": "float-quantized"}, "format"), ({"weights": {"num_bits": 8, "strategy": "group", "group_size": 32}},
                                                  "8-bit"),
    ({"weights": {"num_bits": 4, "strategy": "channel"}}, "channel"),
])
def test_unreadable_compressed_forms_are_refused(change, message, checkpoints):
    config = json.loads((checkpoints["compressed"][0] / "config.json").read_text())
    q = config["quantization_config"]
    if "weights" in change:
        q["config_groups"]["group_0"]["weights"] = change["weights"]
    else:
        q.update(change)
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(config)


def test_a_shuffled_group_index_is_refused(checkpoints, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    packed = tmp_path / "shuffled"
    shutil.copytree(checkpoints["gptq"][0], packed)
    tensors = load_file(str(packed / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.g_idx"
    tensors[name] = tensors[name].flip(0).contiguous()
    save_file(tensors, str(packed / "model.safetensors"))
    with pytest.raises(ValueError, match="g_idx"):
        load_span(packed, 0, 1)


def test_kimi_k2_with_4_bit_routed_experts(tmp_path, monkeypatch):
    from homeswarm.model.prequant import PrequantExperts
    from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint, reference_deepseek

    source = make_deepseek_checkpoint(tmp_path / "float", "kimi_k2", moe_intermediate_size=32)
    packed, plain = write_prequantized(source, tmp_path / "packed", tmp_path / "plain", "compressed",
                                       experts_only=True)
    span, head = load_span(packed, 0, NUM_LAYERS), load_head(packed)
    experts = [m for m in span.modules() if isinstance(m, PrequantExperts)]
    assert len(experts) == NUM_LAYERS - 1  # layer 0 is dense
    assert not any(isinstance(m, PackedInt4Linear) for name, m in span.named_modules() if ".experts." not in name)
    config = ModelConfig.from_dir(packed)
    params = sum(p.numel() * p.element_size() for p in span.parameters())
    buffers = sum(b.numel() * b.element_size() for m in span.modules() if isinstance(m, PackedInt4Linear)
                  for b in m.buffers(recurse=False))
    assert params + buffers == span_weight_bytes(config, 0, NUM_LAYERS, torch.float32)
    reference = reference_deepseek(plain)
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))
    want, _ = last_hidden_states(reference, ids)
    # through the kernel: a row whose router choice flips under bfloat16 rounding differs wholly, so
    # only the median holds (as for --quant int4 on MoE blocks)
    rows = (span(head.embed(ids)) - want).norm(dim=-1) / want.norm(dim=-1)
    assert rows.median() < 0.05, rows.median().item()
    monkeypatch.setattr(quant, "_dense_bfloat16", False)  # every product dense, float32
    monkeypatch.setattr(QuantizedLinearInt4, "kernel_max_rows", 0)
    assert rel_err(span(head.embed(ids)), want) < 1e-5
    prompt = ids[:1, :8]  # one row: the single-row path of the experts
    expected = reference_greedy(plain, prompt, 12, reference)
    cache, got = span.new_cache(1, 20), prompt
    for i in range(12):
        hidden = span(head.embed(prompt if i == 0 else got[:, -1:]), cache)
        got = torch.cat([got, head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert got.tolist() == expected.tolist()


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quant_applies_to_what_a_4_bit_experts_checkpoint_keeps_in_float(fmt, tmp_path, monkeypatch):
    """--quant over Kimi K2 Thinking's form: attention and the shared expert quantized at load, the routed
    experts left as the checkpoint's 4-bit layers; counted exactly, announced ``int4``. Against the float
    span holding what every layer dequantizes to (the experts' twin, with the quantized layers' weights
    copied in): every product dense and float32, within 1e-5; through the kernels, as a node decodes, the
    median row within 5% (the same bounds as every family's quantized blocks, test_model_quant.py)."""
    from homeswarm.model.prequant import PrequantExperts
    from homeswarm.model.quant import QuantizedLinearInt8
    from homeswarm.model.weight_format import weight_format
    from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint

    source = make_deepseek_checkpoint(tmp_path / "float", "kimi_k2", moe_intermediate_size=32)
    packed, plain = write_prequantized(source, tmp_path / "packed", tmp_path / "plain", "compressed",
                                       experts_only=True)
    config = ModelConfig.from_dir(packed)
    span, head = load_span(packed, 0, NUM_LAYERS, quant=fmt), load_head(packed)
    kind = QuantizedLinearInt8 if fmt == "int8" else QuantizedLinearInt4
    expert_layers = {n for n, m in span.named_modules() if isinstance(m, PrequantExperts)}
    assert len(expert_layers) == NUM_LAYERS - 1
    linears = {n: m for n, m in span.named_modules() if isinstance(m, (nn.Linear, QuantizedLinearInt4, QuantizedLinearInt8))
               and not n.startswith(tuple(f"{e}." for e in expert_layers))}
    assert not [n for n, m in linears.items() if type(m) is not kind and not n.endswith(".gate")]
    assert any(n.endswith("self_attn.o_proj") for n in linears) and any("shared_expert" in n for n in linears)
    for experts in (span.get_submodule(e) for e in expert_layers):  # the checkpoint's own 4-bit form
        assert all(type(m) is PackedInt4Linear for m in experts.modules() if isinstance(m, QuantizedLinearInt4))
    held = sum(p.numel() * p.element_size() for p in span.parameters()) + sum(
        b.numel() * b.element_size() for m in span.modules() if isinstance(m, (QuantizedLinearInt4, QuantizedLinearInt8))
        for b in m.buffers(recurse=False))  # weights, scales, zero points (routers' score biases aside)
    assert held == span_weight_bytes(config, 0, NUM_LAYERS, torch.float32, fmt)
    quantized = [m for n, m in linears.items() if not n.endswith(".gate")]
    held_there = sum(b.numel() * b.element_size() for m in quantized for b in m.buffers(recurse=False))
    # int8: a byte a weight and a 2-byte scale a row; int4 in groups of 32: half a byte and two 2-byte numbers a group
    assert held_there < sum(m.out_features * m.in_features for m in quantized) * (1.1 if fmt == "int8" else 0.7)
    assert weight_format(config, fmt, 0, NUM_LAYERS) == "int4"
    assert weight_format(config, fmt, 0, 1) == fmt  # the dense first block: --quant's weights only

    twin = load_span(plain, 0, NUM_LAYERS)
    with torch.no_grad():
        for name in linears:
            if not name.endswith(".gate"):
                twin.get_submodule(name).weight.copy_(linears[name].dequantized_weight())
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(5))

    def run(blocks) -> torch.Tensor:  # a prefill, then decoding steps (through the kernels where they run)
        cache = blocks.new_cache(2, 24)
        steps = [blocks(head.embed(ids[:, :20]), cache)]
        return torch.cat(steps + [blocks(head.embed(ids[:, i : i + 1]), cache) for i in range(20, 24)], 1)

    want = run(twin)
    rows = (run(span) - want).norm(dim=-1) / want.norm(dim=-1)
    # a row whose router choice flips under the activations' rounding differs wholly: the median holds
    print(f"\n{fmt} over 4-bit experts, against the dequantized twin: row error median {rows.median():.4f}")
    assert rows.median() < 0.05, rows.median().item()
    monkeypatch.setattr(quant, "_dense_bfloat16", False)  # every product dense, float32
    monkeypatch.setattr(QuantizedLinearInt8, "kernel_max_rows", 0)
    monkeypatch.setattr(QuantizedLinearInt4, "kernel_max_rows", 0)
    assert rel_err(run(span), want) < 1e-5
