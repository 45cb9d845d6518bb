"""Training a model whose blocks run on the swarm: prompt tuning, and a forward pass with a loss.

The client owns every trainable parameter; nodes keep their frozen weights and compute gradients with
respect to their inputs (``RemoteBlocksFunction``). Prompt tuning, as in Petals: ``ptune`` prepends
``pre_seq_len`` trainable embeddings to every sequence; ``deep_ptune`` also adds a trainable prompt per
block ([num_blocks, pre_seq_len, hidden], zeros at first) to the hidden states of those first positions
before each block, sent with each request. Logits and loss are of the sequence's own positions (the
prompt's are dropped), the loss being transformers' shifted cross-entropy (labels of -100 ignored).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from homeswarm.client.remote_blocks import RemoteBlocks, RemoteBlocksFunction
from homeswarm.model import ClientHead

TUNING_MODES = ("ptune", "deep_ptune")
IGNORE_INDEX = -100


@dataclass
class CausalLMOutput:
    """What ``model(...)`` returns, with transformers' names: ``loss`` (None without labels), ``logits``."""

    loss: torch.Tensor | None
    logits: torch.Tensor


class PromptTuning(nn.Module):
    """The trainable prompts: ``prompts`` [pre_seq_len, hidden]; with deep_ptune ``deep_prompts``
    [num_blocks, pre_seq_len, hidden]. Initialised from the global torch generator (seed it to repeat)."""

    def __init__(self, mode: str, pre_seq_len: int, num_blocks: int, hidden_size: int, *,
                 init_std: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if mode not in TUNING_MODES:
            raise ValueError(f"tuning_mode must be one of {', '.join(TUNING_MODES)} (or None), got {mode!r}")
        if pre_seq_len < 1:
            raise ValueError(f"prompt tuning needs pre_seq_len >= 1, got {pre_seq_len}")
        self.mode = mode
        self.pre_seq_len = pre_seq_len
        # at the embeddings' scale, so the prompt starts as an input the blocks have seen the like of
        self.prompts = nn.Parameter(torch.randn(pre_seq_len, hidden_size, dtype=dtype) * init_std)
        self.deep_prompts = (nn.Parameter(torch.zeros(num_blocks, pre_seq_len, hidden_size, dtype=dtype))
                             if mode == "deep_ptune" else None)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """transformers' causal LM loss: position t predicts labels[t + 1], in float32, mean over the labels
    that are not IGNORE_INDEX."""
    if labels.shape != logits.shape[:2]:
        raise ValueError(f"labels must be [batch, tokens] = {list(logits.shape[:2])}, got {list(labels.shape)}")
    shifted = F.pad(labels.to(device=logits.device, dtype=torch.long), (0, 1), value=IGNORE_INDEX)[:, 1:]
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), shifted.reshape(-1),
                           ignore_index=IGNORE_INDEX)


def causal_lm_forward(head: ClientHead, blocks: RemoteBlocks, tuning: PromptTuning | None, *,
                      input_ids: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                      labels: torch.Tensor | None = None,
                      attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
    """Logits (and the loss, with ``labels``) of ``input_ids`` or ``inputs_embeds`` through the swarm,
    differentiable in ``inputs_embeds``, the prompts and any client-side parameter."""
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("give exactly one of input_ids and inputs_embeds")
    if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
        raise ValueError("padded batches are not supported yet: give sequences of equal length")
    if inputs_embeds is None:
        ids = torch.as_tensor(input_ids)
        inputs_embeds = head.embed(ids[None] if ids.dim() == 1 else ids)
    if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != head.config.hidden_size:
        raise ValueError(f"inputs_embeds must be [batch, tokens, {head.config.hidden_size}], "
                         f"got {list(inputs_embeds.shape)}")
    hidden = inputs_embeds.to(head.dtype)
    prefix, deep = 0, None
    if tuning is not None:
        prefix = tuning.pre_seq_len
        prompts = tuning.prompts.to(hidden.dtype)[None].expand(hidden.shape[0], -1, -1)
        hidden = torch.cat([prompts, hidden], dim=1)
        deep = tuning.deep_prompts.to(hidden.dtype) if tuning.deep_prompts is not None else None
    output = RemoteBlocksFunction.apply(hidden, deep, blocks)[:, prefix:]
    weight = head.embed_tokens.weight if head.lm_head is None else head.lm_head.weight
    logits = F.linear(head.norm(output.to(head.device)), weight)
    loss = None
    if labels is not None:
        labels = torch.as_tensor(labels)
        loss = causal_lm_loss(logits, labels[None] if labels.dim() == 1 else labels)  # as input_ids may be
    return CausalLMOutput(loss=loss, logits=logits)
