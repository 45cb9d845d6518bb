"""Random LoRA adapters made with ``peft`` itself on a tiny checkpoint, and transformers + PEFT as the
reference to check adapted outputs against. Test-only: ``peft`` is a dev dependency, never the node's.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import transformers

from tests.helpers.checkpoints import reference_model


def make_lora_adapter(checkpoint: str | Path, path: str | Path, *, target_modules: tuple[str, ...] = (
        "q_proj", "v_proj", "down_proj"), r: int = 4, alpha: float = 8.0, seed: int = 1,
        **config: Any) -> Path:
    """Save a LoRA adapter for ``checkpoint`` into ``path`` with peft's save_pretrained. Both matrices are
    random (PEFT's own init sets B to zero, which would leave the outputs unchanged), scaled so that the
    adapter changes the logits clearly without swamping the base weights."""
    from peft import LoraConfig, get_peft_model

    transformers.utils.logging.disable_progress_bar()
    base = reference_model(checkpoint)
    lora = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), lora_dropout=0.0, **config)
    model = get_peft_model(base, lora)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=gen) * (0.5 / param.shape[-1] ** 0.5))
    model.save_pretrained(path)
    return Path(path)


def peft_reference(checkpoint: str | Path, adapter: str | Path) -> transformers.PreTrainedModel:
    """transformers' model of ``checkpoint`` with the adapter applied by PEFT (float32, eval mode)."""
    from peft import PeftModel

    return PeftModel.from_pretrained(reference_model(checkpoint), str(adapter)).eval()


def edit_config(adapter: str | Path, **changes: Any) -> None:
    """Change fields of an adapter's adapter_config.json in place (for the refusal tests)."""
    path = Path(adapter) / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))
