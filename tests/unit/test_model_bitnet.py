"""BitNet b1.58 against transformers' BitNet (``BitNetForCausalLM`` with its own BitLinear layers), on
tiny random checkpoints in the hub's packed layout.

float32 spans compute every ternary product exactly, as transformers' float32 layers do: the last
hidden states match to 1e-6 relative (measured: 0 for an uncached pass, 3e-7 for cached steps of the
``autobitlinear`` scaling, whose reference divides before its product), logits to 1e-4 absolute, and
greedy tokens are equal. bfloat16 spans take torch's int4 kernel, checked layer by layer against the
exact product rounded once to bfloat16.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers.integrations.bitnet import pack_weights, unpack_weights

from homeswarm.model import quant
from homeswarm.model.bitnet import TernaryLinear, pack_ternary, quantize_activations, unpack_ternary
from homeswarm.model.config import ModelConfig
from homeswarm.model.loader import load_head, load_span
from homeswarm.model.sizes import block_bytes, span_weight_bytes
from tests.helpers.bitnet_checkpoints import eager, make_bitnet_checkpoint, reference_bitnet
from tests.helpers.checkpoints import reference_greedy
from tests.helpers.reference import last_hidden_states, rel_err

LINEAR_CLASSES = ("bitlinear", "autobitlinear")
HIDDEN_TOL = 1e-6
LOGIT_TOL = 1e-4


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("bitnet")
    return {c: make_bitnet_checkpoint(root / c, linear_class=c, seed=i) for i, c in enumerate(LINEAR_CLASSES)}


def test_packing_is_transformers_layout():
    values = torch.randint(-1, 2, (24, 40), generator=torch.Generator().manual_seed(0))
    packed = pack_ternary(values)
    assert torch.equal(packed, pack_weights(values.clone()))
    assert torch.equal(unpack_ternary(packed), values.to(torch.int8))
    with eager():
        assert torch.equal(unpack_ternary(packed).float(), unpack_weights(packed, dtype=torch.float32))
    with pytest.raises(ValueError, match="code 3"):
        unpack_ternary(packed | 3)


@pytest.mark.parametrize("linear_class", LINEAR_CLASSES)
def test_span_matches_transformers(linear_class, checkpoints):
    path = checkpoints[linear_class]
    reference = reference_bitnet(path)
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(1))
    with eager():
        want, want_logits = last_hidden_states(reference, ids)
    span, head = load_span(path, 0, 4), load_head(path)
    assert rel_err(span(head.embed(ids)), want) < HIDDEN_TOL
    cache = span.new_cache(2, 32)
    steps = [span(head.embed(ids[:, :20]), cache)]
    steps += [span(head.embed(ids[:, i : i + 1]), cache) for i in range(20, 30)]
    got = torch.cat(steps, dim=1)
    assert rel_err(got, want) < HIDDEN_TOL
    assert (head.logits(got) - want_logits).abs().max() < LOGIT_TOL


@pytest.mark.parametrize("linear_class", LINEAR_CLASSES)
def test_greedy_tokens_equal_transformers(linear_class, checkpoints):
    path = checkpoints[linear_class]
    prompt = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(2))
    with eager():
        want = reference_greedy(path, prompt, 24, reference_bitnet(path))
    span, head = load_span(path, 0, 4), load_head(path)
    cache, ids = span.new_cache(2, 36), prompt
    for i in range(24):
        hidden = span(head.embed(prompt if i == 0 else ids[:, -1:]), cache)
        ids = torch.cat([ids, head.logits(hidden[:, -1:])[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert ids.tolist() == want.tolist()
    assert len(set(ids[0, 12:].tolist())) > 3


@pytest.mark.parametrize("dense_bfloat16", [False, True])  # the dense product in float32 or in bfloat16
@pytest.mark.parametrize("rows", [1, 5, 200])  # the kernel, and the dense path past kernel_max_rows
def test_bfloat16_products_are_the_exact_product_rounded_once(rows, dense_bfloat16, monkeypatch):
    monkeypatch.setattr(quant, "_dense_bfloat16", dense_bfloat16)
    gen = torch.Generator().manual_seed(3)
    values = torch.randint(-1, 2, (96, 256), generator=gen)
    layer = TernaryLinear(256, 96)
    layer.load_state_dict({"weight": pack_ternary(values), "weight_scale": torch.tensor([0.25], dtype=torch.bfloat16)},
                          assign=True)
    assert layer.layout != "plain"  # the kernel's layout on this CPU
    x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16)
    q, scale = quantize_activations(x)
    exact = (q.double() @ values.double().T).to(torch.bfloat16)  # what bfloat16's F.linear gives
    want = exact / (layer.weight_scale * scale)
    got = layer(x)
    assert got.dtype == torch.bfloat16
    assert rel_err(got, want) < 2**-8
    if rows > layer.kernel_max_rows:  # the dense path: the exact product rounded once, to the bit
        assert torch.equal(layer.matmul(q), exact)


def test_a_ternary_block_takes_under_0_14x_of_float32(checkpoints):
    path = checkpoints["bitlinear"]
    config = ModelConfig.from_dir(path)
    span = load_span(path, 0, 4)
    held = sum(t.numel() * t.element_size() for t in span.state_dict().values())
    assert held == span_weight_bytes(config, 0, 4, torch.float32)
    # float32 bytes of the same block: every ternary value and every norm weight a float
    ternary = sum(m.out_features * m.in_features for m in span.modules() if isinstance(m, TernaryLinear))
    norms = sum(t.numel() for name, t in span.state_dict().items() if name.endswith("norm.weight"))
    assert held <= 0.14 * 4 * (ternary + norms)
    # the hub's 2B4T shapes, counted from the config alone
    big = ModelConfig.from_dict({**json.loads((path / "config.json").read_text()), "hidden_size": 2560,
                                 "intermediate_size": 6912, "num_attention_heads": 20, "num_key_value_heads": 5,
                                 "head_dim": 128})
    weights = 2 * 2560 * 2560 + 2 * 640 * 2560 + 3 * 6912 * 2560
    assert block_bytes(big, 0, torch.float32)[0] <= 0.14 * 4 * (weights + 3 * 2560 + 6912)


def test_bad_checkpoints_and_formats_are_refused(checkpoints, tmp_path):
    path = checkpoints["bitlinear"]
    with pytest.raises(ValueError, match="ternary already"):
        load_span(path, 0, 2, quant="int8")
    config = json.loads((path / "config.json").read_text())
    for change, message in [({"quantization_config": None}, "quant_method 'bitnet'"),
                            ({"quantization_config": {"quant_method": "bitnet", "quantization_mode": "online"}},
                             "offline"),
                            ({"hidden_act": "silu"}, "hidden_act")]:
        with pytest.raises(ValueError, match=message):
            ModelConfig.from_dict({**config, **change})
    layer = TernaryLinear(64, 64)
    with pytest.raises(ValueError, match="packed ternary"):
        layer.load_state_dict({"weight": torch.zeros(64, 64), "weight_scale": torch.ones(1)}, assign=True)
    with pytest.raises(RuntimeError, match="once its checkpoint weights are loaded"):
        TernaryLinear(64, 64)(torch.zeros(1, 64))
