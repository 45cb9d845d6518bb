"""Weight digests: of the stored tensors of each block, the same for a sharded copy, different for other
weights, and refused records (the client's route manager filter) when they differ."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file, save_file

from homeswarm.model.digest import block_digests, span_digest
from tests.helpers.checkpoints import make_checkpoint


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("digest")
    return (make_checkpoint(root / "a", "llama2", num_layers=3, seed=1),
            make_checkpoint(root / "sharded", "llama2", num_layers=3, seed=1, max_shard_size="40KB"),
            make_checkpoint(root / "b", "llama2", num_layers=3, seed=2))


def test_same_weights_same_digests_whatever_the_sharding(checkpoints):
    a, sharded, b = checkpoints
    assert (sharded / "model.safetensors.index.json").exists()
    digests = block_digests(a)
    assert sorted(digests) == [0, 1, 2]
    assert block_digests(sharded) == digests
    assert all(block_digests(b)[i] != digests[i] for i in range(3))


def test_one_changed_tensor_changes_only_its_block(checkpoints, tmp_path):
    a = checkpoints[0]
    (tmp_path / "config.json").write_text((a / "config.json").read_text())
    tensors = load_file(a / "model.safetensors")
    tensors["model.layers.1.mlp.up_proj.weight"][0, 0] += 1e-3
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    before, after = block_digests(a), block_digests(tmp_path)
    assert [before[i] == after[i] for i in range(3)] == [True, False, True]


def test_span_digest(checkpoints):
    digests = block_digests(checkpoints[0])
    assert span_digest(digests, 0, 2) != span_digest(digests, 1, 3)
    assert len(span_digest(digests, 0, 3)) == 64
    assert span_digest(digests, 2, 4) is None  # block 3 is unknown
