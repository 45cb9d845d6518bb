"""Memory arithmetic of a volunteer node: sizes, blocks that fit, the KV cache's share; and the budget
of real checkpoints' configs (dense and MoE) counted from span_weight_bytes."""

from __future__ import annotations

import pytest
import torch

from homeswarm.model import DEMO_MODEL_DIR, ModelConfig, cache_bytes, span_weight_bytes
from homeswarm.node.capacity import (
    blocks_that_fit,
    cache_budget,
    default_budget,
    format_size,
    parse_size,
    weight_budget,
)
from homeswarm.node.config import NodeConfig
from homeswarm.node.volunteer import plan_memory, span_cache_budget


@pytest.mark.parametrize(("text", "size"), [
    ("4GiB", 4 * 2**30), ("4G", 4 * 2**30), ("500MB", 500 * 10**6), ("500 MiB", 500 * 2**20),
    ("1.5g", int(1.5 * 2**30)), ("123B", 123), ("800KiB", 800 * 1024), ("2TB", 2 * 10**12), ("64b", 64),
])  # fmt: skip
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "GiB", "4 XB", "-1G", "0", "1e9", "four", "4", "123"])
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(3 * 2**30) == "3.0 GiB" and format_size(1536) == "1.5 KiB" and format_size(10) == "10 B"


def test_blocks_that_fit_counts_the_widest_window():
    assert blocks_that_fit([10] * 12, 0, 45) == 4
    assert blocks_that_fit([10] * 12, 5, 45) == 3  # each block also reserves 5 of cache
    # a MoE model's first block is dense and small: the count must fit wherever the span lands
    assert blocks_that_fit([2, 10, 10, 10], 0, 22) == 2
    assert blocks_that_fit([10] * 4, 0, 9) == 0
    assert blocks_that_fit([10] * 4, 0, 10**9) == 4


def test_the_cache_keeps_its_share_or_its_tokens():
    assert weight_budget(1000, cache_share=0.25, cache_tokens=None, token_bytes_per_block=8).weights == 750
    split = weight_budget(1000, cache_share=0.25, cache_tokens=10, token_bytes_per_block=8)
    assert (split.weights, split.per_block_cache) == (1000, 80)
    # the share, however little the weights take (--max-memory far above what the blocks need)
    assert cache_budget(1000, 100, cache_share=0.25, cache_tokens=None, token_bytes=8) == 250
    assert cache_budget(1000, 700, cache_share=0.25, cache_tokens=None, token_bytes=8) == 250
    assert cache_budget(1000, 800, cache_share=0.25, cache_tokens=None, token_bytes=8) == 200  # what is left
    assert cache_budget(1000, 700, cache_share=0.25, cache_tokens=10, token_bytes=8) == 80


def test_default_budget_is_a_share_of_what_is_available():
    assert default_budget(8 * 2**30, "cpu") == 4 * 2**30
    assert default_budget(10 * 2**30, "cuda") == 9 * 2**30


def config(*args: str) -> NodeConfig:
    return NodeConfig.from_args([str(DEMO_MODEL_DIR), "--new-swarm", *args])


def test_plan_memory_counts_real_block_bytes():
    model = ModelConfig.from_dir(DEMO_MODEL_DIR)
    block = span_weight_bytes(model, 0, 1, torch.float32)
    total = model.num_hidden_layers
    # room for 2 blocks' weights once the cache takes its quarter
    plan = plan_memory(config("--max-memory", f"{int(2.5 * block / 0.75)}B"), model, torch.float32, 10**12)
    assert plan.num_blocks == 2 and plan.given
    # the cache gets its share, not what the blocks leave
    budget = span_cache_budget(config("--max-memory", f"{plan.budget}B"), plan, model, torch.float32, 0, 2)
    assert budget == int(0.25 * plan.budget) < plan.budget - 2 * block
    # one block of a budget 100 times larger: still the share (--max-memory 4GB for a 6 MiB model)
    big = plan_memory(config("--max-memory", f"{100 * plan.budget}B", "--blocks", "0:1"), model, torch.float32,
                      10**12)
    assert span_cache_budget(config("--max-memory", f"{big.budget}B", "--cache-share", "0.1"), big, model,
                             torch.float32, 0, 1) == int(0.1 * big.budget)
    # bfloat16 weights take half: twice the blocks
    assert plan_memory(config("--max-memory", f"{plan.budget}B", "--dtype", "bfloat16"), model,
                       torch.bfloat16, 10**12).num_blocks == min(total, 5)
    # int8: a quarter of float32's linear bytes, and more blocks
    assert plan_memory(config("--max-memory", f"{plan.budget}B", "--quant", "int8"), model, torch.float32,
                       10**12).num_blocks > 2
    # with a token budget each block reserves its cache: a block's weights' worth of tokens halves the count
    tokens = block // cache_bytes(model, 1, 1, 1, torch.float32)
    assert plan_memory(config("--max-memory", f"{4 * block}B", "--max-cache-tokens", str(tokens)), model,
                       torch.float32, 10**12).num_blocks == 2
    # without --max-memory: half of what is available
    assert plan_memory(config(), model, torch.float32, 4 * 2**30).budget == 2 * 2**30


def test_nothing_fits_is_a_clear_error():
    from homeswarm.node.config import ConfigError

    model = ModelConfig.from_dir(DEMO_MODEL_DIR)
    with pytest.raises(ConfigError, match="not even one block fits in the memory budget of 1.0 KiB"):
        plan_memory(config("--max-memory", "1KiB"), model, torch.float32, 10**12)


def test_the_runtime_counts_against_max_memory():
    from homeswarm.node.capacity import WORKING_MEMORY
    from homeswarm.node.config import ConfigError
    from homeswarm.node.volunteer import runtime_cost

    model = ModelConfig.from_dir(DEMO_MODEL_DIR)
    block = span_weight_bytes(model, 0, 1, torch.float32)
    runtime = 700 * 2**20
    plan = plan_memory(config("--max-memory", f"{runtime + int(2.5 * block / 0.75)}B"), model, torch.float32,
                       10**12, runtime)
    assert (plan.num_blocks, plan.total - plan.budget, plan.runtime) == (2, runtime, runtime)
    with pytest.raises(ConfigError, match="does not even hold the node's runtime"):
        plan_memory(config("--max-memory", "600MiB"), model, torch.float32, 10**12, runtime)
    # the default budget, half of what is available, holds the runtime too
    assert plan_memory(config(), model, torch.float32, 4 * 2**30, runtime).budget == 2 * 2**30 - runtime
    assert runtime_cost(config("--fixed-cost", "100MiB")) == 100 * 2**20
    assert runtime_cost(config("--fixed-cost", "0")) == 0
    # measured: this process (Python and torch: well over 100 MiB), plus working memory
    assert runtime_cost(config()) > 100 * 2**20 + WORKING_MEMORY
    assert runtime_cost(config("--device", "meta")) == 0  # an accelerator's memory holds no runtime
