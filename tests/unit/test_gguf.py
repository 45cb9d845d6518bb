"""GGUF files as checkpoints: an F32 GGUF written from a random checkpoint generates exactly what transformers
generates on the source checkpoint (llama 2 and 3 with llama.cpp's permuted Q/K and RoPE factors, Qwen2
biases, Qwen3 q/k norms); F16, Q8_0 and Q4_0 files give the logits transformers gives on the same GGUF
(both dequantize: equal); a split file reads as the whole; tokenizers (byte-level BPE and SentencePiece)
encode and decode as transformers' GGUF conversion does, with the chat template; bad files are refused
with their reason.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import transformers

from homeswarm.model import LocalModel, load_span
from homeswarm.model.gguf_files import gguf_folder, gguf_weight_format, is_gguf_folder, open_checkpoint
from homeswarm.model.gguf_names import gguf_names
from homeswarm.model.gguf_reader import GGUFCheckpoint, gguf_paths, model_stem
from homeswarm.model.gguf_tokenizer import build_tokenizer
from homeswarm.model.prequant import PackedInt4Linear
from tests.helpers.checkpoints import make_checkpoint, reference_greedy, reference_model
from tests.helpers.gguf_checkpoints import (
    byte_level_tokenizer,
    logits_against_transformers,
    sentencepiece_tokenizer,
    write_gguf,
)
from tests.helpers.moe_checkpoints import make_moe_checkpoint

TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")
TEXTS = ["the weather is nice", "  leading spaces and\nnew lines\n\n", "Ünïcödé ✓ 数字 123456",
         "<|endoftext|> special <think>inside</think>", "", "on the other hand, it is"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    transformers.utils.logging.disable_progress_bar()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf")


def _prompt() -> torch.Tensor:
    return torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("family", ["llama2", "llama3", "qwen2", "qwen3"])
def test_f32_gguf_generates_what_transformers_generates_on_the_source(family, root):
    source = make_checkpoint(root / family, family, num_layers=2, seed=5)
    path = write_gguf(source, root / f"{family}.gguf", family, "F32")
    folder = gguf_folder(path, cache_dir=root / "cache")
    assert folder.name == family and is_gguf_folder(folder)
    model = LocalModel(folder)
    reference = reference_model(source)
    prompt = _prompt()
    with torch.no_grad():
        want = reference(prompt).logits
        got = model.head.logits(model.forward(model.head.embed(prompt)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.generate(prompt, 12).tolist() == reference_greedy(source, prompt, 12, model=reference).tolist()
    assert gguf_weight_format(folder, 0, 2) == "gguf-f32"


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0"])
def test_quantized_gguf_equals_transformers_on_the_same_file(qtype, root, caplog):
    source = make_checkpoint(root / f"src-{qtype}", "llama2", num_layers=2, seed=6)
    path = write_gguf(source, root / f"llama-{qtype}.gguf", "llama2", qtype)
    folder = gguf_folder(path, cache_dir=root / "cache")
    with caplog.at_level(logging.INFO, logger="homeswarm.model.gguf_reader"):
        model = LocalModel(folder)
    dequantized = [r for r in caplog.records if "dequantizing" in r.getMessage()]
    held = [r for r in caplog.records if "held as they are" in r.getMessage()]
    # once per load (head, span), not per tensor; a Q4_0 file's blocks keep their 4-bit matrices
    assert (len(dequantized), len(held)) == {"F16": (0, 0), "Q8_0": (2, 0), "Q4_0": (1, 1)}[qtype]
    reference = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
    prompt = _prompt()
    with torch.no_grad():
        want = reference(prompt).logits
        got = model.head.logits(model.forward(model.head.embed(prompt)))
    assert gguf_weight_format(folder, 0, 2) == f"gguf-{qtype.lower()}"
    if qtype != "Q4_0":
        # both dequantize the same blocks to float32 and compute in float32: the same numbers
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    # Q4_0 stays 4-bit: exactly the file's weights (Q/K rows unpermuted too) ...
    span = load_span(folder, 0, 2, fuse=False)
    for i, layer in enumerate(span.layers):
        for name, ours in layer.named_modules():
            if isinstance(ours, PackedInt4Linear):
                theirs = reference.model.layers[i].get_submodule(name).weight
                assert torch.equal(ours.dequantized_weight(torch.float32), theirs), (i, name)
    assert isinstance(model.spans[0].layers[0].self_attn.o_proj, PackedInt4Linear)
    # ... through the 4-bit products (kernels, or the dense product in bfloat16 on CPUs fast at it), which
    # round: measured here 1.0% of the largest logit
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


@pytest.mark.parametrize("family", ["qwen3_moe", "qwen2_moe", "mixtral"])
def test_f32_moe_gguf_generates_what_transformers_generates_on_the_source(family, root):
    # Qwen3-MoE's layer 1 and Qwen2-MoE's layer 0 are dense: a block without a router in the file
    overrides = {"sliding_window": None} if family == "mixtral" else {}  # a GGUF llama has no window
    source = make_moe_checkpoint(root / family, family, num_layers=2, seed=9, **overrides)
    folder = gguf_folder(write_gguf(source, root / f"{family}.gguf", family, "F32"), cache_dir=root / "cache")
    model = LocalModel(folder)
    assert model.config.moe is not None and model.config.family == family
    reference = reference_model(source)
    prompt = _prompt()
    with torch.no_grad():
        want = reference(prompt).logits
        got = model.head.logits(model.forward(model.head.embed(prompt)))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert model.generate(prompt, 8).tolist() == reference_greedy(source, prompt, 8, model=reference).tolist()


def test_quantized_moe_gguf_equals_transformers_on_the_same_file(root):
    source = make_moe_checkpoint(root / "moe-q8", "qwen3_moe", num_layers=2, seed=10, mlp_only_layers=[])
    path = write_gguf(source, root / "qwen3moe-Q8_0.gguf", "qwen3_moe", "Q8_0")
    model = LocalModel(gguf_folder(path, cache_dir=root / "cache"))
    got, want = logits_against_transformers(model, root, path, _prompt(), source)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_q4_0_file_with_promoted_matrices(root):
    """llama.cpp's mixes store some matrices in a wider type: those are read as floats, the rest stay 4-bit."""
    source = make_checkpoint(root / "src-mix", "llama2", num_layers=2, seed=13)
    path = write_gguf(source, root / "llama-mix.gguf", "llama2", "Q4_0",
                      promoted={"attn_v.weight": "Q8_0", "blk.1.ffn_down.weight": "Q8_0"})
    folder = gguf_folder(path, cache_dir=root / "cache")
    ignored = json.loads((folder / "config.json").read_text())["quantization_config"]["ignore"]
    assert ignored == ["lm_head", "model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj",
                       "model.layers.1.mlp.down_proj"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(root, gguf_file=path.name, dtype=torch.float32).eval()
    span = load_span(folder, 0, 2, fuse=False)
    kinds = {}
    for i, layer in enumerate(span.layers):
        for name, ours in layer.named_modules():
            if isinstance(ours, torch.nn.Linear | PackedInt4Linear) and "proj" in name:
                theirs = reference.model.layers[i].get_submodule(name).weight
                packed = isinstance(ours, PackedInt4Linear)
                kinds[f"{i}.{name}"] = packed
                assert torch.equal(ours.dequantized_weight(torch.float32) if packed else ours.weight, theirs), (i, name)
    assert not kinds["0.self_attn.v_proj"] and not kinds["1.mlp.down_proj"]
    assert kinds["0.self_attn.q_proj"] and kinds["0.mlp.down_proj"] and kinds["1.mlp.gate_proj"]
    model = LocalModel(folder)
    prompt = _prompt()
    with torch.no_grad():
        want = reference(prompt).logits
        got = model.head.logits(model.forward(model.head.embed(prompt)))
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
def test_q4_0_moe_experts_stay_4_bit(family, root):
    import gguf

    from homeswarm.model.prequant import PrequantExperts

    overrides = {"mlp_only_layers": []} if family == "qwen3_moe" else {"sliding_window": None, "intermediate_size": 64}
    source = make_moe_checkpoint(root / f"moe-q4-{family}", family, num_layers=2, seed=14, **overrides)
    path = write_gguf(source, root / f"{family}-Q4_0.gguf", family, "Q4_0")
    folder = gguf_folder(path, cache_dir=root / "cache")
    span = load_span(folder, 0, 2, fuse=False)
    file = gguf.GGUFReader(path)
    stacks = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in file.tensors if "_exps" in t.name}
    names = ("gate_proj", "up_proj", "down_proj") if family == "qwen3_moe" else ("w1", "w3", "w2")
    for i, layer in enumerate(span.layers):
        experts = layer.mlp.experts
        assert isinstance(experts, PrequantExperts)
        for e in (0, 5):
            for name, stack in zip(names, ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"), strict=True):
                want = torch.from_numpy(stacks[f"blk.{i}.{stack}.weight"][e])
                assert torch.equal(getattr(experts[e], name).dequantized_weight(torch.float32), want), (i, e, name)
    if family != "qwen3_moe":
        return
    model = LocalModel(folder)
    got, want = logits_against_transformers(model, root, path, _prompt(), source)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_span_in_bfloat16_and_split_file(root):
    source = make_checkpoint(root / "split-src", "qwen3", num_layers=3, seed=7)
    whole = write_gguf(source, root / "whole.gguf", "qwen3", "F16")
    (root / "parts").mkdir()
    first = write_gguf(source, root / "parts" / "qwen3-split.gguf", "qwen3", "F16", split_max_tensors=10)
    assert first.name.startswith("qwen3-split-00001-of-")
    assert len(gguf_paths(first)) > 2 and model_stem(first) == "qwen3-split"
    a = load_span(gguf_folder(whole, cache_dir=root / "cache"), 1, 3, dtype=torch.bfloat16)
    b = load_span(gguf_folder(first, cache_dir=root / "cache"), 1, 3, dtype=torch.bfloat16)
    assert a.layers[0].self_attn.o_proj.weight.dtype == torch.bfloat16
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(x, y), name
    assert gguf_folder(first, cache_dir=root / "cache").name == "qwen3-split"
    last = sorted((root / "parts").glob("*.gguf"))[-1]
    last.rename(last.with_suffix(".bak"))
    with pytest.raises(FileNotFoundError, match="lacks its part"):
        gguf_paths(first)


def test_names_follow_llama_cpp(root):
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2MOE, 2)
    for hf in ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.shared_expert.up_proj.weight",
               "model.layers.1.mlp.gate.weight", "model.layers.0.post_attention_layernorm.weight",
               "model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"]:
        assert gguf_names(hf) == (names.get_name(hf, try_suffixes=(".weight", ".bias")),), hf
    assert gguf_names("model.layers.3.mlp.experts.gate_up_proj") == ("blk.3.ffn_gate_exps.weight",
                                                                   "blk.3.ffn_up_exps.weight")
    assert gguf_names("model.layers.3.block_sparse_moe.experts.down_proj") == ("blk.3.ffn_down_exps.weight",)
    assert gguf_names("model.layers.3.self_attn.rotary_emb.inv_freq") is None


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tokenizer_and_chat_template_equal_transformers(kind, root):
    family = "qwen2" if kind == "gpt2" else "llama2"
    vocab = byte_level_tokenizer() if kind == "gpt2" else sentencepiece_tokenizer()
    source = make_checkpoint(root / f"tok-{kind}", family, num_layers=1, vocab_size=len(vocab["tokens"]), seed=8)
    path = write_gguf(source, root / f"tok-{kind}.gguf", family, "F32", tokenizer=vocab, chat_template=TEMPLATE)
    folder = gguf_folder(path, cache_dir=root / "cache")
    ours = build_tokenizer(GGUFCheckpoint(path).metadata)
    theirs = transformers.AutoTokenizer.from_pretrained(root, gguf_file=path.name)
    for text in TEXTS:
        ids = theirs(text)["input_ids"]
        assert ours.encode(text).ids == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True), text
    saved = json.loads((folder / "tokenizer_config.json").read_text())
    assert saved["chat_template"] == theirs.chat_template == TEMPLATE
    assert saved["eos_token"] == theirs.eos_token
    assert (folder / "tokenizer.json").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert config["vocab_size"] == len(vocab["tokens"]) and config["eos_token_id"] == vocab["eos"]


