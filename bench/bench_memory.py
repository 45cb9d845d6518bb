"""Peak memory of a node serving k of L blocks, against (k/L) x the checkpoint's weight bytes.

    python bench/bench_memory.py [--shape large-16x1024] [--spans 0:1 0:4 0:8 0:16]

For each span, starts a bootstrap peer and one `join-swarm` node, lets it load, self-test and serve
one 128-token session, then reads the node's peak RSS (VmHWM) and that of its DHT helper process.
The fixed runtime cost is what a node serving the `tiny` model (a few KB of weights) peaks at.
Also reports what the client holds: the bytes of the embeddings, final norm and LM head.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import SHAPES, checkpoint, table  # noqa: E402
from homeswarm.client.local_swarm import LocalSwarm  # noqa: E402
from homeswarm.client.transport import ChannelPool, HopStream  # noqa: E402
from homeswarm.model import CheckpointReader, ModelConfig, load_head  # noqa: E402
from homeswarm.protocol import node_pb2  # noqa: E402


def peak_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


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


def measure_node(path: Path, span: str, hidden: int) -> tuple[int, int]:
    with LocalSwarm() as swarm:
        swarm.start_bootstrap()
        node = swarm.start_node(path, "--blocks", span, "--max-cache-tokens", "1024", timeout=600)
        pool = ChannelPool()
        try:
            a, b = (int(x) for x in span.split(":"))
            stream = HopStream(pool, peer_id=node.info["peer_id"], address=node.info["address"], model=path.name,
                               start=a, end=b, batch_size=1, max_length=160, compression=node_pb2.NONE,
                               connect_timeout=30, step_timeout=120)
            stream.step(1, torch.randn(1, 128, hidden))
            for i in range(8):
                stream.step(2 + i, torch.randn(1, 1, hidden))
            stream.close()
        finally:
            pool.close()
        main = peak_rss(node.process.pid)
        helpers = sum(peak_rss(c) for c in children(node.process.pid) if Path(f"/proc/{c}/status").exists())
        return main, helpers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shape", default="large-16x1024", choices=list(SHAPES))
    parser.add_argument("--spans", nargs="+", default=["0:1", "0:4", "0:8", "0:16"])
    args = parser.parse_args()
    path = checkpoint(args.shape)
    config = ModelConfig.from_dir(path)
    blocks_bytes, head_bytes = weight_bytes(path)
    fixed, fixed_helpers = measure_node(checkpoint("tiny"), "0:1", ModelConfig.from_dir(checkpoint("tiny")).hidden_size)
    rows = [["tiny", "0:1", "-", fixed / 2**20, "-", "-", fixed_helpers / 2**20]]
    for span in args.spans:
        a, b = (int(x) for x in span.split(":"))
        share = (b - a) / config.num_hidden_layers * blocks_bytes
        main_rss, helpers = measure_node(path, span, config.hidden_size)
        rows.append([args.shape, span, share / 2**20, main_rss / 2**20, (share + fixed) / 2**20,
                     (main_rss - fixed - share) / 2**20, helpers / 2**20])
    print(f"{args.shape}: block weights {blocks_bytes / 2**20:.1f} MiB, client part (embeddings, norm, head) "
          f"{head_bytes / 2**20:.1f} MiB; fixed runtime cost = a node serving the tiny model")
    print(table(["model", "blocks", "(k/L) x weights MiB", "node peak RSS MiB", "bound MiB (share + fixed)",
                 "over share+fixed MiB", "DHT helper processes MiB"], rows))
    head = load_head(path)
    held = sum(p.nbytes for p in head.parameters())
    print(f"\nclient head in memory: {held / 2**20:.1f} MiB (checkpoint's non-block tensors: {head_bytes / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
