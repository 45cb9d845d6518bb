"""Block digests of GGUF files: an F32 GGUF's blocks have the digests of the float32 safetensors checkpoint
it was written from (llama's permuted Q/K rows, Qwen3-MoE's experts one by one and its dense layer,
DeepSeek's split kv_b_proj and score-correction bias, GPT-OSS's fused stacks); F16, Q8_0 and Q4_0 files of
the same checkpoint have other digests, each its own; digests are cached by the files' size and time.
"""

from __future__ import annotations

import os

import pytest
import torch

from homeswarm.model.digest import block_digests
from homeswarm.model.gguf_files import gguf_folder
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint
from tests.helpers.gguf_checkpoints import write_gguf
from tests.helpers.gguf_families import write_deepseek_gguf, write_gpt_oss_gguf
from tests.helpers.gpt_oss_checkpoints import make_gpt_oss_checkpoint
from tests.helpers.moe_checkpoints import make_moe_checkpoint


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("gguf-digest")


def _digests(root, path) -> dict[int, str]:
    return block_digests(gguf_folder(path, cache_dir=root / "folders"), cache_path=root / "digests.json")


@pytest.mark.parametrize("family", ["llama2", "qwen3_moe", "deepseek_v3", "gpt_oss"])
def test_f32_gguf_has_the_source_checkpoints_digests(family, root):
    if family == "llama2":
        source = make_checkpoint(root / family, family, num_layers=2, seed=31)
        path = write_gguf(source, root / f"{family}.gguf", family, "F32")
    elif family == "qwen3_moe":  # layer 1 dense
        source = make_moe_checkpoint(root / family, family, num_layers=2, seed=31)
        path = write_gguf(source, root / f"{family}.gguf", family, "F32")
    elif family == "deepseek_v3":
        source = make_deepseek_checkpoint(root / family, family, num_layers=2, seed=31)
        path = write_deepseek_gguf(source, root / f"{family}.gguf")
    else:
        source = make_gpt_oss_checkpoint(root / family, num_layers=2, seed=31)
        path = write_gpt_oss_gguf(source, root / f"{family}.gguf")
    want = block_digests(source, cache_path=root / "digests.json")
    assert sorted(want) == [0, 1]
    assert _digests(root, path) == want


def test_quantized_and_f16_ggufs_have_their_own_digests(root):
    source = make_checkpoint(root / "src", "llama2", num_layers=2, seed=32)
    float32 = block_digests(source, cache_path=root / "digests.json")
    seen = {tuple(float32.values())}
    for qtype in ("F16", "Q8_0", "Q4_0"):
        path = write_gguf(source, root / f"llama-{qtype}.gguf", "llama2", qtype)
        digests = _digests(root, path)
        assert sorted(digests) == [0, 1] and digests[0] != digests[1]
        assert tuple(digests.values()) not in seen, qtype
        seen.add(tuple(digests.values()))
        assert _digests(root, path) == digests  # from the cache
        os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1))  # touched: hashed again, same
        assert block_digests(gguf_folder(path, cache_dir=root / "folders2"), cache_path=root / "other.json") == digests


def test_bf16_gguf_has_the_bfloat16_checkpoints_digests(root):
    """The hub's checkpoints are bfloat16: a BF16 file of one (its norms kept F32 by llama.cpp) has its digests."""
    from safetensors.torch import load_file, save_file

    source = make_checkpoint(root / "bf16-src", "llama2", num_layers=2, seed=33)
    hub = root / "bf16-hub"
    hub.mkdir()
    (hub / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in tensors.items()}, str(hub / "model.safetensors"))
    path = write_gguf(source, root / "llama-BF16.gguf", "llama2", "BF16")
    want = block_digests(hub, cache_path=root / "digests.json")
    assert _digests(root, path) == want
    assert want != block_digests(source, cache_path=root / "digests.json")
