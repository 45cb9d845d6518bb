"""Peak memory of a node serving blocks [a, b) of L, against those blocks' weight bytes.

    python bench/bench_memory.py [--shape large-16x1024] [--spans 0:1 0:4 0:8 0:16]
    python bench/bench_memory.py --shape moe-8x512 --spans 0:1 0:2 2:4 0:8
    python bench/bench_memory.py --spans 0:8 --quant none int8 int4 [--model-dir DIR] [--dtype bfloat16]

The second table is the whole process tree as the OS counts it (the sum of the RSS of the node, its DHT
process, p2pd and torch's shared-memory manager): once ready, after the session, and the sum of their
peaks (VmHWM), against the span's weights in the node's format and the session's KV cache; "tree - w -
kv" is what the runtime takes. ``--model-dir`` measures any checkpoint (a pre-quantized one, say).

The blocks' share is their exact weight bytes (``span_weight_bytes``; k/L of the total for a model
whose blocks are all alike, all experts counted for a Mixture-of-Experts one).

For each span, starts a bootstrap peer and one `join-swarm` node, lets it load, self-test and serve
one 128-token session, then reads the node's peak RSS (VmHWM) and its helper processes: the DHT
process that hivemind forks, the p2pd daemon that one starts, torch's shared-memory manager. Their
peak RSS counts the shared libraries each maps (torch alone is a few hundred MB) once per process, so
the whole tree is also given as PSS (each shared page split between the processes that map it),
read after the session. The fixed runtime cost is what a node serving the `tiny` model (a few KB of
weights) takes. Also reports what the client holds: the bytes of the embeddings, final norm and LM head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import MOE_SHAPES, SHAPES, checkpoint, table  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm  # noqa: E402
from homeswarm.client.transport import HopStream  # noqa: E402
from homeswarm.model import (  # noqa: E402
    CheckpointReader,
    ModelConfig,
    cache_bytes,
    load_head,
    parse_dtype,
    span_weight_bytes,
)
from homeswarm.node import process_memory  # noqa: E402
from homeswarm.protocol import node_pb2  # noqa: E402

SESSION_LENGTH = 160  # the measured session: a 128-token prompt, then 8 decoding steps


def _status_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} for {pid}")


def peak_rss(pid: int) -> int:
    return _status_kib(pid, "VmHWM")


def pss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no Pss for {pid}")


def descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, name) of every process below ``pid`` (found as the node's memory budget finds them)."""
    found = []
    for kid in process_memory.descendants(pid):
        try:
            found.append((kid, Path(f"/proc/{kid}/comm").read_text().strip()))
        except OSError:  # ended meanwhile
            continue
    return found


def weight_bytes(path: Path) -> tuple[int, int]:
    """(bytes of all block weights, bytes of the client's part)."""
    reader = CheckpointReader(path)
    block = head = 0
    for name in reader.names():
        tensor = reader.load([name])[name]
        if name.startswith("model.layers."):
            block += tensor.nbytes
        else:
            head += tensor.nbytes
    return block, head


def tree(pid: int) -> tuple[int, int]:
    """(sum of RSS, sum of peak RSS) of ``pid`` and its descendants."""
    pids = [pid, *(kid for kid, _ in descendants(pid))]
    return sum(_status_kib(p, "VmRSS") for p in pids), sum(peak_rss(p) for p in pids)


def measure_node(path: Path, span: str, hidden: int, *node_args: str) -> dict[str, object]:
    """Peak RSS of the node process and of its helpers (by name), and the PSS of the whole tree."""
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        node = swarm.start_node(path, "--blocks", span, "--max-cache-tokens", "1024", *node_args, timeout=600)
        ready = tree(node.process.pid)
        pool = swarm.pool()
        try:
            a, b = (int(x) for x in span.split(":"))
            stream = HopStream(pool, peer_id=node.info["peer_id"], address=node.info["address"], model=path.name,
                               start=a, end=b, batch_size=1, max_length=SESSION_LENGTH, compression=node_pb2.NONE,
                               connect_timeout=30, step_timeout=120)
            stream.step(1, torch.randn(1, 128, hidden))
            for i in range(8):
                stream.step(2 + i, torch.randn(1, 1, hidden))
            stream.close()
        finally:
            pool.close()
        pid = node.process.pid
        helpers = descendants(pid)
        after, peak = tree(pid)
        return {
            "main": peak_rss(pid),
            "helpers": {name: peak_rss(kid) for kid, name in helpers},
            "helpers_peak": sum(peak_rss(kid) for kid, _ in helpers),
            "tree_pss": pss(pid) + sum(pss(kid) for kid, _ in helpers),
            "tree_ready": ready[0], "tree_after": after, "tree_peak": peak,
        }


