"""A client's LoRA matrices on a span (model.lora_training) against PEFT's autograd, in process, float32.

For a dense family (Llama 3: q/v fused into qkv_proj, down_proj) and a MoE family (Qwen3-MoE: attention),
the span's output with the matrices and the gradients with respect to its input and to every matrix
equal those of transformers + PEFT with the same matrices, within FLOAT32_TOL relative; bad matrices
are refused before any compute.
"""

from __future__ import annotations

import pytest
import torch

from homeswarm.model import ModelConfig, load_span
from homeswarm.model.lora import AdapterError
from homeswarm.model.lora_training import ClientMatrices, client_parts, lora_backward, lora_forward
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.lora_adapters import make_lora_adapter, peft_reference
from tests.helpers.moe_checkpoints import make_moe_checkpoint
from tests.helpers.reference import FLOAT32_TOL, rel_err

pytestmark = pytest.mark.timeout(300)
_KEY = "base_model.model.model.layers."


def peft_matrices(peft) -> tuple[list[ClientMatrices], list[tuple[torch.Tensor, torch.Tensor]]]:
    """The PEFT model's LoRA matrices as a client sends them, and PEFT's own parameters in the same order."""
    params = dict(peft.named_parameters())
    matrices, pairs = [], []
    for name in sorted(params):
        if ".lora_A." not in name:
            continue
        block, _, rest = name[len(_KEY):].partition(".")
        module = rest.split(".lora_A.")[0]
        a, b = params[name], params[name.replace(".lora_A.", ".lora_B.")]
        scale = peft.base_model.model.model.layers[int(block)].get_submodule(module).scaling["default"]
        matrices.append(ClientMatrices(int(block), module, a.detach().clone(), b.detach().clone(), scale))
        pairs.append((a, b))
    return matrices, pairs


def check_against_peft(checkpoint, adapter) -> None:
    torch.manual_seed(0)
    peft = peft_reference(checkpoint, adapter)
    for name, param in peft.named_parameters():
        param.requires_grad_("lora_" in name)
    matrices, pairs = peft_matrices(peft)
    assert matrices
    model = peft.base_model.model
    config = ModelConfig.from_dir(checkpoint)
    embeds = model.get_input_embeddings()(torch.randint(0, 256, (2, 9))).detach().requires_grad_(True)
    seen: list[torch.Tensor] = []
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(inputs_embeds=embeds)
    finally:
        hook.remove()
    expected = seen[0]
    grad_output = torch.randn(expected.shape)
    expected.backward(grad_output)
    span = load_span(checkpoint, 0, config.num_hidden_layers)
    with torch.no_grad():
        got = lora_forward(span, embeds.detach(), matrices)
    assert rel_err(got, expected.detach()) < FLOAT32_TOL
    grad_hidden, grad_prompts, grads = lora_backward(span, embeds.detach(), grad_output, matrices)
    assert grad_prompts is None
    assert rel_err(grad_hidden, embeds.grad) < FLOAT32_TOL
    for (grad_a, grad_b), (a, b) in zip(grads, pairs, strict=True):
        assert rel_err(grad_a, a.grad) < FLOAT32_TOL and rel_err(grad_b, b.grad) < FLOAT32_TOL
    for m in matrices:  # the caller's tensors are left as they were
        assert not m.a.requires_grad and m.a.grad is None


def test_dense_gradients_equal_peft(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "llama", "llama3", num_layers=2)
    adapter = make_lora_adapter(checkpoint, tmp_path / "lora", target_modules=("q_proj", "v_proj", "down_proj"))
    torch.set_num_threads(1)
    check_against_peft(checkpoint, adapter)


def test_moe_gradients_equal_peft(tmp_path):
    checkpoint = make_moe_checkpoint(tmp_path / "moe", "qwen3_moe", num_layers=2)
    adapter = make_lora_adapter(checkpoint, tmp_path / "lora", target_modules=("q_proj", "o_proj"))
    check_against_peft(checkpoint, adapter)


def test_bad_matrices_are_refused(tmp_path):
    checkpoint = make_checkpoint(tmp_path / "llama", "llama3", num_layers=2)
    span = load_span(checkpoint, 1, 2)
    a, b = torch.zeros(4, 64), torch.zeros(64, 4)
    cases = [
        ([ClientMatrices(0, "self_attn.q_proj", a, b, 1.0)], "LoRA matrices for block 0, outside blocks [1, 2)"),
        ([ClientMatrices(1, "self_attn.q_proj", a, b, 1.0)] * 2, "block 1 self_attn.q_proj given twice"),
        ([ClientMatrices(1, "self_attn.w9", a, b, 1.0)], "block 1: the blocks have no linear layer 'self_attn.w9'"),
        ([ClientMatrices(1, "self_attn.q_proj", a, torch.zeros(63, 4), 1.0)], "do not fit the layer's 64 -> 64"),
        ([ClientMatrices(1, "self_attn.q_proj", a.double(), b.double(), 1.0)], "must be torch.float32"),
    ]
    for matrices, message in cases:
        with pytest.raises(AdapterError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            client_parts(span, matrices)
