"""DeepSeek-V3 / Kimi K2 (``deepseek2``) and GPT-OSS (``gpt-oss``) GGUF files as checkpoints: an F32 file
written from a random checkpoint as llama.cpp's converter writes it gives transformers' logits on the
source checkpoint and its greedy tokens (MLA with low-rank or full queries, ``kv_b_proj`` split into
``attn_k_b``/``attn_v_b`` or whole, expert groups, shared experts, the score-correction bias, the leading
dense layers; GPT-OSS's sinks, alternating window, biased clamped experts); a GPT-OSS file with MXFP4
experts repacked from the hub's holds exactly the hub checkpoint's dequantized weights; DeepSeek-V3's
pre-tokenizer splits text as llama.cpp's ``deepseek-v3`` does, and an unknown one is said to fall back.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers

from homeswarm.model import LocalModel, load_span
from homeswarm.model.gguf_files import gguf_folder, gguf_weight_format
from homeswarm.model.gguf_names import config_dict
from tests.helpers.checkpoints import reference_greedy, reference_model
from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint, reference_deepseek
from tests.helpers.gguf_families import write_deepseek_gguf, write_gpt_oss_gguf
from tests.helpers.gpt_oss_checkpoints import make_gpt_oss_checkpoint, make_mxfp4_checkpoint

# what a GGUF can say: DeepSeek's mscale equal to mscale_all_dim (llama.cpp stores one), as in every
# release; GPT-OSS's SwiGLU limit 7 (llama.cpp's, fixed for the architecture)
_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
         "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 0.8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-families")


def _prompt(length: int = 24) -> torch.Tensor:
    return torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(4))


def _check(folder, reference, source, prompt: torch.Tensor, tokens: int = 8) -> LocalModel:
    model = LocalModel(folder)
    with torch.no_grad():
        want = reference(prompt).logits
        got = model.head.logits(model.forward(model.head.embed(prompt)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.generate(prompt, tokens).tolist() == reference_greedy(source, prompt, tokens, model=reference).tolist()
    return model


@pytest.mark.parametrize(("variant", "split_kv_b"), [("deepseek_v3", True), ("kimi_k2", True),
                                                     ("deepseek_v3_full_q", False)])
def test_f32_deepseek2_gguf_equals_transformers_on_the_source(variant, split_kv_b, root):
    # llama.cpp's deepseek2 rotates interleaved pairs: the full-query variant is written so too
    overrides = {"rope_parameters": _YARN, **({"rope_interleave": True} if variant.endswith("full_q") else {})}
    source = make_deepseek_checkpoint(root / variant, variant, num_layers=3, seed=21, **overrides)
    path = write_deepseek_gguf(source, root / f"{variant}.gguf", split_kv_b=split_kv_b)
    folder = gguf_folder(path, cache_dir=root / "cache")
    model = _check(folder, reference_deepseek(source), source, _prompt())
    assert model.config.family == "deepseek_v3" and model.config.mla is not None
    assert model.config.moe.dense_layers == frozenset({0}) and model.config.moe.n_group == (1 if variant == "kimi_k2" else 4 if variant == "deepseek_v3" else 2)
    assert gguf_weight_format(folder, 0, 3) == "gguf-f32"


def test_quantized_deepseek2_gguf_is_dequantized_at_load(root):
    source = make_deepseek_checkpoint(root / "ds-q8", "deepseek_v3", num_layers=2, seed=22, rope_parameters=_YARN)
    path = write_deepseek_gguf(source, root / "ds-q8_0.gguf", "Q8_0")
    folder = gguf_folder(path, cache_dir=root / "cache")
    import gguf

    file = gguf.GGUFReader(path)
    stored = {t.name: np.array(gguf.quants.dequantize(t.data, t.tensor_type)) for t in file.tensors}
    span = load_span(folder, 1, 2)
    experts = span.layers[0].mlp.experts
    up = torch.from_numpy(stored["blk.1.ffn_up_exps.weight"])
    assert torch.equal(experts.gate_up_proj[:, up.shape[1]:], up)
    assert {t.name: t.tensor_type.name for t in file.tensors}["blk.1.attn_v_b.weight"] == "Q8_0"
    k_b = torch.from_numpy(stored["blk.1.attn_k_b.weight"])  # [heads, lora, nope]
    assert torch.equal(span.layers[0].self_attn.kv_b_proj.w_uk, k_b.transpose(1, 2))
    assert torch.equal(span.layers[0].self_attn.kv_b_proj.w_uv, torch.from_numpy(stored["blk.1.attn_v_b.weight"]))
    assert gguf_weight_format(folder, 0, 2) == "gguf-q8_0"


def test_f32_gpt_oss_gguf_equals_transformers_on_the_source(root):
    source = make_gpt_oss_checkpoint(root / "oss", num_layers=2, seed=23, swiglu_limit=7.0)
    folder = gguf_folder(write_gpt_oss_gguf(source, root / "oss.gguf"), cache_dir=root / "cache")
    model = _check(folder, reference_model(source), source, _prompt(40))  # longer than the window (16)
    assert model.config.family == "gpt_oss" and model.config.sliding_window == 16


def test_mxfp4_gpt_oss_gguf_holds_the_hub_checkpoints_weights(root):
    source = make_gpt_oss_checkpoint(root / "oss-src", num_layers=2, seed=24, swiglu_limit=7.0)
    hub = make_mxfp4_checkpoint(source, root / "oss-mxfp4")
    path = write_gpt_oss_gguf(source, root / "oss-mxfp4.gguf", mxfp4_from=hub)
    folder = gguf_folder(path, cache_dir=root / "cache")
    ours, theirs = load_span(folder, 0, 2), load_span(hub, 0, 2)
    for (name, x), (other, y) in zip(ours.state_dict().items(), theirs.state_dict().items(), strict=True):
        assert name == other and torch.equal(x, y), name
    assert gguf_weight_format(folder, 0, 2) == "gguf-mxfp4_moe"


def test_softmax_routed_deepseek2_is_refused():
    meta = {"general.architecture": "deepseek2", "deepseek2.block_count": 2, "deepseek2.embedding_length": 64,
            "deepseek2.feed_forward_length": 128, "deepseek2.attention.head_count": 4,
            "deepseek2.expert_gating_func": 1}
    with pytest.raises(ValueError, match="only sigmoid-routed"):
        config_dict(meta, set(), 256)
    with pytest.raises(ValueError, match="only sigmoid-routed"):
        config_dict({k: v for k, v in meta.items() if k != "deepseek2.expert_gating_func"}, set(), 256)


def test_deepseek_v3_pre_tokenizer_splits_as_llama_cpp_does(caplog):
    from homeswarm.model.gguf_tokenizer import build_tokenizer
    from tests.helpers.gguf_checkpoints import byte_level_tokenizer

    vocab = byte_level_tokenizer()
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": vocab["tokens"], "tokenizer.ggml.pre": "deepseek-v3",
            "tokenizer.ggml.merges": vocab["merges"], "tokenizer.ggml.token_type": vocab["token_type"]}
    text = "abc 12345 你好!hello world\n\n"

    def pieces(tokenizer) -> list[str]:
        return [text[a:b] for _, (a, b) in tokenizer.pre_tokenizer.pre_tokenize_str(text)]

    # digits in threes, CJK runs alone, a punctuation mark kept with the letters after it (GPT-2's regex
    # splits " 12345", " 你好", "!", "hello")
    assert pieces(build_tokenizer(meta)) == ["abc", " ", "123", "45", " ", "你好", "!hello", " world", "\n\n"]
    with caplog.at_level("WARNING", logger="homeswarm.model.gguf_tokenizer"):
        fallback = build_tokenizer({**meta, "tokenizer.ggml.pre": "kimi-k2"})
    assert pieces(fallback) == ["abc", " 12345", " 你好", "!", "hello", " world", "\n\n"]
    assert "'kimi-k2' is not known here" in caplog.text


def test_q4_0_deepseek2_gguf_stays_4_bit(root):
    """MLA's projections, the dense MLP, shared and routed experts held 4-bit as the file stores them;
    kv_b_proj (llama.cpp's attn_k_b is transposed) and matrices of other types read as floats."""
    from safetensors.torch import save_file

    from homeswarm.model.gguf_reader import GGUFCheckpoint
    from homeswarm.model.prequant import PackedInt4Linear, PrequantExperts

    source = make_deepseek_checkpoint(root / "ds-q4", "deepseek_v3", num_layers=2, seed=25, rope_parameters=_YARN,
                                      moe_intermediate_size=32, q_lora_rank=64)
    path = write_deepseek_gguf(source, root / "ds-q4_0.gguf", "Q4_0")
    folder = gguf_folder(path, cache_dir=root / "cache")
    # the reference: transformers on the file's weights dequantized (experts one by one, as checkpoints hold them)
    reader = GGUFCheckpoint(path)
    state = {}
    for name, tensor in reader.load(reader.names()).items():
        if name.endswith("experts.gate_up_proj"):
            half = tensor.shape[1] // 2
            for e in range(tensor.shape[0]):
                state[name.replace("gate_up_proj", f"{e}.gate_proj.weight")] = tensor[e, :half]
                state[name.replace("gate_up_proj", f"{e}.up_proj.weight")] = tensor[e, half:]
        elif name.endswith("experts.down_proj"):
            for e in range(tensor.shape[0]):
                state[name.replace("down_proj", f"{e}.down_proj.weight")] = tensor[e]
        else:
            state[name] = tensor
    dequantized = root / "ds-q4-dequantized"
    dequantized.mkdir()
    (dequantized / "config.json").write_text((source / "config.json").read_text())
    save_file({k: v.contiguous() for k, v in state.items()}, str(dequantized / "model.safetensors"))
    reference = reference_deepseek(dequantized)
    span = load_span(folder, 0, 2, fuse=False)
    held = {}
    for i, layer in enumerate(span.layers):
        for name, ours in layer.named_modules():
            if isinstance(ours, PackedInt4Linear) and ".experts." not in name:
                held[f"{i}.{name}"] = ours
                theirs = reference.model.layers[i].get_submodule(name.replace("shared_expert.", "shared_experts."))
                assert torch.equal(ours.dequantized_weight(torch.float32), theirs.weight), (i, name)
    assert {"0.self_attn.q_a_proj", "0.self_attn.kv_a_proj_with_mqa", "0.mlp.down_proj",
            "1.mlp.shared_expert.up_proj"} <= set(held)
    assert "0.self_attn.q_b_proj" in held and "0.self_attn.o_proj" not in held  # o_proj's 48 inputs: F32
    experts, stacks = span.layers[1].mlp.experts, reference.model.layers[1].mlp.experts
    assert isinstance(experts, PrequantExperts)
    for e in (0, 5):
        assert torch.equal(experts[e].gate_proj.dequantized_weight(torch.float32), stacks.gate_up_proj[e, :32])
        assert torch.equal(experts[e].up_proj.dequantized_weight(torch.float32), stacks.gate_up_proj[e, 32:])
        assert torch.equal(experts[e].down_proj.dequantized_weight(torch.float32), stacks.down_proj[e])
    attention = span.layers[0].self_attn
    assert torch.equal(attention.kv_b_proj.w_uk, reference.model.layers[0].self_attn.kv_b_proj.weight.view(
        4, 16 + 12, 32)[:, :16])
    # the dense layer (MLA and MLP through the 4-bit products, which round as test_gguf.py's Q4_0 checks say)
    # against transformers' at every position; past it, a routed layer's choice of experts flips where two
    # scores are nearer than that rounding (measured: 1 of 24 positions; the other 23 within 2.4%)
    model = LocalModel(folder, spans=[(0, 1), (1, 2)])
    with torch.no_grad():
        want = reference(_prompt(), output_hidden_states=True).hidden_states[1]
        got = model.spans[0](model.head.embed(_prompt()))
    assert (got - want).abs().max() <= 0.03 * want.abs().max()
