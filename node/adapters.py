"""The LoRA adapters a node serves beside its base weights (``join-swarm --adapters DIR ...``).

Responsibility: check the folders when the node starts, before any weight is loaded (a config we would
compute differently from PEFT, a target the model's blocks do not have: one-line ``ConfigError``, exit 2);
load, for each serving period's span, only the adapter tensors of its blocks; hand the service an adapted
view of a (sub)span per adapter name, built once and kept (the compute executor batches steps of the same
span object, so steps of one adapter batch together and never with the base span's).

Invariant: the base span is never changed; a request without an adapter runs it exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from homeswarm.model import BlockSpan, ModelConfig
from homeswarm.model.families import family_of
from homeswarm.model.lora import AdapterError, LoraPart, adapted_span, check_targets, load_parts, meta_block
from homeswarm.node.config import ConfigError


def adapter_name(folder: str | Path) -> str:
    """An adapter's name: its folder's name (NodeConfig checks it is a valid one)."""
    return Path(folder).name


def check_adapter_folders(folders: Sequence[str], config: ModelConfig) -> None:
    """ConfigError naming the folder and the problem, for the first folder that cannot be served."""
    if not folders:
        return
    aliases = family_of(config.family).aliases
    block = meta_block(config, 0)
    for folder in folders:
        if not Path(folder).is_dir():
            raise ConfigError(f"--adapters: {folder} is not a folder")
        try:
            check_targets(folder, block, aliases)
        except AdapterError as e:
            raise ConfigError(f"--adapters: adapter {adapter_name(folder)!r}: {e}") from None


class SpanAdapters:
    """The adapters' tensors for one span, and adapted views of its subspans by adapter name."""

    def __init__(self, span: BlockSpan, folders: Sequence[str]) -> None:
        self.span = span
        aliases = family_of(span.config.family).aliases
        self._parts: dict[str, dict[int, dict[str, list[LoraPart]]]] = {}
        for folder in folders:
            try:
                self._parts[adapter_name(folder)] = load_parts(folder, span, aliases)
            except AdapterError as e:
                raise ConfigError(f"--adapters: adapter {adapter_name(folder)!r}: {e}") from None
        self._views: dict[tuple[str, int, int], BlockSpan] = {}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._parts)

    def __contains__(self, name: object) -> bool:
        return name in self._parts

    def view(self, name: str, sub: BlockSpan) -> BlockSpan:
        """``sub`` (the span or one of its subspans) with adapter ``name`` applied; KeyError if not served."""
        key = (name, sub.start, sub.end)
        view = self._views.get(key)
        if view is None:
            view = self._views[key] = adapted_span(sub, self._parts[name])
        return view

    def missing(self, name: str) -> str:
        """Why a request naming ``name`` is refused here (the message of NOT_FOUND)."""
        served = ", ".join(self.names) if self._parts else "none"
        return f"this node does not serve LoRA adapter {name!r} (adapters served here: {served})"