def test_bad_files_are_refused(root, tmp_path):
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"not a gguf at all" * 10)
    with pytest.raises(ValueError, match="not a readable GGUF"):
        gguf_folder(not_gguf, cache_dir=tmp_path / "cache")
    with pytest.raises(FileNotFoundError, match="GGUF file not found"):
        gguf_folder(tmp_path / "absent.gguf", cache_dir=tmp_path / "cache")
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "gpt2.gguf", "gpt2")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'gpt2'"):
        gguf_folder(tmp_path / "gpt2.gguf", cache_dir=tmp_path / "cache")
    source = make_checkpoint(tmp_path / "src", "llama2", num_layers=1)
    path = write_gguf(source, tmp_path / "ok.gguf", "llama2", "F32")
    reader = open_checkpoint(path)
    assert "model.layers.0.self_attn.q_proj.weight" in reader and "model.layers.1.mlp.up_proj.weight" not in reader
    with pytest.raises(KeyError, match="lacks tensors: model.layers.1"):
        reader.load(["model.layers.1.mlp.up_proj.weight"])


@pytest.mark.parametrize(("factor", "original"), [(8.0, 8192), (32.0, 8192), (16.0, 2048)])
def test_llama3_rope_scaling_read_back_from_rope_freqs(factor, original):
    from homeswarm.model.gguf_names import _llama3_factors, llama3_rope_scaling

    factors = [float(np.float32(f)) for f in _llama3_factors(128, 500000.0, factor, 1.0, 4.0, original)]
    assert llama3_rope_scaling(factors, 128, 500000.0) == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": original}
    assert llama3_rope_scaling([1.0] * 64, 128, 500000.0) is None
    assert llama3_rope_scaling([float(i + 1) for i in range(64)], 128, 500000.0) is None


