"""GGUF Q4_1 and Q4_K matrices held 4-bit: their bytes read into our int4 form give exactly gguf's own
dequantization (bit for bit in float32 wherever a group's zero is exact in float32, within that zero's
rounding elsewhere); a llama file of either type, and a Qwen3-MoE file with Q4_K experts, holds its block
matrices 4-bit (promoted ones as floats) and gives the logits transformers gives on the same file within
the 4-bit products' rounding; a file mixing Q4_0 and Q4_K holds both.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers

from homeswarm.model import LocalModel, load_span
from homeswarm.model.gguf_files import gguf_folder, gguf_weight_format
from homeswarm.model.gguf_q4 import GGUFInt4Linear, q4_as_packed, read_gguf_int4
from homeswarm.model.prequant import PrequantExperts
from homeswarm.model.quant import QuantizedLinearInt4
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.gguf_checkpoints import logits_against_transformers, quantize_q4_k, write_gguf
from tests.helpers.moe_checkpoints import make_moe_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf_q4")


def _prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))


def _ours(kind: str, data: np.ndarray, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our form's weight of a matrix's bytes, computed as the layers do, its groups' zeros, and which are exact."""
    layer = GGUFInt4Linear(cols, rows, 32, False, read_gguf_int4({"group_size": 32, "types": [kind]}))
    state = {"weight_packed": torch.empty(rows, cols // 8, dtype=torch.int32), "weight_scale": torch.empty(rows, cols // 32),
             "weight_zero": torch.empty(rows, cols // 32), "weight_shape": torch.tensor([rows, cols])}
    for name in ("weight_packed", "weight_scale", "weight_zero"):
        q4_as_packed(kind, data, name, state[name])
    exact, zero = _zero_exact(kind, data, state["weight_zero"]), state["weight_zero"].clone()
    layer.load_state_dict(state)
    return layer.dequantized_weight(torch.float32), zero, exact


def _zero_exact(kind: str, data: np.ndarray, zero: torch.Tensor) -> torch.Tensor:
    """Whether each group's zero equals its two terms' exact sum (float64 holds both terms' sum exactly)."""
    import gguf

    if kind == "Q4_1":
        blocks = data.reshape(data.shape[0], -1, 20)
        d = blocks[..., 0:2].copy().view(np.float16)[..., 0].astype(np.float64)
        m = blocks[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        return torch.from_numpy(m + 8 * d) == zero.double()
    blocks = data.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float64)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float64)
    sc, mn = gguf.quants.Q4_K.get_scale_min(blocks[:, 4:16].copy())
    want = (8 * d * sc - dmin * mn).reshape(zero.shape)
    return torch.from_numpy(want) == zero.double()


@pytest.mark.parametrize("kind", ["Q4_1", "Q4_K"])
def test_bytes_read_as_gguf_dequantizes_them(kind):
    import gguf

    rng = np.random.default_rng(4)
    rows, cols = 48, 512
    # rows of a checkpoint's scale (every zero exact: measured so on N(0, 0.02) weights too), and the last 8
    # far off zero with a tiny spread, so their zeros' two terms lie too far apart for float32
    weights = (rng.standard_normal((rows, cols)) * 10.0 ** rng.uniform(-3, 0, (rows, 1))).astype(np.float32)
    weights[-8:] = (-500 + rng.standard_normal((8, cols)) * 1e-3).astype(np.float32)
    data = quantize_q4_k(weights) if kind == "Q4_K" else gguf.quants.quantize(weights, gguf.GGMLQuantizationType.Q4_1)
    want = torch.from_numpy(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]))
    got, zero, exact = _ours(kind, data, rows, cols)
    assert exact[:-8].all() and not exact[-8:].all()
    groups = exact.repeat_interleave(32, dim=1)
    assert torch.equal(got[groups], want[groups])
    # where a zero is rounded, once to float32 (half its last bit), the sum may round the other way: within
    # the zero's last bit and the weight's
    tolerance = 2.0**-23 * (zero.abs().repeat_interleave(32, dim=1) + want.abs())
    assert ((got - want).abs() <= tolerance).all()


