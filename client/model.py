"""AutoDistributedModelForCausalLM: a causal LM whose Transformer blocks run on the swarm.

The client holds only the embeddings, the final norm and the LM head (read from the checkpoint
folder, nothing else: the folder needs only their shards, config.json, the index and the tokenizer; a
Hugging Face repository id downloads just those); every block runs on nodes found on the DHT. ``generate`` follows Hugging
Face semantics: it returns prompt plus new tokens, stops when every sequence has produced an end
token (padding finished ones), greedy unless ``do_sample``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.drafters import Drafter, make_drafter
from homeswarm.client.lora_training import AdapterBlocks, ClientLora
from homeswarm.client.peer_files import fetch_client_files as fetch_peer_files
from homeswarm.client.peer_files import needs_peers as needs_peer_files
from homeswarm.client.remote_blocks import RemoteBlocks
from homeswarm.client.route import RouteManager
from homeswarm.client.sampling import SamplingParams, next_tokens
from homeswarm.client.session import InferenceSession
from homeswarm.client.speculative import MAX_DRAFT, SpeculationStats, SpeculativeDecoder
from homeswarm.client.training import CausalLMOutput, PromptTuning, causal_lm_forward
from homeswarm.client.transport import ChannelPool
from homeswarm.model import ModelConfig, load_head, parse_dtype
from homeswarm.model.digest import block_digests
from homeswarm.model.gguf_files import gguf_folder, is_gguf_folder, is_gguf_path
from homeswarm.model.gguf_reader import model_stem
from homeswarm.model.hub import fetch_client_files, is_hub_id
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.relay import forwarder_address

logger = logging.getLogger(__name__)


def _token_ids(value: Any) -> list[int]:
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


class DistributedModelForCausalLM:
    def __init__(
        self,
        model_dir: str | Path,
        *,
        initial_peers: Sequence[str],
        model_name: str | None = None,
        config: ClientConfig | None = None,
        exact: bool | None = None,
        cache_dir: str | Path | None = None,
        tuning_mode: str | None = None,
        pre_seq_len: int = 0,
        adapter: str | None = None,
    ):
        """``model_dir``: a checkpoint folder, a GGUF file (its stem the default model name), or a Hugging
        Face repository id (``owner/name``, the default model name then) whose config, head shards and
        tokenizer are downloaded into ``cache_dir`` (default: huggingface_hub's cache). ``exact``: route only
        through nodes serving unquantized weights (overrides ``config.exact``). ``tuning_mode``: "ptune" or
        "deep_ptune" with ``pre_seq_len`` trainable prompt positions (``client.training``); None: none.
        ``adapter``: a LoRA adapter served by nodes, by name, for every session (overrides ``config.adapter``;
        a session may name its own)."""
        if is_gguf_path(model_dir):  # a folder of its config and tokenizer; the head's weights read from the file
            model_name = model_name or model_stem(model_dir)
            model_dir = gguf_folder(model_dir)
        elif is_hub_id(model_dir):
            model_name = model_name or str(model_dir)
            model_dir = fetch_client_files(str(model_dir), cache_dir=cache_dir)
        self.model_dir = Path(model_dir)
        self.config = config or ClientConfig()
        if exact is not None:
            self.config = dataclasses.replace(self.config, exact=exact)
        if adapter is not None:
            self.config = dataclasses.replace(self.config, adapter=adapter)
        self.model_config = ModelConfig.from_dir(self.model_dir)
        self.model_name = model_name or self.model_dir.resolve().name
        if not initial_peers:
            raise ValueError("initial_peers is empty: give the multiaddr of at least one peer of the swarm")
        self.dht = SwarmDHT.create(list(initial_peers), client_mode=True)
        # relayed nodes: through libp2p; TLS pinned by each node's record
        self.pool = ChannelPool(partial(forwarder_address, self.dht), require_tls=self.config.require_tls)
        if not is_gguf_folder(self.model_dir) and needs_peer_files(self.model_dir):
            try:  # config.json without the head's tensors: from the swarm's nodes
                embeddings = self.model_config.vocab_size * self.model_config.hidden_size * 4  # float32's bytes
                self.model_dir = fetch_peer_files(self.model_dir, self.dht, self.pool, self.model_name,
                                                  self.model_config.num_hidden_layers, cache_dir,
                                                  max_head_bytes=4 * 2 * embeddings + (1 << 20))
            except BaseException:
                self.dht.shutdown()
                raise
        raw = json.loads((self.model_dir / "config.json").read_text())
        generation_path = self.model_dir / "generation_config.json"
        generation = json.loads(generation_path.read_text()) if generation_path.exists() else {}
        self.eos_token_ids = _token_ids(generation.get("eos_token_id", raw.get("eos_token_id")))
        pad = generation.get("pad_token_id", raw.get("pad_token_id"))
        self.pad_token_id = pad if pad is not None else (self.eos_token_ids[0] if self.eos_token_ids else None)
        self.head = load_head(self.model_dir, dtype=parse_dtype(self.config.dtype))
        if self.config.fast_greedy:
            self.head.prepare_greedy()
        self.last_speculation: SpeculationStats | None = None  # of the last speculative generation
        self.routes = RouteManager(
            self.dht, self.pool, self.model_name, self.model_config.num_hidden_layers, self.config,
            weights=block_digests(self.model_dir) if self.config.check_weights else None,
        )
        self.remote_blocks = RemoteBlocks(self.routes, self.pool, self.config)  # training: Forward/Backward RPCs
        self.lora: ClientLora | None = None  # LoRA matrices the client trains (add_lora)
        if self.config.adapter:  # training through a served adapter: its requests name it
            self.remote_blocks = AdapterBlocks(self.routes, self.pool, self.config)
        self.tuning: PromptTuning | None = None
        if tuning_mode is not None:
            self.tuning = PromptTuning(tuning_mode, pre_seq_len, self.model_config.num_hidden_layers,
                                       self.model_config.hidden_size, dtype=self.head.dtype,
                                       init_std=float(self.head.embed_tokens.weight.float().std()))

    def forward(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None) -> CausalLMOutput:
        """``.logits`` and, with ``labels``, ``.loss`` (shifted cross-entropy) as transformers gives them;
        differentiable through the swarm in ``inputs_embeds`` and the client's parameters."""
        if self.lora is not None and inputs_embeds is None and input_ids is not None:
            # the remote blocks' backward (which returns the LoRA gradients) runs only for an input that needs one
            ids = torch.as_tensor(input_ids)
            input_ids, inputs_embeds = None, self.head.embed(ids[None] if ids.dim() == 1 else ids)
        if self.lora is not None and not inputs_embeds.requires_grad:
            inputs_embeds = inputs_embeds.detach().requires_grad_(True)
        return causal_lm_forward(self.head, self.remote_blocks, self.tuning, input_ids=input_ids,
                                 inputs_embeds=inputs_embeds, labels=labels, attention_mask=attention_mask)

    __call__ = forward

    def add_lora(self, *, r: int = 8, lora_alpha: float = 16.0, target_modules: Sequence[str] = ("q_proj", "v_proj"),
                 use_rslora: bool = False) -> ClientLora:
        """Trainable LoRA matrices for the remote blocks, owned by this client (``client.lora_training``): sent
        with every training request, their gradients returned into ``.grad``, and with every inference session
        when it opens (generation runs with them); in ``parameters()``.
        ``lora.save_pretrained(DIR)`` writes them in PEFT's format, for nodes to serve (``--adapters``)."""
        if self.lora is not None:
            raise ValueError("this model already has its LoRA matrices (model.lora)")
        self.lora = ClientLora(self.model_config, r=r, lora_alpha=lora_alpha, target_modules=target_modules,
                               use_rslora=use_rslora, dtype=self.head.dtype)
        self.remote_blocks = AdapterBlocks(self.routes, self.pool, self.config, self.lora)
        return self.lora

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        """The client's parameters (prompts, its LoRA matrices, then the frozen head), for a torch optimizer."""
        if self.tuning is not None:
            yield from self.tuning.parameters()
        if self.lora is not None:
            yield from self.lora.parameters()
        yield from self.head.parameters()

    @classmethod
    def from_pretrained(
        cls,
        model_dir: str | Path,
        initial_peers: Sequence[str] = (),
        model_name: str | None = None,
        **kwargs: Any,
    ) -> DistributedModelForCausalLM:
        return cls(model_dir, initial_peers=initial_peers, model_name=model_name, **kwargs)

    def inference_session(self, *, max_length: int, batch_size: int = 1,
                          adapter: str | None = None) -> InferenceSession:
        """A session for step-by-step use: ``session.step(hidden)`` runs every block with caches. ``adapter``: the
        LoRA adapter its blocks run with, through the nodes that serve it ("": none; None: the model's)."""
        config = self.config if adapter is None else dataclasses.replace(self.config, adapter=adapter)
        lora = self.lora.entries if self.lora is not None else None  # the client's own matrices (add_lora)
        return InferenceSession(self.routes, self.pool, config, batch_size=batch_size, max_length=max_length,
                                lora=lora)

    @torch.no_grad()
    def generate_stream(
        self,
        input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 20,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        attention_mask: torch.Tensor | None = None,
        session: InferenceSession | None = None,
        speculative: str | Drafter | None = None,
    ) -> Iterator[torch.Tensor]:
        """Yields the next token of every sequence ([batch] ids) as soon as it is chosen.

        ``speculative``: "prompt-lookup", "draft:DIR" or a :class:`Drafter`: the swarm checks several drafted
        tokens per round trip (batch 1; the same tokens as without, or for sampling the same distribution).
        A session passed in then needs ``MAX_DRAFT`` positions of room beyond prompt plus new tokens."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        if ids.dim() != 2 or ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [batch, tokens] with at least one token, got {list(ids.shape)}")
        if attention_mask is not None and not bool(torch.as_tensor(attention_mask).all()):
            raise ValueError("padded batches are not supported yet: give prompts of equal length")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        params = SamplingParams(do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p).validate()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        if max_new_tokens == 0:
            return
        batch = ids.shape[0]
        prefix = self._generation_prefix(speculative)
        if speculative is not None:
            yield from self._generate_speculative(ids, max_new_tokens, params, generator, session, speculative)
            return
        own_session = session is None
        if session is None:
            session = self.inference_session(max_length=prefix + ids.shape[1] + max_new_tokens, batch_size=batch)
        try:
            unfinished = torch.ones(batch, dtype=torch.bool)
            first = self.head.embed(ids)
            if prefix:  # ptune: the tuned prompt before every sequence, as in training
                first = torch.cat([self.tuning.prompts.detach().to(first.dtype)[None].expand(batch, -1, -1), first], 1)
            hidden = session.step(first)
            for i in range(max_new_tokens):
                if params.greedy:
                    tokens = self.head.greedy(hidden)
                else:
                    tokens = next_tokens(self.head.logits(hidden[:, -1:])[:, -1].float(), params, generator)
                if self.pad_token_id is not None and self.eos_token_ids:
                    tokens = torch.where(unfinished, tokens, torch.full_like(tokens, self.pad_token_id))
                yield tokens
                if self.eos_token_ids:
                    unfinished &= ~torch.isin(tokens, torch.tensor(self.eos_token_ids))
                    if not unfinished.any():
                        return
                if i + 1 < max_new_tokens:
                    hidden = session.step(self.head.embed(tokens[:, None]))
        finally:
            if own_session:
                session.close()

    def _generation_prefix(self, speculative: object) -> int:
        """Positions of tuned prompt that generation puts before the sequences (ptune); deep prompts, which
        sessions do not carry, and speculative decoding with a prompt are refused."""
        if self.tuning is None:
            return 0
        if self.tuning.deep_prompts is not None:
            raise NotImplementedError("generation with deep prompts (tuning_mode='deep_ptune') is not supported: "
                                      "inference sessions do not carry per-block prompts; score with model(...)")
        if speculative is not None:
            raise NotImplementedError("speculative decoding with a tuned prompt is not supported")
        return self.tuning.pre_seq_len

    def _generate_speculative(self, ids: torch.Tensor, max_new_tokens: int, params: SamplingParams,
                              generator: torch.Generator | None, session: InferenceSession | None,
                              speculative: str | Drafter) -> Iterator[torch.Tensor]:
        if ids.shape[0] != 1:
            raise ValueError(f"speculative decoding takes one sequence at a time, got a batch of {ids.shape[0]}")
        room = ids.shape[1] + max_new_tokens + MAX_DRAFT
        drafter = make_drafter(speculative, vocab_size=self.model_config.vocab_size, model_dir=self.model_dir,
                               max_length=room) if isinstance(speculative, str) else speculative
        own_session = session is None
        if session is None:
            session = self.inference_session(max_length=room, batch_size=1)

        def run(tokens: list[int], keep_length: int | None) -> torch.Tensor:
            return session.step(self.head.embed(torch.tensor([tokens])), keep_length=keep_length)

        def verify_fn(tokens: list[int], keep_length: int | None) -> torch.Tensor:
            return self.head.logits(run(tokens, keep_length))[0].float()

        def greedy_verify_fn(tokens: list[int], keep_length: int | None) -> list[int]:
            return self.head.greedy(run(tokens, keep_length), every_position=True)[0].tolist()

        try:
            first = self.head.logits(session.step(self.head.embed(ids))[:, -1:])[0, -1].float()
            decoder = SpeculativeDecoder(drafter, verify_fn, params, generator=generator, room=session.max_length,
                                         greedy_verify_fn=greedy_verify_fn)
            self.last_speculation = decoder.stats
            for token in decoder.stream(ids[0].tolist(), first, max_new_tokens, self.eos_token_ids):
                yield torch.tensor([token])
        finally:
            if own_session:
                session.close()

    def generate(
        self,
        input_ids: torch.Tensor | Sequence[int] | Sequence[Sequence[int]],
        *,
        max_new_tokens: int = 20,
        streamer: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Prompt plus new tokens, [batch, T + N], like Hugging Face ``generate``.

        ``streamer``: anything with ``put(ids)`` and ``end()`` (e.g. a transformers TextStreamer).
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        if ids.dim() == 1:
            ids = ids[None]
        new: list[torch.Tensor] = []
        for tokens in self.generate_stream(ids, max_new_tokens=max_new_tokens, **kwargs):
            new.append(tokens)
            if streamer is not None:
                streamer.put(tokens.clone() if len(tokens) > 1 else tokens[:1])
        if streamer is not None:
            streamer.end()
        if not new:
            return ids
        return torch.cat([ids, torch.stack(new, dim=1)], dim=1)

    def close(self) -> None:
        self.pool.close()
        self.dht.shutdown()

    def __enter__(self) -> DistributedModelForCausalLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


AutoDistributedModelForCausalLM = DistributedModelForCausalLM