def test_metadata_we_cannot_reproduce_is_refused():
    from homeswarm.model.gguf_names import config_dict

    meta = {"general.architecture": "qwen2", "qwen2.block_count": 2, "qwen2.embedding_length": 64,
            "qwen2.feed_forward_length": 128, "qwen2.attention.head_count": 4}
    assert config_dict(meta, {"output.weight"}, 256)["tie_word_embeddings"] is False
    with pytest.raises(ValueError, match="per-layer values"):
        config_dict({**meta, "qwen2.attention.head_count_kv": [2, 4]}, set(), 256)
    with pytest.raises(ValueError, match="RoPE scaling 'yarn'"):
        config_dict({**meta, "qwen2.rope.scaling.type": "yarn"}, set(), 256)
    with pytest.raises(ValueError, match="lacks qwen2.block_count"):
        config_dict({k: v for k, v in meta.items() if k != "qwen2.block_count"}, set(), 256)
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'phi3'"):
        config_dict({**meta, "general.architecture": "phi3"}, set(), 256)


def test_every_file_type_is_one_records_accept():
    import gguf

    from homeswarm.model.gguf_files import GGUF_TYPES
    from homeswarm.routing.records import GGUF_TYPES as RECORD_TYPES

    assert GGUF_TYPES == RECORD_TYPES
    named = {n.removeprefix("MOSTLY_").removeprefix("ALL_").lower() for n in gguf.LlamaFileType.__members__}
    assert named - {"guessed"} <= set(GGUF_TYPES)