@pytest.mark.parametrize("qtype", ["Q4_1", "Q4_K"])
def test_llama_file_stays_4_bit_and_equals_transformers_on_it(qtype, root, caplog):
    import gguf

    source = make_checkpoint(root / f"src-{qtype}", "llama2", num_layers=2, hidden_size=256, intermediate_size=256,
                             seed=6)
    path = write_gguf(source, root / f"llama-{qtype}.gguf", "llama2", qtype,
                      promoted={"blk.1.ffn_down.weight": "Q8_0"})  # as llama.cpp's mixes promote some
    folder = gguf_folder(path, cache_dir=root / "cache")
    ignored = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignored == ["lm_head", "model.layers.1.mlp.down_proj"]
    with caplog.at_level(logging.INFO, logger="homeswarm.model.gguf_reader"):
        model = LocalModel(folder)
    assert [r for r in caplog.records if f"{qtype} matrices held as they are" in r.getMessage()]
    assert gguf_weight_format(folder, 0, 2) == {"Q4_1": "gguf-q4_1", "Q4_K": "gguf-q4_k_m"}[qtype]
    file = gguf.GGUFReader(path)
    reference = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
    span = load_span(folder, 0, 2, fuse=False)
    held = {}
    for i, layer in enumerate(span.layers):
        for name, ours in layer.named_modules():
            if isinstance(ours, torch.nn.Linear | QuantizedLinearInt4) and "proj" in name:
                held[f"{i}.{name}"] = isinstance(ours, GGUFInt4Linear)
                theirs = reference.model.layers[i].get_submodule(name).weight
                weight = ours.dequantized_weight(torch.float32) if held[f"{i}.{name}"] else ours.weight
                # transformers dequantizes with gguf and unpermutes Q/K rows as we do: equal where zeros are exact
                close = torch.isclose(weight, theirs, rtol=0, atol=float(theirs.abs().max().detach()) * 2.0**-21)
                assert close.all(), (i, name)
    assert held == {**{k: True for k in held}, "1.mlp.down_proj": False}
    tensors = {t.name: t for t in file.tensors}
    assert tensors["blk.0.attn_output.weight"].tensor_type.name == qtype
    prompt = _prompt()
    with torch.no_grad():
        want = reference(prompt).logits
        got = model.head.logits(model.forward(model.head.embed(prompt)))
    # through the 4-bit products (kernels, or the dense product in bfloat16 on CPUs fast at it), which round:
    # measured here 1.1% (Q4_1) and 1.6% (Q4_K) of the largest logit, Q4_0's 1.6% on the same checkpoint
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_q4_k_moe_experts_and_q4_0_beside_them(root):
    import gguf

    # every expert chosen: a router's near-tie cannot flip a token's experts under the 4-bit products'
    # rounding (with 2 of 8 chosen, 3 of 4 seeds tried moved one token by 6-80% of the largest logit)
    source = make_moe_checkpoint(root / "moe-q4k", "qwen3_moe", num_layers=2, seed=14, mlp_only_layers=[],
                                 hidden_size=256, moe_intermediate_size=256, intermediate_size=256, head_dim=64,
                                 num_experts=4, num_experts_per_tok=4)
    # attention in Q4_0, experts in Q4_K: both held, in one form
    path = write_gguf(source, root / "qwen3moe-Q4_K.gguf", "qwen3_moe", "Q4_K", promoted={"attn_q.weight": "Q4_0"})
    folder = gguf_folder(path, cache_dir=root / "cache")
    span = load_span(folder, 0, 2, fuse=False)
    file = gguf.GGUFReader(path)
    stacks = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in file.tensors if "_exps" in t.name}
    q = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in file.tensors if "attn_q.weight" in t.name}
    for i, layer in enumerate(span.layers):
        assert isinstance(layer.self_attn.q_proj, GGUFInt4Linear)
        assert torch.equal(layer.self_attn.q_proj.dequantized_weight(torch.float32),
                           torch.from_numpy(q[f"blk.{i}.attn_q.weight"]))
        experts = layer.mlp.experts
        assert isinstance(experts, PrequantExperts)
        for e in (0, 3):
            for name, stack in zip(("gate_proj", "up_proj", "down_proj"), ("ffn_gate_exps", "ffn_up_exps",
                                                                          "ffn_down_exps"), strict=True):
                want = torch.from_numpy(stacks[f"blk.{i}.{stack}.weight"][e])
                got = getattr(experts[e], name).dequantized_weight(torch.float32)
                torch.testing.assert_close(got, want, rtol=0, atol=float(want.abs().max()) * 2.0**-21)
    model = LocalModel(folder)
    got, want = logits_against_transformers(model, root, path, _prompt(), source)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_which_matrices_stay_4_bit():
    from homeswarm.model.gguf_q4 import q4_plan, quantization_config

    dense = {"blk.0.attn_q.weight": "Q4_K", "blk.0.attn_v.weight": "Q6_K", "blk.0.ffn_down.weight": "Q4_1",
             "blk.0.attn_norm.weight": "F32", "token_embd.weight": "Q4_K", "output.weight": "Q6_K"}
    assert q4_plan(dense, "llama") == ({"Q4_K", "Q4_1"}, ["model.layers.0.self_attn.v_proj"])
    assert quantization_config({"Q4_K"}, [])["quant_method"] == "gguf"
    assert quantization_config({"Q4_0"}, [])["quant_method"] == "compressed-tensors"  # Q4_0 alone: its own form
    assert q4_plan({"blk.0.ffn_down.weight": "Q8_0"}, "qwen3") == (set(), [])
    # a layer's experts of a held type and another: the whole file dequantized; of two held types: both held
    moe = {"blk.0.ffn_gate_exps.weight": "Q4_K", "blk.0.ffn_up_exps.weight": "Q4_K", "blk.0.attn_q.weight": "Q4_0"}
    assert q4_plan({**moe, "blk.0.ffn_down_exps.weight": "Q6_K"}, "qwen3moe") == (set(), [])
    assert q4_plan({**moe, "blk.0.ffn_down_exps.weight": "Q4_0"}, "qwen3moe") == ({"Q4_0", "Q4_K"}, [])
    # deepseek2 holds Q4_0 only (its family reads only the hub's methods); gpt-oss nothing
    assert q4_plan({"blk.0.attn_q_a.weight": "Q4_K", "blk.0.attn_kv_b.weight": "Q4_0",
                    "blk.0.ffn_down.weight": "Q4_0"}, "deepseek2") == (
        {"Q4_0"}, ["model.layers.0.self_attn.q_a_proj", "model.layers.0.self_attn.kv_b_proj"])
    assert q4_plan(dense, "gpt-oss") == (set(), [])
