"""GGUF files through real daemons on 127.0.0.1: `join-swarm FILE.gguf` and clients on the same file.

One swarm for the module, under the model name of the F32 file's stem: two nodes serve an F32 GGUF (with
llama.cpp's permuted Q/K rows and a tokenizer) in two spans, and a third serves a Q8_0 GGUF of the same
checkpoint, whole, under that name; a fourth serves an F16 Qwen3-MoE GGUF (a dense layer among the
experts) under its own stem, a fifth a Q4_0 GGUF (held 4-bit), a sixth an F32 DeepSeek-V3 (``deepseek2``)
GGUF, a seventh an F32 GPT-OSS GGUF and an eighth a Q4_K GGUF (held 4-bit), each under its own. An exact client (Python, and `homeswarm
generate --exact` with a text prompt) routes through the F32 nodes only and generates exactly
transformers' greedy tokens on the source checkpoint (the MoE one: transformers on the source rounded to
float16; DeepSeek-V3 and GPT-OSS: on theirs); the F32 nodes announce the block digests of the
safetensors source (a client on the source folder routes through them) while the Q8_0 node announces its
own (clients holding float weights refuse it) and its file type; the Q4_0 and Q4_K nodes' logits are
transformers' on their files within the 4-bit products' rounding; once the F32 nodes are gone, a client on
the Q8_0 file generates what transformers generates on that same GGUF (both dequantize it to float32).
"""

from __future__ import annotations

import json
import os
import subprocess

import pytest
import torch
import transformers

from homeswarm.client.local_swarm import LocalSwarm, console_script
from homeswarm.client.model import AutoDistributedModelForCausalLM
from homeswarm.client.tokenizer import TextCodec
from homeswarm.model.gguf_files import gguf_folder
from tests.helpers.checkpoints import make_checkpoint, reference_greedy
from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint, reference_deepseek
from tests.helpers.gguf_checkpoints import byte_level_tokenizer, write_gguf
from tests.helpers.gguf_families import write_deepseek_gguf, write_gpt_oss_gguf
from tests.helpers.gpt_oss_checkpoints import make_gpt_oss_checkpoint
from tests.helpers.moe_checkpoints import make_moe_checkpoint

NAME = "tiny-f32"  # the F32 file's stem: the swarm's model name
# a GGUF stores YaRN's mscale_all_dim only: mscale equal to it, as in every DeepSeek release
MLA_YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 256,
            "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 0.8}
PROMPT = "the weather is nice on the other hand"
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    vocab = byte_level_tokenizer()
    source = make_checkpoint(root / "source", "llama2", num_layers=4, vocab_size=len(vocab["tokens"]), seed=11)
    return {"source": source, "root": root,
            "f32": write_gguf(source, root / f"{NAME}.gguf", "llama2", "F32", tokenizer=vocab),
            "q8_0": write_gguf(source, root / "tiny-q8_0.gguf", "llama2", "Q8_0", tokenizer=vocab),
            "q4_0": write_gguf(source, root / "tiny-q4_0.gguf", "llama2", "Q4_0", tokenizer=vocab),
            "moe_source": (moe := make_moe_checkpoint(root / "moe", "qwen3_moe", num_layers=2, seed=12)),
            "moe": write_gguf(moe, root / "tiny-qwen3moe.gguf", "qwen3_moe", "F16"),
            "mla_source": (mla := make_deepseek_checkpoint(root / "mla", "deepseek_v3", num_layers=2, seed=13,
                                                                rope_parameters=MLA_YARN)),
            "mla": write_deepseek_gguf(mla, root / "tiny-deepseek.gguf"),
            "oss_source": (oss := make_gpt_oss_checkpoint(root / "oss", num_layers=2, seed=14, swiglu_limit=7.0)),
            "oss": write_gpt_oss_gguf(oss, root / "tiny-gpt-oss.gguf"),
            # Q4_K's super-blocks span 256 inputs: every matrix's inputs a multiple of 256
            "q4_k": write_gguf(make_checkpoint(root / "source-256", "llama2", num_layers=2, hidden_size=256,
                                               intermediate_size=256, vocab_size=len(vocab["tokens"]), seed=15),
                               root / "tiny-q4_k.gguf", "llama2", "Q4_K", tokenizer=vocab)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """Where GGUF folders (and digests) go: in the test's folder, for the daemons and this process."""
    path = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(path))
        yield path


