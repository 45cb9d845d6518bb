"""LoRA adapters applied to a span (model.lora) against transformers + PEFT, in process, float32.

Compared: the hidden states leaving the span's last block with those entering PEFT's final norm, for a
dense family (Llama 3, adapters on fused q/v, the MLP's down projection and its fused gate/up) and a MoE
family (Qwen3-MoE, attention only), within tests.helpers.reference.FLOAT32_TOL relative. The base span
must be left exactly as it was; a quantized base layer takes an adapter too; the adapter folders that
PEFT would compute differently, or that target layers the blocks do not have, are refused in one line.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from homeswarm.model import ModelConfig, load_span
from homeswarm.model.families import family_of
from homeswarm.model.lora import AdapterError, LoraLinear, adapted_span, check_targets, load_parts, meta_block
from homeswarm.node.adapters import SpanAdapters, check_adapter_folders
from homeswarm.node.config import ConfigError
from tests.helpers.checkpoints import make_checkpoint, reference_model
from tests.helpers.lora_adapters import edit_config, make_lora_adapter, peft_reference
from tests.helpers.moe_checkpoints import make_moe_checkpoint
from tests.helpers.reference import FLOAT32_TOL, last_hidden_states, rel_err

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-dense")
    checkpoint = make_checkpoint(root / "llama", "llama3", num_layers=3)
    adapter = make_lora_adapter(checkpoint, root / "style", target_modules=("q_proj", "v_proj", "down_proj", "up_proj"))
    return checkpoint, adapter


@pytest.fixture(scope="module")
def peft_dense(dense):
    """PEFT's LlamaForCausalLM with the adapter's LoRA layers in it, and the base model, transformers'."""
    checkpoint, adapter = dense
    return peft_reference(checkpoint, adapter).base_model.model, reference_model(checkpoint)


def _ids() -> torch.Tensor:
    return torch.randint(0, 256, (2, 11), generator=torch.Generator().manual_seed(5))


def _embed(model, ids: torch.Tensor) -> torch.Tensor:
    return model.get_input_embeddings()(ids)


def _span_and_parts(checkpoint, adapter, **load):
    config = ModelConfig.from_dir(checkpoint)
    span = load_span(checkpoint, 0, config.num_hidden_layers, **load)
    return span, load_parts(adapter, span, family_of(config.family).aliases)


@torch.no_grad()
@pytest.mark.parametrize("fuse", [True, False])
def test_adapted_span_equals_peft_and_leaves_the_base_alone(dense, peft_dense, fuse):
    checkpoint, adapter = dense
    peft, base = peft_dense
    ids = _ids()
    span, parts = _span_and_parts(checkpoint, adapter, fuse=fuse)
    view = adapted_span(span, parts)
    hidden = _embed(base, ids)
    expected, _ = last_hidden_states(peft, ids)
    expected_base, _ = last_hidden_states(base, ids)
    assert rel_err(view.forward(hidden), expected) < FLOAT32_TOL
    assert rel_err(span.forward(hidden), expected_base) < FLOAT32_TOL
    assert rel_err(expected, expected_base) > 0.05  # the adapter matters
    assert not any(isinstance(m, LoraLinear) for m in span.modules())  # the base span is untouched
    wrapped = [name for name, m in view.named_modules() if isinstance(m, LoraLinear)]
    fused = ["self_attn.qkv_proj", "mlp.gate_up_proj", "mlp.down_proj"]
    unfused = ["self_attn.q_proj", "self_attn.v_proj", "mlp.up_proj", "mlp.down_proj"]
    assert sorted(wrapped) == sorted(f"layers.{i}.{p}" for i in range(3) for p in (fused if fuse else unfused))


