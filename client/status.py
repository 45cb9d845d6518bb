"""`homeswarm status`: what a swarm serves, per model, for operators at a terminal or in scripts.

``swarm_report`` turns the records read from the DHT into plain data (the ``--json`` output):
per model its blocks, per block how many online servers hold it and their summed throughput, the
blocks nobody serves, and every server with its span, state, throughput, free cache and weight
format. ``format_report`` renders that as text, blocks written A:B as ``--blocks`` takes them. Both are
pure; the CLI does the reading.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from homeswarm.protocol.block_range import block_range, block_ranges
from homeswarm.routing.records import ServerRecord, ServerState

_STATE_ORDER = {ServerState.ONLINE: 0, ServerState.JOINING: 1, ServerState.BUSY: 2, ServerState.OFFLINE: 3}


def swarm_report(models: Mapping[str, int], records: Mapping[str, Sequence[ServerRecord]]) -> dict[str, Any]:
    """``models``: name -> number of blocks; ``records``: name -> the servers announced for it."""
    report: dict[str, Any] = {"models": {}}
    for name in sorted(models):
        total = models[name]
        servers = sorted(records.get(name, ()), key=lambda r: (r.start, _STATE_ORDER[r.state], r.peer_id))
        blocks = []
        for block in range(total):
            holding = [r for r in servers if r.state == ServerState.ONLINE and r.start <= block < r.end]
            blocks.append({"block": block, "servers": len(holding),
                           "throughput": sum(r.throughput for r in holding)})
        missing = [b["block"] for b in blocks if b["servers"] == 0]
        report["models"][name] = {
            "num_blocks": total,
            "online_servers": sum(r.state == ServerState.ONLINE for r in servers),
            "missing_blocks": missing,
            "blocks": blocks,
            "servers": [{
                "peer_id": r.peer_id, "public_name": r.public_name, "address": r.address,
                "blocks": [r.start, r.end], "state": r.state.value, "throughput": r.throughput,
                "cache_tokens_left": r.cache_tokens_left, "queue": r.queue, "dtype": r.dtype, "quant": r.quant,
                "protocol_version": r.protocol_version,
            } for r in servers],
        }
    return report


def format_report(report: Mapping[str, Any]) -> str:
    models = report["models"]
    if not models:
        return "no model is announced in this swarm"
    lines: list[str] = []
    for name, model in models.items():
        missing = model["missing_blocks"]
        health = (f"blocks {block_ranges(missing)} served by nobody" if missing
                  else "every block served")
        weakest = min(b["throughput"] for b in model["blocks"]) if model["blocks"] else 0.0
        lines.append(f"{name}: {model['num_blocks']} blocks, {model['online_servers']} online server(s), "
                     f"{health}; weakest block {weakest:.0f} steps/s")
        lines.append(f"  {'blocks':>9}  {'state':<8} {'steps/s':>8} {'cache':>9} {'weights':<12} {'address':<22} "
                     f"peer")
        for s in model["servers"]:
            start, end = s["blocks"]
            weights = s["dtype"] if s["quant"] == "none" else f"{s['quant']}/{s['dtype']}"
            peer = s["peer_id"][-12:] + (f" ({s['public_name']})" if s["public_name"] else "")
            lines.append(f"  {block_range(start, end):>9}  {s['state']:<8} {s['throughput']:>8.0f} "
                         f"{s['cache_tokens_left']:>9} {weights:<12} {s['address']:<22} {peer}")
        lines.append("")
    return "\n".join(lines).rstrip("\n")