@pytest.fixture(scope="module")
def swarm(files, cache, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm"), env={"XDG_CACHE_HOME": str(cache)}) as swarm:
        swarm.start_bootstrap()
        daemons = [swarm.start_node(files["f32"], "--blocks", blocks, "--compute-threads", "1", wait=False)
                   for blocks in ("0:2", "2:4")]
        daemons.append(swarm.start_node(files["q8_0"], "--model-name", NAME, "--compute-threads", "1", wait=False))
        daemons.append(swarm.start_node(files["moe"], "--compute-threads", "1", wait=False))
        daemons.append(swarm.start_node(files["q4_0"], "--compute-threads", "1", wait=False))
        daemons.append(swarm.start_node(files["mla"], "--compute-threads", "1", wait=False))
        daemons.append(swarm.start_node(files["oss"], "--compute-threads", "1", wait=False))
        daemons.append(swarm.start_node(files["q4_k"], "--compute-threads", "1", wait=False))
        for daemon in daemons:
            swarm.wait_ready(daemon, timeout=180)
        swarm.gguf_daemons = daemons
        yield swarm


@pytest.fixture(scope="module")
def prompt_ids(files, cache) -> list[int]:
    codec = TextCodec.for_model(gguf_folder(files["f32"]))
    assert codec is not None
    return codec.encode(PROMPT)


def test_exact_client_routes_through_float_nodes_and_equals_transformers(swarm, files, prompt_ids):
    assert [d.info["model"] for d in swarm.gguf_daemons] == [NAME, NAME, NAME, "tiny-qwen3moe", "tiny-q4_0",
                                                         "tiny-deepseek", "tiny-gpt-oss", "tiny-q4_k"]
    want = reference_greedy(files["source"], torch.tensor([prompt_ids]), NEW_TOKENS)
    with AutoDistributedModelForCausalLM.from_pretrained(files["f32"], initial_peers=swarm.initial_peers,
                                                         exact=True) as model:
        assert model.model_name == NAME
        with model.inference_session(max_length=8) as session:
            assert [(h.start, h.end, h.server.quant) for h in session.hops] == [(0, 2, "gguf-f32"), (2, 4, "gguf-f32")]
        got = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS)
        # the Q8_0 node under the same name announces its own weights' digest: refused by a client holding F32
        assert swarm.gguf_daemons[2].info["peer_id"] in model.routes.refused
    assert got.tolist() == want.tolist()


def test_safetensors_client_accepts_the_f32_gguf_nodes(swarm, files, prompt_ids):
    """The F32 GGUF nodes announce the digests of the safetensors checkpoint the file was written from."""
    want = reference_greedy(files["source"], torch.tensor([prompt_ids]), NEW_TOKENS)
    with AutoDistributedModelForCausalLM.from_pretrained(files["source"], initial_peers=swarm.initial_peers,
                                                         model_name=NAME, exact=True) as model:
        assert model.routes.check_weights and len(model.routes.weights) == 4
        with model.inference_session(max_length=8) as session:
            assert [(h.start, h.end, h.server.quant) for h in session.hops] == [(0, 2, "gguf-f32"), (2, 4, "gguf-f32")]
        got = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS)
        assert set(model.routes.refused) == {swarm.gguf_daemons[2].info["peer_id"]}
    assert got.tolist() == want.tolist()


def test_moe_gguf_through_the_swarm_equals_transformers(swarm, files):
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(2))
    reference = transformers.AutoModelForCausalLM.from_pretrained(files["moe_source"], dtype=torch.float16)
    reference = reference.float().eval()  # the F16 file's weights, computed in float32
    want = reference_greedy(files["moe_source"], prompt, NEW_TOKENS, model=reference)
    with AutoDistributedModelForCausalLM.from_pretrained(files["moe"], initial_peers=swarm.initial_peers,
                                                         exact=True) as model:
        assert model.model_name == "tiny-qwen3moe"
        with model.inference_session(max_length=8) as session:
            assert [(h.start, h.end, h.server.quant) for h in session.hops] == [(0, 2, "gguf-f16")]
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert got.tolist() == want.tolist()


