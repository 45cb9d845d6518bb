"""The span's training passes (model/training.py) and the client's loss, without a network.

Without prompts, ``prompted_forward`` is ``span.forward`` exactly; ``span_backward`` gives what local
autograd through transformers gives for the same blocks, with and without deep prompts; bad prompts
and gradients are refused before any compute; the loss is transformers' ``ForCausalLMLoss``.
"""

from __future__ import annotations

import pytest
import torch
from transformers.loss.loss_utils import ForCausalLMLoss

from homeswarm.client.training import PromptTuning, causal_lm_loss
from homeswarm.model import load_span
from homeswarm.model.training import prompted_forward, span_backward
from tests.helpers.checkpoints import make_checkpoint, reference_model
from tests.helpers.reference import rel_err

PREFIX = 2


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "llama3", "llama3", num_layers=2, seed=5)


def test_without_prompts_the_forward_is_the_spans(checkpoint):
    span = load_span(checkpoint, 0, 2)
    hidden = torch.randn(2, 9, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(prompted_forward(span, hidden), span.forward(hidden))


@pytest.mark.parametrize("with_prompts", [False, True])
def test_backward_equals_autograd_through_transformers(checkpoint, with_prompts):
    gen = torch.Generator().manual_seed(1)
    span = load_span(checkpoint, 0, 2)
    hidden = torch.randn(2, 9, 64, generator=gen)
    grad_output = torch.randn(2, 9, 64, generator=gen)
    prompts = torch.randn(2, PREFIX, 64, generator=gen) if with_prompts else None
    reference = reference_model(checkpoint)
    reference.requires_grad_(False)
    theirs_in = hidden.clone().requires_grad_(True)
    theirs_prompts = prompts.clone().requires_grad_(True) if with_prompts else None
    x = theirs_in
    position_ids = torch.arange(9)[None]
    position_embeddings = reference.model.rotary_emb(x, position_ids)
    mask = torch.full((9, 9), float("-inf")).triu(1)[None, None]
    for i, layer in enumerate(reference.model.layers):
        if with_prompts:
            x = torch.cat([x[:, :PREFIX] + theirs_prompts[i], x[:, PREFIX:]], dim=1)
        x = layer(x, attention_mask=mask, position_ids=position_ids, position_embeddings=position_embeddings)
        x = x[0] if isinstance(x, tuple) else x
    x.backward(grad_output)
    assert rel_err(prompted_forward(span, hidden, prompts), x.detach()) < 1e-5
    grad_hidden, grad_prompts = span_backward(span, hidden, grad_output, prompts)
    assert rel_err(grad_hidden, theirs_in.grad) < 1e-5
    if with_prompts:
        assert rel_err(grad_prompts, theirs_prompts.grad) < 1e-5
    else:
        assert grad_prompts is None


@pytest.mark.parametrize("prompts, grad, message", [
    (torch.zeros(3, PREFIX, 64), None, "deep prompts must be"),
    (torch.zeros(2, 10, 64), None, "deep prompts cover 10 positions"),
    (torch.zeros(2, PREFIX, 64, dtype=torch.float64), None, "deep prompts are torch.float64"),
    (None, torch.zeros(1, 9, 64), "output gradients must match"),
])
def test_bad_prompts_and_gradients_are_refused(checkpoint, prompts, grad, message):
    span = load_span(checkpoint, 0, 2)
    hidden = torch.zeros(2, 9, 64)
    with pytest.raises(ValueError, match=message):
        span_backward(span, hidden, torch.zeros_like(hidden) if grad is None else grad, prompts)


def test_loss_is_transformers_causal_lm_loss():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 7, 11, generator=gen)
    labels = torch.randint(0, 11, (3, 7), generator=gen)
    labels[1, 2:5] = -100
    assert torch.allclose(causal_lm_loss(logits, labels), ForCausalLMLoss(logits, labels, 11), rtol=1e-6)
    with pytest.raises(ValueError, match="labels must be"):
        causal_lm_loss(logits, labels[:, 1:])


def test_prompt_tuning_modes():
    deep = PromptTuning("deep_ptune", 4, 6, 8, init_std=0.5)
    assert deep.prompts.shape == (4, 8) and deep.deep_prompts.shape == (6, 4, 8)
    assert not deep.deep_prompts.any()  # added to the blocks' inputs: zero at first changes nothing
    assert PromptTuning("ptune", 4, 6, 8, init_std=0.5).deep_prompts is None
    with pytest.raises(ValueError, match="tuning_mode"):
        PromptTuning("lora", 4, 6, 8, init_std=0.5)
    with pytest.raises(ValueError, match="pre_seq_len"):
        PromptTuning("ptune", 0, 6, 8, init_std=0.5)
