"""ModelConfig parsing of transformers 4.x and 5.x config.json layouts, and strict refusals."""

from __future__ import annotations

import json

import pytest
import torch

from homeswarm.model import ModelConfig, parse_dtype
from tests.helpers.checkpoints import FAMILIES, make_checkpoint

BASE = {
    "vocab_size": 256, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_from_dir_reads_what_transformers_writes(tmp_path, family):
    config = ModelConfig.from_dir(make_checkpoint(tmp_path / family, family, num_layers=2))
    assert config.family == {"llama2": "llama", "llama3": "llama"}.get(family, family)
    assert (config.num_hidden_layers, config.head_dim, config.num_key_value_heads) == (2, 16, 2)
    assert config.attention_bias == (family == "qwen2")
    assert config.qk_norm == (family == "qwen3")
    assert (config.rope_scaling is not None) == (family == "llama3")
    assert config.tie_word_embeddings == (family in ("llama3", "qwen2"))
    assert config.sliding_window == (48 if family == "mistral" else None)


def test_transformers_4_layout():
    config = ModelConfig.from_dict({
        **BASE, "model_type": "llama", "rope_theta": 500000.0, "torch_dtype": "bfloat16",
        "rope_scaling": {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })
    assert config.rope_theta == 500000.0 and config.rope_scaling["factor"] == 32.0
    assert config.torch_dtype == "bfloat16" and config.head_dim == 16
    old = ModelConfig.from_dict({**BASE, "model_type": "qwen2", "rope_theta": 1e6,
                                 "rope_scaling": {"type": "default"}})
    assert old.rope_scaling is None and old.rope_theta == 1e6 and old.attention_bias


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt2"}, "gpt2"),
    ({"model_type": None}, "None"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "yarn"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "llama3"),
    ({"hidden_act": "gelu"}, "gelu"),
    ({"num_key_value_heads": 3}, "multiple"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"use_sliding_window": True}, "sliding"),
])
def test_unsupported_configs_are_refused(change, message):
    d = {**BASE, "model_type": "qwen2", **change}
    with pytest.raises(ValueError, match=message):
        ModelConfig.from_dict(d)


def test_from_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        ModelConfig.from_dir(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_dir(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": "mamba"}))
    with pytest.raises(ValueError, match="mamba"):
        ModelConfig.from_dir(tmp_path)


def test_parse_dtype():
    assert parse_dtype("float32") is parse_dtype("fp32") is torch.float32
    assert parse_dtype("bfloat16") is parse_dtype("bf16") is torch.bfloat16
    assert parse_dtype("float16") is parse_dtype("FP16") is torch.float16
    for name in ("int8", "", "float64"):
        with pytest.raises(ValueError, match="dtype"):
            parse_dtype(name)


def test_model_package_never_imports_transformers():
    import subprocess
    import sys

    code = "import sys, homeswarm.model; assert 'transformers' not in sys.modules, 'transformers imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_every_supported_family_has_a_family_file():
    from homeswarm.model.config import SUPPORTED_FAMILIES
    from homeswarm.model.families import FAMILIES

    assert sorted(FAMILIES) == sorted(SUPPORTED_FAMILIES)