def test_deepseek2_gguf_through_the_swarm_equals_transformers(swarm, files):
    prompt = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    want = reference_greedy(files["mla_source"], prompt, NEW_TOKENS, model=reference_deepseek(files["mla_source"]))
    with AutoDistributedModelForCausalLM.from_pretrained(files["mla"], initial_peers=swarm.initial_peers,
                                                         exact=True) as model:
        assert model.model_name == "tiny-deepseek" and model.model_config.mla is not None
        with model.inference_session(max_length=8) as session:
            assert [(h.start, h.end, h.server.quant) for h in session.hops] == [(0, 2, "gguf-f32")]
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert got.tolist() == want.tolist()


def test_gpt_oss_gguf_through_the_swarm_equals_transformers(swarm, files):
    # a prompt longer than the sliding window (16), so the node's sliding layers drop positions
    prompt = torch.randint(0, 256, (1, 30), generator=torch.Generator().manual_seed(6))
    want = reference_greedy(files["oss_source"], prompt, NEW_TOKENS)
    with AutoDistributedModelForCausalLM.from_pretrained(files["oss"], initial_peers=swarm.initial_peers,
                                                         exact=True) as model:
        assert model.model_name == "tiny-gpt-oss" and model.model_config.family == "gpt_oss"
        got = model.generate(prompt, max_new_tokens=NEW_TOKENS)
    assert got.tolist() == want.tolist()


@pytest.mark.parametrize(("file", "hop"), [("q4_0", (0, 4, "gguf-q4_0")), ("q4_k", (0, 2, "gguf-q4_k_m"))])
def test_4_bit_gguf_stays_4_bit_through_the_swarm(file, hop, swarm, files, prompt_ids):
    reference = transformers.AutoModelForCausalLM.from_pretrained(files["root"], gguf_file=files[file].name,
                                                                  dtype=torch.float32).eval()
    prompt = torch.tensor([prompt_ids])
    with torch.no_grad():
        want = reference(prompt).logits
    with AutoDistributedModelForCausalLM.from_pretrained(files[file], initial_peers=swarm.initial_peers) as model:
        with model.inference_session(max_length=prompt.shape[1]) as session, torch.no_grad():
            assert [(h.start, h.end, h.server.quant) for h in session.hops] == [hop]
            got = model.head.logits(session.step(model.head.embed(prompt)))
    # the file's weights through the 4-bit products, which round (test_gguf.py: 1.0% measured in one process)
    assert (got - want).abs().max() <= 0.03 * want.abs().max()


def test_generate_cli_on_the_gguf_file(swarm, files, prompt_ids):
    argv = [*console_script("homeswarm"), "generate", str(files["f32"]), "--initial-peers", *swarm.initial_peers,
            "--prompt", PROMPT, "--max-new-tokens", str(NEW_TOKENS), "--exact", "--json"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
                            env={**os.environ, "HOMESWARM_LOG_LEVEL": "WARNING"})
    assert result.returncode == 0, result.stderr
    want = reference_greedy(files["source"], torch.tensor([prompt_ids]), NEW_TOKENS)
    assert json.loads(result.stdout)["token_ids"] == want[0, len(prompt_ids):].tolist()
    status = subprocess.run([*console_script("homeswarm"), "status", "--initial-peers", *swarm.initial_peers, "--json"],
                            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert status.returncode == 0, status.stderr
    assert '"gguf-q8_0"' in status.stdout and '"gguf-f32"' in status.stdout


def test_quantized_gguf_through_the_swarm_equals_transformers_on_the_file(swarm, files, prompt_ids):
    for daemon in swarm.gguf_daemons[:2]:  # only the Q8_0 node is left of the model's
        swarm.stop(daemon)
    reference = transformers.AutoModelForCausalLM.from_pretrained(files["root"], gguf_file=files["q8_0"].name,
                                                                  dtype=torch.float32).eval()
    want = reference_greedy(files["source"], torch.tensor([prompt_ids]), NEW_TOKENS, model=reference)
    with AutoDistributedModelForCausalLM.from_pretrained(files["q8_0"], initial_peers=swarm.initial_peers,
                                                         model_name=NAME) as model:
        with model.inference_session(max_length=8) as session:
            assert [(h.start, h.end, h.server.quant) for h in session.hops] == [(0, 4, "gguf-q8_0")]
        got = model.generate(torch.tensor([prompt_ids]), max_new_tokens=NEW_TOKENS)
    assert got.tolist() == want.tolist()