def tree_table(path: Path, spans: list[str], quants: list[str], dtype: str) -> str:
    """The process tree per span and weight format (``--quant``), as the OS counts it."""
    config = ModelConfig.from_dir(path)
    mib = 2**20
    rows = []
    for span in spans:
        a, b = (int(x) for x in span.split(":"))
        for quant in quants:
            w = span_weight_bytes(config, a, b, parse_dtype(dtype), quant)
            kv = cache_bytes(config, b - a, 1, SESSION_LENGTH, parse_dtype(dtype))
            m = measure_node(path, span, config.hidden_size, "--quant", quant, "--dtype", dtype)
            ready, after, peak = (int(m[k]) for k in ("tree_ready", "tree_after", "tree_peak"))  # type: ignore[call-overload]
            rows.append([path.name, span, dtype, quant, w / mib, kv / mib, ready / mib, after / mib, peak / mib,
                         (after - w - kv) / mib, f"{peak / ready:.2f}"])
    return table(["model", "blocks", "dtype", "quant", "weights MiB", "session KV MiB", "tree RSS ready MiB",
                  "tree RSS after session MiB", "tree peak MiB", "tree - w - kv MiB", "peak / ready"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="large-16x1024", choices=[*SHAPES, *MOE_SHAPES])
    parser.add_argument("--spans", nargs="+", default=["0:1", "0:4", "0:8", "0:16"])
    parser.add_argument("--quant", nargs="+", default=None, choices=["none", "int8", "int4"],
                        help="measure the process tree in these weight formats (the second table) only")
    parser.add_argument("--dtype", default="float32", help="the nodes' --dtype, with --quant")
    parser.add_argument("--model-dir", type=Path, default=None, help="a checkpoint instead of --shape, with --quant")
    args = parser.parse_args()
    if args.quant is not None:
        print(tree_table(args.model_dir or checkpoint(args.shape), args.spans, args.quant, args.dtype))
        return
    path = checkpoint(args.shape)
    config = ModelConfig.from_dir(path)
    blocks_bytes, head_bytes = weight_bytes(path)
    tiny = measure_node(checkpoint("tiny"), "0:1", ModelConfig.from_dir(checkpoint("tiny")).hidden_size)
    fixed, fixed_pss = tiny["main"], tiny["tree_pss"]
    mib = 2**20
    rows = [["tiny", "0:1", "-", fixed / mib, "-", "-", "-", "-", tiny["helpers_peak"] / mib, fixed_pss / mib, "-",
             "-"]]
    for span in args.spans:
        a, b = (int(x) for x in span.split(":"))
        share = span_weight_bytes(config, a, b, torch.float32)
        kv = cache_bytes(config, b - a, 1, SESSION_LENGTH, torch.float32)
        m = measure_node(path, span, config.hidden_size)
        over = m["main"] - fixed - share
        rows.append([args.shape, span, share / mib, m["main"] / mib, (share + fixed) / mib, over / mib, kv / mib,
                     (over - kv) / mib, m["helpers_peak"] / mib, m["tree_pss"] / mib, (share + fixed_pss) / mib,
                     (m["tree_pss"] - fixed_pss - share) / mib])
    print(f"{args.shape}: block weights {blocks_bytes / mib:.1f} MiB, client part (embeddings, norm, head) "
          f"{head_bytes / mib:.1f} MiB; fixed runtime cost = a node serving the tiny model")
    print("helper processes of the tiny node (peak RSS MiB): "
          + ", ".join(f"{name} {rss / mib:.0f}" for name, rss in tiny["helpers"].items()))  # type: ignore[union-attr]
    print(table(["model", "blocks", "span weights MiB", "node peak RSS MiB", "bound MiB (share + fixed)",
                 "over share+fixed MiB", "session KV cache MiB", "over - KV MiB", "helpers peak RSS MiB",
                 "tree PSS MiB", "tree bound MiB", "tree over MiB"], rows))
    head = load_head(path)
    held = sum(p.nbytes for p in head.parameters())
    print(f"\nclient head in memory: {held / 2**20:.1f} MiB (checkpoint's non-block tensors: {head_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