@torch.no_grad()
def test_a_subspan_view_reads_only_its_blocks_and_matches(dense):
    checkpoint, adapter = dense
    config = ModelConfig.from_dir(checkpoint)
    span = load_span(checkpoint, 1, 3)
    adapters = SpanAdapters(span, [str(adapter)])
    assert adapters.names == ("style",) and "style" in adapters and "other" not in adapters
    assert sorted(adapters._parts["style"]) == [1, 2]  # block 0's tensors were not loaded
    sub = span.subspan(2, 3)
    view = adapters.view("style", sub)
    assert adapters.view("style", sub) is view  # built once
    assert (view.start, view.end) == (2, 3)
    full = load_span(checkpoint, 0, 3)
    reference = adapted_span(full, load_parts(adapter, full, family_of(config.family).aliases))
    hidden = torch.randn(1, 5, config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert torch.equal(view.forward(hidden), reference.subspan(2, 3).forward(hidden))
    assert "style" in adapters.missing("nope") and "'nope'" in adapters.missing("nope")


@torch.no_grad()
def test_a_quantized_base_layer_takes_the_adapter(dense, peft_dense):
    checkpoint, adapter = dense
    peft, _ = peft_dense
    ids = _ids()
    span, parts = _span_and_parts(checkpoint, adapter, quant="int8")
    view = adapted_span(span, parts)
    hidden = _embed(peft, ids)
    expected, _ = last_hidden_states(peft, ids)
    quantized_base = span.forward(hidden)
    got = view.forward(hidden)
    # int8 weights: the adapted output is PEFT's up to the quantization's error (3.3e-2 measured through 3
    # random blocks), far closer than the base's (0.88)
    print(f"\nint8 base + adapter vs PEFT: {rel_err(got, expected):.2e}, base alone {rel_err(quantized_base, expected):.2e}")
    assert rel_err(got, expected) < 0.1 and rel_err(quantized_base, expected) > 0.5
    # each wrapped layer adds exactly the low-rank product to what the quantized layer gives
    layer = view.layers[0].self_attn.qkv_proj
    assert isinstance(layer, LoraLinear) and type(layer.base).__name__ == "QuantizedLinearInt8"
    x = torch.randn(7, layer.in_features, generator=torch.Generator().manual_seed(1))
    expected_qkv = layer.base(x).clone()
    for part in layer.parts:
        expected_qkv[:, part.lo : part.hi] += (x @ part.a.T @ part.b.T) * part.scale
    assert torch.allclose(layer(x), expected_qkv, rtol=1e-6, atol=1e-6)


@torch.no_grad()
def test_moe_family_attention_adapter_equals_peft(tmp_path):
    checkpoint = make_moe_checkpoint(tmp_path / "moe", "qwen3_moe", num_layers=2)
    adapter = make_lora_adapter(checkpoint, tmp_path / "attn", target_modules=("q_proj", "k_proj", "v_proj", "o_proj"))
    peft = peft_reference(checkpoint, adapter).base_model.model
    ids = _ids()
    span, parts = _span_and_parts(checkpoint, adapter)
    expected, _ = last_hidden_states(peft, ids)
    got = adapted_span(span, parts).forward(_embed(peft, ids))
    assert rel_err(got, expected) < FLOAT32_TOL


@pytest.fixture
def adapter_copy(dense, tmp_path):
    checkpoint, adapter = dense
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (copy / name).write_bytes((adapter / name).read_bytes())
    return checkpoint, copy


@pytest.mark.parametrize("changes, message", [
    ({"use_dora": True}, "DoRA (use_dora) is not supported"),
    ({"bias": "all"}, "bias='all' is not supported (only 'none')"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save is not supported"),
    ({"rank_pattern": {"q_proj": 8}}, "per-module ranks (rank_pattern) is not supported"),
    ({"fan_in_fan_out": True}, "fan_in_fan_out (Conv1D base layers) is not supported"),
    ({"peft_type": "IA3"}, "peft_type 'IA3' is not supported (LORA only)"),
    ({"r": 0}, "r must be a positive integer, got 0"),
])
def test_unsupported_configs_are_refused_in_one_line(adapter_copy, changes, message):
    checkpoint, folder = adapter_copy
    edit_config(folder, **changes)
    with pytest.raises(ConfigError) as caught:
        check_adapter_folders([str(folder)], ModelConfig.from_dir(checkpoint))
    assert f"--adapters: adapter 'copy': {folder}/adapter_config.json: {message}" == str(caught.value)


def test_bad_weights_are_refused(adapter_copy):
    checkpoint, folder = adapter_copy
    config = ModelConfig.from_dir(checkpoint)
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "base_model.model.lm_head.lora_A.weight": torch.zeros(4, 64)}, weights)
    with pytest.raises(ConfigError, match="'base_model.model.lm_head.lora_A.weight' is not a LoRA matrix of a block"):
        check_adapter_folders([str(folder)], config)
    renamed = {k.replace("down_proj", "w9"): v for k, v in tensors.items()}
    save_file(renamed, weights)
    with pytest.raises(ConfigError, match="the blocks have no linear layer 'mlp.w9' to adapt"):
        check_adapter_folders([str(folder)], config)
    key = next(k for k in tensors if "q_proj.lora_B" in k)
    save_file({**tensors, key: torch.zeros(5, 4)}, weights)  # q_proj has 64 outputs
    check_adapter_folders([str(folder)], config)  # shapes are checked when the span's tensors load
    with pytest.raises(ConfigError, match=r"block 0 self_attn.q_proj: lora_A \(4, 64\) and lora_B \(5, 4\) do not "
                                          r"fit the layer's 64 -> 64 features at rank 4"):
        SpanAdapters(load_span(checkpoint, 0, 3), [str(folder)])
    weights.unlink()
    with pytest.raises(ConfigError, match="adapter_model.safetensors: missing"):
        check_adapter_folders([str(folder)], config)
    with pytest.raises(ConfigError, match="is not a folder"):
        check_adapter_folders([str(folder / "nowhere")], config)


def test_config_file_errors(adapter_copy):
    checkpoint, folder = adapter_copy
    (folder / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="must hold a JSON object"):
        check_targets(folder, meta_block(ModelConfig.from_dir(checkpoint)))
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="cannot read it as JSON"):
        check_targets(folder, meta_block(ModelConfig.from_dir(checkpoint)))


def test_rslora_scale(adapter_copy):
    _, folder = adapter_copy
    from homeswarm.model.lora import read_settings

    assert read_settings(folder).scale == 8.0 / 4
    edit_config(folder, use_rslora=True)
    assert read_settings(folder).scale == 8.0 / 2
    assert json.loads((folder / "adapter_config.json").read_text())["use_rslora"] is True
