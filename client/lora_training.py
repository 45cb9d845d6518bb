"""LoRA for remote blocks: a served adapter in training requests, and LoRA matrices the client owns.

``ClientLora`` holds trainable LoRA matrices for every block's targeted projections, laid out and
initialised as PEFT does (A Kaiming-uniform, B zero, scale ``lora_alpha / r`` or ``/ sqrt(r)``), and saves
them in PEFT's format (``save_pretrained``): the folder can then be served by nodes (``--adapters``) or
loaded by ``peft``. ``AdapterBlocks`` is the training path (``RemoteBlocks``) with, on every Forward and
Backward request, the model's served adapter and the matrices of the request's blocks; each Backward
answer's matrix gradients are added to the matrices' ``.grad`` once the backward pass is done, so
``loss.backward()`` and a torch optimizer train them. Volunteers keep nothing between requests. Inference
sessions send the matrices when they open (``ClientLora.entries``), so generation runs with them too.

Failover as in ``RemoteBlocks``: a hop's gradients count only once it has answered in full; those of a
replacement chain only once the whole chain has, so a retried hop never adds its gradients twice.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from homeswarm.client.config import ClientConfig
from homeswarm.client.remote_blocks import RemoteBlocks, Trace
from homeswarm.client.route import RouteManager
from homeswarm.client.transport import ChannelPool, HopFailed
from homeswarm.model import ModelConfig
from homeswarm.model.families import family_of
from homeswarm.model.lora import checkpoint_path, meta_block
from homeswarm.protocol import node_pb2, serialize_tensor
from homeswarm.routing.planner import Hop


class ClientLora(nn.Module):
    """Trainable LoRA matrices of the projections named ``target_modules`` (their last name, as PEFT's
    ``target_modules``: "q_proj", "down_proj") in every block; ``lora_A[i]`` [r, in], ``lora_B[i]`` [out, r]
    for ``targets[i]`` = (block, checkpoint path). Initialised from the global torch generator."""

    def __init__(self, config: ModelConfig, *, r: int = 8, lora_alpha: float = 16.0,
                 target_modules: Sequence[str] = ("q_proj", "v_proj"), use_rslora: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if r < 1 or not math.isfinite(lora_alpha):
            raise ValueError(f"LoRA needs r >= 1 and a finite lora_alpha, got r={r}, lora_alpha={lora_alpha}")
        self.r, self.lora_alpha, self.use_rslora = r, float(lora_alpha), use_rslora
        self.target_modules = tuple(target_modules)
        self.scale = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        aliases = family_of(config.family).aliases
        self.targets: list[tuple[int, str]] = []
        shapes = []
        for layer in range(config.num_hidden_layers):
            for name, module in meta_block(config, layer, fuse=False).named_modules():
                if name.rpartition(".")[2] in self.target_modules and isinstance(module, nn.Linear):
                    self.targets.append((layer, checkpoint_path(name, aliases)))
                    shapes.append((module.in_features, module.out_features))
        if not self.targets:
            raise ValueError(f"no linear layer of the blocks is named {', '.join(self.target_modules)}")
        self.lora_A = nn.ParameterList(nn.Parameter(torch.empty(r, fan_in, dtype=dtype)) for fan_in, _ in shapes)
        self.lora_B = nn.ParameterList(nn.Parameter(torch.zeros(fan_out, r, dtype=dtype)) for _, fan_out in shapes)
        for a in self.lora_A:  # PEFT's (and nn.Linear's) default
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))

    def indices(self, start: int, end: int) -> list[int]:
        """The targets of blocks [start, end), by index."""
        return [i for i, (block, _) in enumerate(self.targets) if start <= block < end]

    def entries(self, start: int, end: int) -> list[node_pb2.LoraMatrices]:
        """The matrices of blocks [start, end) as a request carries them (their current values)."""
        return [node_pb2.LoraMatrices(block=self.targets[i][0], module=self.targets[i][1], scale=self.scale,
                                      a=serialize_tensor(self.lora_A[i].detach().contiguous()),
                                      b=serialize_tensor(self.lora_B[i].detach().contiguous()))
                for i in self.indices(start, end)]

    def save_pretrained(self, folder: str | Path, base_model_name_or_path: str = "") -> Path:
        """Write the matrices as ``peft``'s ``save_pretrained`` does (adapter_config.json and
        adapter_model.safetensors, float32)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for (block, path), a, b in zip(self.targets, self.lora_A, self.lora_B, strict=True):
            key = f"base_model.model.model.layers.{block}.{path}"
            tensors[f"{key}.lora_A.weight"] = a.detach().float().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.detach().float().contiguous()
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        config = {"peft_type": "LORA", "r": self.r, "lora_alpha": self.lora_alpha, "use_rslora": self.use_rslora,
                  "target_modules": list(self.target_modules), "bias": "none", "lora_dropout": 0.0,
                  "fan_in_fan_out": False, "modules_to_save": None, "task_type": "CAUSAL_LM",
                  "base_model_name_or_path": base_model_name_or_path, "inference_mode": True}
        (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
        return folder


class AdapterBlocks(RemoteBlocks):
    """``RemoteBlocks`` whose requests carry ``config.adapter`` and the matrices of ``lora`` (None: none)."""

    def __init__(self, routes: RouteManager, pool: ChannelPool, config: ClientConfig,
                 lora: ClientLora | None = None) -> None:
        super().__init__(routes, pool, config)
        self.lora = lora
        self._staged: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # the current hop's answer
        self._kept: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # answers of completed hops

    def _plan(self, start: int, end: int) -> list[Hop]:
        return self.routes.plan(start, end, exact=True, adapter=self.config.adapter)

    def _call(self, hop: Hop, method: str, request: Any) -> Any:  # noqa: ANN401
        request.adapter = self.config.adapter
        indices = self.lora.indices(request.start_block, request.end_block) if self.lora is not None else []
        if indices:
            request.lora.extend(self.lora.entries(request.start_block, request.end_block))  # type: ignore[union-attr]
        response = super()._call(hop, method, request)
        if method == "Backward" and indices:
            if len(response.grad_lora) != len(indices):
                raise HopFailed(hop.peer_id, hop.address, f"answered {len(response.grad_lora)} LoRA gradients, "
                                f"{len(indices)} expected")
            self._staged = [(i, self._decode(hop, g.a, self.lora.lora_A[i].detach()),  # type: ignore[union-attr]
                             self._decode(hop, g.b, self.lora.lora_B[i].detach()))  # type: ignore[union-attr]
                            for i, g in zip(indices, response.grad_lora, strict=True)]
        return response

    def backward_hop(self, hop: Hop, hidden: torch.Tensor, grad: torch.Tensor,
                     prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._staged = []
        result = super().backward_hop(hop, hidden, grad, prompts)
        self._kept.extend(self._staged)  # the hop answered in full
        self._staged = []
        return result

    def _backward_chain(self, chain: list[Hop], inputs: list[torch.Tensor], grad: torch.Tensor,
                        prompts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        kept = len(self._kept)
        try:
            return super()._backward_chain(chain, inputs, grad, prompts)
        except HopFailed:
            del self._kept[kept:]  # the chain is retried whole: its hops' gradients would count twice
            raise

    def backward(self, trace: Trace, grad: torch.Tensor,
                 prompts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._kept = []
        result = super().backward(trace, grad, prompts)
        if self.lora is not None:
            for i, grad_a, grad_b in self._kept:
                for param, g in ((self.lora.lora_A[i], grad_a), (self.lora.lora_B[i], grad_b)):
                    g = g.to(param.dtype)
                    param.grad = g if param.grad is None else param.grad + g
        self._kept = []
        return result
