"""A node's memory as the operating system sees it: real `join-swarm` daemons, their process trees' RSS.

Four nodes start side by side, each under `--max-memory 1.1GiB` and choosing its blocks itself: float32,
int8 and int4 nodes of an 8-block Llama with hidden size 1024 (49 MiB of float32 weights a block), and a
node of a pre-quantized (compressed-tensors int4) Mixture-of-Experts checkpoint split into shards. Each
then serves a 128-token prompt and a few decoding steps. Checked against what the OS reports (the RSS
of the node, its DHT process, p2pd and torch's shared-memory manager, from /proc):

- the tree stays within `--max-memory`;
- the tree holds what the node says it holds, within 10%: its runtime (measured at start, once the
  DHT runs, plus working memory; from its log), its weights as quantized (``span_weight_bytes``) and
  the session's KV cache (``cache_bytes``) -- a node that kept float copies of quantized weights
  (0.3 GiB for 8 int8 blocks here) fails this;
- loading peaked at most 1.3x the tree's memory once ready (each process's VmHWM against its RSS).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from homeswarm.client.local_swarm import LocalSwarm
from homeswarm.client.transport import HopStream
from homeswarm.model import ModelConfig, cache_bytes, span_weight_bytes
from homeswarm.node.capacity import parse_size
from homeswarm.node.process_memory import tree_memory
from homeswarm.protocol import node_pb2
from tests.helpers.checkpoints import make_checkpoint
from tests.helpers.moe_checkpoints import make_moe_checkpoint
from tests.helpers.prequant_checkpoints import shard_by_block, write_prequantized

MAX_MEMORY = "1.1GiB"
PROMPT, STEPS = 128, 4
NODES = {  # name -> (checkpoint, --quant)
    "float32": ("dense", "none"),
    "int8": ("dense", "int8"),
    "int4": ("dense", "int4"),
    "prequant-moe": ("moe", "none"),
}

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("memory")
    dense = make_checkpoint(root / "dense", "llama2", num_layers=8, hidden_size=1024, intermediate_size=2816,
                            num_heads=16, num_kv_heads=16, vocab_size=512, max_shard_size="200MB")
    source = make_moe_checkpoint(root / "moe-float", "qwen3_moe", hidden_size=1024, intermediate_size=2048,
                                 moe_intermediate_size=512, num_experts=32, num_experts_per_tok=4, head_dim=64,
                                 num_attention_heads=16, num_key_value_heads=4)
    moe, _ = write_prequantized(source, root / "moe", root / "moe-dequantized", "compressed")
    shard_by_block(moe)
    return {"dense": dense, "moe": moe}


def runtime_of(log: str) -> int:
    match = re.search(r"of which the runtime takes ([\d.]+ [KMG]iB)", log)
    assert match, log[-3000:]
    return parse_size(match.group(1).replace(" ", ""))


@pytest.fixture(scope="module")
def measured(checkpoints, tmp_path_factory):
    """name -> (node, its tree at ready, its tree after the session, weight bytes, KV bytes, runtime)."""
    work = tmp_path_factory.mktemp("swarm")
    with LocalSwarm(work, env={"XDG_CACHE_HOME": str(work / "cache")}) as swarm:
        swarm.start_bootstrap()
        nodes = {name: swarm.start_node(checkpoints[kind], "--model-name", name, "--quant", quant, "--max-memory",
                                        MAX_MEMORY, "--insecure", "--compute-threads", "1", "--throughput", "10",
                                        wait=False)
                 for name, (kind, quant) in NODES.items()}
        results = {}
        pool = swarm.pool()
        try:
            for name, node in nodes.items():
                info = swarm.wait_ready(node, timeout=400)
                ready = tree_memory(node.process.pid)
                kind, quant = NODES[name]
                config = ModelConfig.from_dir(checkpoints[kind])
                start, end = info["blocks"]
                stream = HopStream(pool, peer_id=info["peer_id"], address=info["address"], model=name, start=start,
                                   end=end, batch_size=1, max_length=PROMPT + STEPS, compression=node_pb2.NONE,
                                   connect_timeout=30, step_timeout=240)
                stream.step(1, torch.randn(1, PROMPT, config.hidden_size))
                for i in range(STEPS):
                    stream.step(2 + i, torch.randn(1, 1, config.hidden_size))
                after = tree_memory(node.process.pid)
                stream.close()
                weights = span_weight_bytes(config, start, end, torch.float32, quant)
                kv = cache_bytes(config, end - start, 1, PROMPT + STEPS, torch.float32)
                results[name] = (info, ready, after, weights, kv, runtime_of(node.log()))
        finally:
            pool.close()
    return results


@pytest.mark.parametrize("name", list(NODES))
def test_the_process_tree_stays_within_max_memory(measured, name):
    info, ready, after, weights, kv, runtime = measured[name]
    assert after.rss <= parse_size(MAX_MEMORY), (info["blocks"], after)
    assert {"join-swarm", "p2pd"} <= set(after.processes)  # the DHT process and p2pd are counted too


@pytest.mark.parametrize("name", list(NODES))
def test_the_node_holds_its_runtime_weights_and_cache(measured, name):
    info, ready, after, weights, kv, runtime = measured[name]
    expected = runtime + weights + kv
    assert abs(after.rss - expected) <= 0.1 * expected, (info["blocks"], after.rss, runtime, weights, kv)


@pytest.mark.parametrize("name", list(NODES))
def test_loading_peaks_within_1_3x_the_ready_memory(measured, name):
    info, ready, after, weights, kv, runtime = measured[name]
    assert ready.peak <= 1.3 * ready.rss, (info["blocks"], ready)
