"""Weights from peers on loopback: how long a node with only config.json takes to join when its blocks come
from 1 or from 3 peers, and what uploading costs a node's decoding steps.

    python bench/bench_peer_weights.py [--shape small-8x256] [--rounds 3] [--tokens 24] [--part join|upload|both]

One swarm: one seeder serving every block under the model name ``bench-1``, three under ``bench-3`` (the
same checkpoint; a digest list beside config.json lets a single seeder do). Join: a node started with a
folder holding only config.json and the digest list, every block (``--blocks 0:N``), a fresh cache folder,
``--throughput`` given (no self-test); the table gives the seconds from start to its ready file and the
seconds its log says the fetch took, each the median over rounds, the two cases alternating in order
round by round, and the median of the per-round ratios. Uploads: a client decodes ``--tokens`` greedy tokens
through one ``bench-3`` seeder, alone or while a separate process pulls blocks from that seeder over the
Weights rpc without pause (at the seeder's --upload-limit); the two alternate round by round, and the table
gives the median per-token seconds of each and the median of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import checkpoint, table  # noqa: E402

NODE_ARGS = ("--throughput", "100", "--compute-threads", "1")
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})")


def drain(address: str, cert_file: str, model: str, blocks: int) -> None:
    """Pull blocks from the node at ``address`` until killed (the uploads' load, in its own process)."""
    import grpc

    from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc
    from homeswarm.routing.tls import channel_credentials, channel_options

    cert = Path(cert_file).read_text() if cert_file else ""
    channel = (grpc.secure_channel(address, channel_credentials(cert), options=channel_options()) if cert
               else grpc.insecure_channel(address))
    stub = node_pb2_grpc.NodeStub(channel)
    while True:
        for block in range(blocks):
            for _ in stub.Weights(node_pb2.WeightsRequest(protocol_version=PROTOCOL_VERSION, model=model, block=block)):
                pass


def _log_time(line: str) -> float | None:
    match = _STAMP.match(line)
    return datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp() if match else None


def fetch_seconds(log: str) -> float:
    """Seconds between the node's "fetching block(s)" and "fetched block(s)" log lines."""
    start = next(_log_time(line) for line in log.splitlines() if "fetching block(s)" in line)
    end = next(_log_time(line) for line in log.splitlines() if "fetched block(s)" in line)
    return end - start


def join_once(swarm, bare: Path, model: str, blocks: int, work: Path) -> tuple[float, float]:  # noqa: ANN001
    cache = Path(tempfile.mkdtemp(dir=work, prefix="cache-"))
    t0 = time.perf_counter()
    node = swarm.start_node(bare, "--model-name", model, "--blocks", f"0:{blocks}", "--cache-dir", str(cache),
                            *NODE_ARGS, timeout=600)
    seconds = time.perf_counter() - t0
    fetch = fetch_seconds(node.log())
    swarm.stop(node)  # it would seed the next rounds otherwise
    swarm.nodes.remove(node)
    shutil.rmtree(cache)
    return seconds, fetch


def join_table(joins: dict[int, list[tuple[float, float]]]) -> str:
    rows = [[f"{p} peer(s)", statistics.median(j for j, _ in joins[p]), statistics.median(f for _, f in joins[p])]
            for p in (1, 3)]
    rows.append(["3 / 1 (median of per-round ratios)",
                 statistics.median(a[0] / b[0] for a, b in zip(joins[3], joins[1], strict=True)),
                 statistics.median(a[1] / b[1] for a, b in zip(joins[3], joins[1], strict=True))])
    return table(["weights from", "join s", "fetch s"], rows)


def decode_seconds(model, tokens: int) -> float:  # noqa: ANN001
    import torch

    ids = torch.randint(0, model.model_config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    model.generate(ids, max_new_tokens=tokens)
    return (time.perf_counter() - t0) / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="small-8x256")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--part", choices=["join", "upload", "both"], default="both")
    parser.add_argument("--drain", nargs=4, metavar=("ADDRESS", "CERT", "MODEL", "BLOCKS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.drain:
        drain(args.drain[0], args.drain[1], args.drain[2], int(args.drain[3]))
        return

    from homeswarm.client.config import ClientConfig
    from homeswarm.client.local_swarm import LocalSwarm
    from homeswarm.client.model import AutoDistributedModelForCausalLM
    from homeswarm.node.peer_folder import DIGESTS_FILE, write_digests

    path = checkpoint(args.shape)
    blocks = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    weights = sum(p.stat().st_size for p in path.glob("*.safetensors"))
    with tempfile.TemporaryDirectory(prefix="homeswarm-peer-weights-") as tmp:
        work = Path(tmp)
        bare = work / "bare"
        bare.mkdir()
        shutil.copy2(path / "config.json", bare / "config.json")
        write_digests(path, bare / DIGESTS_FILE, cache_path=work / "digests.json")
        with LocalSwarm(work / "swarm", env={"XDG_CACHE_HOME": str(work / "xdg"), "OMP_NUM_THREADS": "1"}) as swarm:
            swarm.start_bootstrap()
            seeders = [swarm.start_node(path, "--model-name", name, "--blocks", f"0:{blocks}", *NODE_ARGS, wait=False)
                       for name in ("bench-1", "bench-3", "bench-3", "bench-3")]
            for node in seeders:
                swarm.wait_ready(node, timeout=600)
            joins: dict[int, list[tuple[float, float]]] = {1: [], 3: []}
            for r in range(args.rounds if args.part != "upload" else 0):
                for peers in ((1, 3) if r % 2 == 0 else (3, 1)):
                    joins[peers].append(join_once(swarm, bare, f"bench-{peers}", blocks, work))
                    print(f"round {r}: from {peers} peer(s): join {joins[peers][-1][0]:.2f} s, "
                          f"fetch {joins[peers][-1][1]:.2f} s", flush=True)
            if args.part != "upload":
                print(f"\njoin with weights from peers ({args.shape}, {blocks} blocks, {weights / 1e6:.0f} MB in all; "
                      f"seeders at the default --upload-limit 20MB/s; median of {args.rounds} rounds)")
                print(join_table(joins))
            if args.part == "join":
                return

            target = seeders[1]
            cert = swarm.workdir / "target.pem"
            cert.write_text(target.info.get("tls_cert", ""))
            steps: dict[str, list[float]] = {"idle": [], "uploading": []}
            config = ClientConfig(mirrors=False)
            for other in seeders[2:]:  # the client's route then goes through the target alone
                swarm.stop(other)
                swarm.nodes.remove(other)
            with AutoDistributedModelForCausalLM.from_pretrained(path, initial_peers=swarm.initial_peers,
                                                                 model_name="bench-3", config=config) as model:
                decode_seconds(model, 4)  # warm-up
                for r in range(args.rounds * 2):
                    for mode in (("idle", "uploading") if r % 2 == 0 else ("uploading", "idle")):
                        drainer = None
                        if mode == "uploading":
                            drainer = subprocess.Popen(
                                [sys.executable, __file__, "--drain", target.info["address"],
                                 str(cert) if cert.read_text() else "", "bench-3", str(blocks)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                            time.sleep(2.0)  # its start-up, and its first blocks flowing
                        try:
                            steps[mode].append(decode_seconds(model, args.tokens))
                        finally:
                            if drainer is not None:
                                drainer.kill()
                                drainer.wait()
                    print(f"round {r}: idle {steps['idle'][-1] * 1000:.1f} ms/token, uploading "
                          f"{steps['uploading'][-1] * 1000:.1f} ms/token", flush=True)
            print(f"\ndecoding through a node while it uploads ({args.shape}, {args.tokens} tokens per round, "
                  f"{args.rounds * 2} rounds; a separate process pulls its blocks without pause)")
            rows = [[m, statistics.median(steps[m]) * 1000] for m in ("idle", "uploading")]
            rows.append(["uploading / idle (median of per-round ratios)",
                         statistics.median(u / i for u, i in zip(steps["uploading"], steps["idle"], strict=True))])
            print(table(["node", "ms per token"], rows))


if __name__ == "__main__":
    main()
