"""Routes for a LoRA adapter: only through the servers that announce it.

A pure filter beside the planner (``routing.planner``): the servers whose record lists the adapter,
and the planner's own search over them. When they do not cover the blocks, the error names the adapter
and the blocks, so a client learns why no route exists (a swarm that serves the model but not the
adapter), not merely that blocks are missing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from homeswarm.routing.planner import Hop, MissingBlocksError, format_blocks, plan_route
from homeswarm.routing.records import ServerRecord


class AdapterNotServedError(MissingBlocksError):
    """Some blocks are served by no online, unbanned server that has the adapter."""

    def __init__(self, model: str, adapter: str, blocks: Iterable[int], elsewhere: Iterable[str] = ()):
        self.model = model
        self.adapter = adapter
        self.blocks = sorted(blocks)
        others = sorted(set(elsewhere))
        message = (f"no server in the swarm serves LoRA adapter {adapter!r} for block(s) "
                   f"{format_blocks(self.blocks)} of model {model!r}")
        message += f" (adapters announced: {', '.join(others)})" if others else " (no node announces any adapter)"
        RuntimeError.__init__(self, message)


def serving_adapter(records: Iterable[ServerRecord], adapter: str) -> list[ServerRecord]:
    """The records that announce ``adapter``."""
    return [r for r in records if adapter in r.adapters]


def plan_for_adapter(
    records: Iterable[ServerRecord],
    start: int,
    end: int,
    *,
    adapter: str,
    plan: Callable[..., list[Hop]] = plan_route,
    **kwargs: Any,
) -> list[Hop]:
    """``plan(records, start, end, **kwargs)`` (``plan_route`` or ``plan_exact_route``) over the servers that
    announce ``adapter``; with no adapter (``""``), over all of them. AdapterNotServedError names the blocks
    that the adapter's servers leave uncovered."""
    records = list(records)
    if not adapter:
        return plan(records, start, end, **kwargs)
    try:
        return plan(serving_adapter(records, adapter), start, end, **kwargs)
    except MissingBlocksError as e:
        if isinstance(e, AdapterNotServedError):
            raise
        elsewhere = {name for r in records for name in r.adapters}
        raise AdapterNotServedError(kwargs.get("model", "") or e.model, adapter, e.blocks, elsewhere) from None
