"""Partial checkpoints: folders holding only some shards load what they hold, name the shard files they lack
when asked for more, and digest exactly the blocks they hold in full; block digests are cached on disk by
file path, size and modification time; which files a node or client needs (model.hub)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

import homeswarm.model.digest as digest_module
from homeswarm.model import CheckpointReader, load_head, load_span
from homeswarm.model.checkpoint import MissingShardsError, block_of
from homeswarm.model.digest import block_digests, default_cache_path
from homeswarm.model.hub import HubSnapshot, head_files, is_hub_id, local_blocks, span_files
from tests.helpers.checkpoints import make_checkpoint

INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def full(tmp_path_factory) -> Path:
    # 80 KB shards: 12 files; shards 4 (blocks 0, 1), 9 (blocks 2, 3) and 11 (block 3, final norm) straddle
    return make_checkpoint(tmp_path_factory.mktemp("partial") / "llama2", "llama2", num_layers=4,
                           max_shard_size="80KB")


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / INDEX).read_text())["weight_map"]


def partial_copy(full: Path, dest: Path, files: list[str]) -> Path:
    dest.mkdir()
    for name in ("config.json", INDEX, *files):
        shutil.copy2(full / name, dest / name)
    return dest


def test_which_files_a_node_and_a_client_need(full):
    wm = weight_map(full)
    node = span_files(full, 2, 4)
    assert node == sorted({f for n, f in wm.items() if block_of(n) in (2, 3)})
    head = head_files(full)
    assert head == sorted({wm["model.embed_tokens.weight"], wm["model.norm.weight"], wm["lm_head.weight"]})
    assert len(head) == 3 and len(set(wm.values())) == 12


def test_a_node_folder_loads_its_blocks_and_names_the_shards_it_lacks(full, tmp_path):
    node = partial_copy(full, tmp_path / "node", span_files(full, 2, 4))
    assert local_blocks(node, 4) == [2, 3]
    reader = CheckpointReader(node)  # the index names 12 shards, 7 of them absent: fine until read
    assert len(reader.missing_files()) == 7
    span = load_span(node, 2, 4)
    reference = load_span(full, 2, 4)
    for (name, a), b in zip(span.state_dict().items(), reference.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    missing = sorted({weight_map(full)[n] for n in weight_map(full) if block_of(n) == 1})
    with pytest.raises(MissingShardsError, match=r"lacks the shard files? .*needed for block 1 ") as caught:
        load_span(node, 1, 2)
    assert caught.value.files == [f for f in missing if not (node / f).exists()]
    assert all(f in str(caught.value) for f in caught.value.files)
    with pytest.raises(MissingShardsError, match=r"needed for the embeddings, final norm or LM head"):
        load_head(node)


def test_a_client_folder_loads_the_head(full, tmp_path):
    client = partial_copy(full, tmp_path / "client", head_files(full))
    head, reference = load_head(client), load_head(full)
    assert torch.equal(head.lm_head.weight, reference.lm_head.weight)
    assert torch.equal(head.embed_tokens.weight, reference.embed_tokens.weight)
    with pytest.raises(MissingShardsError, match=r"needed for block 0 "):
        load_span(client, 0, 1)


def test_partial_digests_are_the_full_checkpoints_for_the_blocks_held_in_full(full, tmp_path):
    cache = tmp_path / "digests.json"
    everything = block_digests(full, cache_path=cache)
    assert sorted(everything) == [0, 1, 2, 3]
    node = partial_copy(full, tmp_path / "node", span_files(full, 2, 4))
    assert block_digests(node, cache_path=cache) == {2: everything[2], 3: everything[3]}
    # the client's shards hold part of block 3 (with the final norm): no digest from half a block
    client = partial_copy(full, tmp_path / "client", head_files(full))
    assert block_digests(client, cache_path=cache) == {}
    # without the shard holding the rest of block 1, only block 0 is known
    lacking = partial_copy(full, tmp_path / "lacking", span_files(full, 0, 1))
    assert block_digests(lacking, cache_path=cache) == {0: everything[0]}


class HashCounter:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.blocks: list[int] = []
        real = digest_module._hash_block

        def counted(block, paths, headers):
            self.blocks.append(block)
            return real(block, paths, headers)

        monkeypatch.setattr(digest_module, "_hash_block", counted)

    def take(self) -> list[int]:
        taken, self.blocks = sorted(self.blocks), []
        return taken


def test_digests_are_cached_on_disk_by_path_size_and_mtime(full, tmp_path, monkeypatch):
    folder = tmp_path / "copy"
    shutil.copytree(full, folder)
    cache = tmp_path / "digests.json"
    counter = HashCounter(monkeypatch)
    first = block_digests(folder, cache_path=cache)
    assert counter.take() == [0, 1, 2, 3] and cache.is_file()
    assert block_digests(folder, cache_path=cache) == first
    assert counter.take() == []  # a restart hashes nothing
    # a shard touched (same bytes, another mtime): the blocks with tensors in it are hashed again, same digests
    shard = weight_map(folder)["model.layers.1.mlp.down_proj.weight"]
    blocks_in_shard = sorted({block_of(n) for n, f in weight_map(folder).items() if f == shard} - {None})
    stat = (folder / shard).stat()
    os.utime(folder / shard, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    assert block_digests(folder, cache_path=cache) == first
    assert counter.take() == blocks_in_shard
    # another size (a tensor changed and the shard rewritten): hashed again, another digest
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / shard)
    name = next(n for n in tensors if block_of(n) == 1)
    tensors[name] = torch.cat([tensors[name], tensors[name][:1]])
    save_file(tensors, folder / shard, metadata={"format": "pt"})
    os.utime(folder / shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # even with the old mtime
    changed = block_digests(folder, cache_path=cache)
    assert counter.take() == blocks_in_shard
    assert changed[1] != first[1] and [changed[b] for b in (2, 3)] == [first[b] for b in (2, 3)]


def test_an_unreadable_cache_is_ignored_and_the_default_path_follows_xdg(full, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_path() == tmp_path / "xdg" / "homeswarm" / "digests.json"
    default_cache_path().parent.mkdir(parents=True)
    default_cache_path().write_text("{not json")
    counter = HashCounter(monkeypatch)
    assert sorted(block_digests(full)) == [0, 1, 2, 3]
    assert counter.take() == [0, 1, 2, 3]
    assert json.loads(default_cache_path().read_text())["version"] == 1
    block_digests(full)
    assert counter.take() == []


def test_hub_ids_and_snapshot_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_hub_id("meta-llama/Llama-3.1-8B") and is_hub_id("owner/name_1")
    for text in ("name", "a/b/c", "/abs/path", "./x", "owner/", "a--b/c", "a/..b", "owner/name-"):
        assert not is_hub_id(text), text
    (tmp_path / "owner").mkdir()
    (tmp_path / "owner" / "name").mkdir()
    assert not is_hub_id("owner/name")  # an existing folder is a folder
    assert not is_hub_id("owner/typo")  # and so is a path into one
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hub" / "models--moonshotai--Kimi-K2" / "snapshots" / commit
    assert HubSnapshot.of(snapshot) == HubSnapshot("moonshotai/Kimi-K2", commit, tmp_path / "hub")
    assert HubSnapshot.of(tmp_path / "owner" / "name") is None
    assert HubSnapshot.of(snapshot.parent / "main") is None
