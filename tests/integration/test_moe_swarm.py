"""Mixture-of-Experts families through real daemons on 127.0.0.1: greedy generation through a
2-node swarm equals transformers (64 new tokens, batch 2, a 200-token prompt) for Qwen3-MoE, Qwen2-MoE,
Mixtral, DeepSeek-V3, Kimi K2 and GPT-OSS, and kill -9 of a node serving MoE blocks mid-generation
still gives exact output. The same swarm serves a BitNet b1.58 checkpoint (packed ternary weights) to
the same check: another family whose checkpoint's weights are not plain floats.

One bootstrap peer and two nodes per family are started for the whole module, each family under its
own model name.
"""

from __future__ import annotations

import pytest
import torch

from homeswarm.client.config import ClientConfig
from homeswarm.client.local_swarm import LocalSwarm, split_blocks
from homeswarm.client.model import AutoDistributedModelForCausalLM
from tests.helpers.bitnet_checkpoints import eager, make_bitnet_checkpoint, reference_bitnet
from tests.helpers.checkpoints import reference_greedy
from tests.helpers.deepseek_checkpoints import make_deepseek_checkpoint, reference_deepseek
from tests.helpers.gpt_oss_checkpoints import make_gpt_oss_checkpoint
from tests.helpers.moe_checkpoints import MOE_FAMILIES, make_moe_checkpoint

NUM_LAYERS = 4
FAMILIES = (*MOE_FAMILIES, "deepseek_v3", "kimi_k2", "gpt_oss", "bitnet")


def make(path, family: str, seed: int):
    if family in ("deepseek_v3", "kimi_k2"):
        return make_deepseek_checkpoint(path, family, seed=seed)
    if family == "gpt_oss":
        return make_gpt_oss_checkpoint(path, seed=seed)
    if family == "bitnet":
        return make_bitnet_checkpoint(path, seed=seed)
    return make_moe_checkpoint(path, family, seed=seed)


def expected_greedy(path, family: str, prompt: torch.Tensor, new_tokens: int) -> torch.Tensor:
    # transformers has no kimi_k2 model type; the same architecture loads as DeepSeek-V3
    model = reference_deepseek(path) if family == "kimi_k2" else None
    if family == "bitnet":
        with eager():
            return reference_greedy(path, prompt, new_tokens, reference_bitnet(path))
    return reference_greedy(path, prompt, new_tokens, model)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: make(root / family, family, seed=10 + i) for i, family in enumerate(FAMILIES)}


@pytest.fixture(scope="module")
def swarm(checkpoints, tmp_path_factory):
    with LocalSwarm(tmp_path_factory.mktemp("swarm")) as swarm:
        swarm.start_bootstrap()
        daemons = [swarm.start_node(path, "--blocks", f"{a}:{b}", "--compute-threads", "1", wait=False)
                   for path in checkpoints.values() for a, b in split_blocks(NUM_LAYERS, 2)]
        for daemon in daemons:
            swarm.wait_ready(daemon, timeout=180)
        yield swarm


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_batch_of_two_long_prompt_matches_transformers(family, checkpoints, swarm):
    prompt = torch.randint(0, 256, (2, 200), generator=torch.Generator().manual_seed(7))
    expected = expected_greedy(checkpoints[family], family, prompt, 64)
    # relayed, as forced (the hand-off path runs in the failover test below)
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoints[family], initial_peers=swarm.initial_peers,
                                                         config=ClientConfig(handoff=False)) as model:
        got = model.generate(prompt, max_new_tokens=64)
        with model.inference_session(max_length=8) as session:
            assert [(a, b) for _, a, b in session.route] == split_blocks(NUM_LAYERS, 2)
    assert got.tolist() == expected.tolist()
    assert len(set(got[0, 200:].tolist())) > 3


@pytest.mark.parametrize(("family", "mode"), [("qwen3_moe", "handoff"), ("deepseek_v3", "relay")])
def test_kill_moe_node_mid_generation(checkpoints, swarm, family, mode):
    """The replacement node rebuilds its cache (for DeepSeek, the compressed latent) from the replay."""
    name = f"moe-failover-{family}"
    daemons = [swarm.start_node(checkpoints[family], "--model-name", name, "--blocks", blocks,
                                "--compute-threads", "1", wait=False) for blocks in ("0:2", "2:4", "2:4")]
    for daemon in daemons:
        swarm.wait_ready(daemon)
    prompt = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(8))
    expected = expected_greedy(checkpoints[family], family, prompt, 32)
    config = ClientConfig(handoff=False) if mode == "relay" else ClientConfig(handoff_min_rtt=0.0)
    with AutoDistributedModelForCausalLM.from_pretrained(checkpoints[family], initial_peers=swarm.initial_peers,
                                                         model_name=name, config=config) as model:
        with model.inference_session(max_length=72) as session:
            new = []
            for i, tokens in enumerate(model.generate_stream(prompt, max_new_tokens=32, session=session)):
                new.append(tokens)
                if i == 10:
                    address = next(addr for addr, a, b in session.route if (a, b) == (2, 4))
                    LocalSwarm.kill(next(d for d in daemons if d.info["address"] == address))
            failovers = session.failovers
    assert failovers == 1
    assert torch.cat([prompt, torch.stack(new, dim=1)], dim=1).tolist() == expected.tolist()


def test_cli_generate_with_a_moe_checkpoint(checkpoints, swarm):
    """`homeswarm generate --json` through the MoE nodes prints transformers' greedy tokens."""
    import json
    import subprocess

    from homeswarm.client.local_swarm import console_script

    prompt = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(9))
    expected = reference_greedy(checkpoints["mixtral"], prompt, 16)[0, 12:].tolist()
    done = subprocess.run(
        [*console_script("homeswarm"), "generate", str(checkpoints["mixtral"]), "--initial-peers",
         *swarm.initial_peers, "--prompt-ids", ",".join(map(str, prompt[0].tolist())), "--max-new-tokens", "16",
         "--json"], capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["token_ids"] == expected
