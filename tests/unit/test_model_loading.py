"""Checkpoint slices: load_span / load_head read only their own tensors, from only their own shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import homeswarm.model.checkpoint as checkpoint_module
from homeswarm.model import CheckpointReader, MissingTensorsError, load_head, load_span
from tests.helpers.checkpoints import make_checkpoint, reference_model


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # ~145 KB per block, so 100KB shards put each block's tensors in separate files.
    return make_checkpoint(tmp_path_factory.mktemp("sharded") / "llama2", "llama2", max_shard_size="100KB")


class ReadRecorder:
    """Wraps the checkpoint's tensor reads to record which files were read and which tensors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.files: set[str] = set()
        self.tensors: list[str] = []
        for fn in ("read_tensor", "read_into", "read_header"):
            monkeypatch.setattr(checkpoint_module, fn, self._recorded(getattr(checkpoint_module, fn)))

    def _recorded(self, real):
        def recorded(path, name=None, *args, **kwargs):
            self.files.add(Path(path).name)
            if name is None:
                return real(path)
            self.tensors.append(name)
            return real(path, name, *args, **kwargs)

        return recorded


def weight_map(path: Path) -> dict[str, str]:
    return json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]


def test_checkpoint_is_really_sharded(sharded):
    files = set(weight_map(sharded).values())
    assert len(files) >= 4
    assert not (sharded / "model.safetensors").exists()


@pytest.mark.parametrize(("start", "end"), [(1, 3), (0, 1), (3, 4)])
def test_load_span_reads_only_its_blocks(sharded, monkeypatch, start, end):
    rec = ReadRecorder(monkeypatch)
    span = load_span(sharded, start, end)
    wm = weight_map(sharded)
    expected = {n for n in wm if n.startswith(tuple(f"model.layers.{i}." for i in range(start, end)))}
    assert len(rec.tensors) == len(set(rec.tensors))
    assert set(rec.tensors) == expected
    assert rec.files == {wm[n] for n in expected}
    assert rec.files != set(wm.values())
    # The span is complete, real (not meta), frozen and in eval mode.
    params = list(span.parameters())
    assert sum(p.numel() for p in params) == sum(
        t.numel() for t in CheckpointReader(sharded).load(expected).values()
    )
    assert all(p.device.type == "cpu" and not p.requires_grad for p in params)
    assert not span.training


def test_load_head_reads_only_head_tensors(sharded, monkeypatch):
    rec = ReadRecorder(monkeypatch)
    head = load_head(sharded)
    expected = {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert set(rec.tensors) == expected
    wm = weight_map(sharded)
    assert rec.files == {wm[n] for n in expected}
    ref = reference_model(sharded)
    assert torch.equal(head.embed_tokens.weight, ref.model.embed_tokens.weight)
    assert torch.equal(head.norm.weight, ref.model.norm.weight)
    assert torch.equal(head.lm_head.weight, ref.lm_head.weight)
    assert not any(p.requires_grad for p in head.parameters()) and not head.training


def test_tied_head_uses_embedding(tmp_path):
    path = make_checkpoint(tmp_path / "q", "qwen2", num_layers=2)
    assert "lm_head.weight" not in CheckpointReader(path).names()
    head = load_head(path)
    assert head.lm_head is None
    hidden = torch.randn(1, 3, 64)
    expected = head.norm(hidden) @ head.embed_tokens.weight.T
    assert torch.allclose(head.logits(hidden), expected)


def test_missing_tensors_are_named(sharded, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in sharded.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    index = json.loads((broken / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.layers.2.mlp.up_proj.weight"]
    (broken / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(MissingTensorsError, match=r"model\.layers\.2\.mlp\.up_proj\.weight"):
        load_span(broken, 2, 3)
    load_span(broken, 0, 2)  # other blocks still load
    with pytest.raises(MissingTensorsError, match="no.such"):
        CheckpointReader(broken).load(["no.such"])


def test_bad_ranges_and_missing_files(sharded, tmp_path):
    for start, end in [(-1, 2), (2, 2), (3, 2), (0, 5)]:
        with pytest.raises(ValueError, match="block range"):
            load_span(sharded, start, end)
    with pytest.raises(FileNotFoundError, match="not found"):
        load_span(tmp_path / "nope", 0, 1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_head(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        CheckpointReader(tmp_path / "empty")


def _status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/self/status")


@pytest.fixture(scope="module")
def prequant_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.helpers.moe_checkpoints import make_moe_checkpoint
    from tests.helpers.prequant_checkpoints import shard_by_block, write_prequantized

    root = tmp_path_factory.mktemp("prequant-moe")
    source = make_moe_checkpoint(root / "float", "qwen3_moe", num_layers=3, hidden_size=512, moe_intermediate_size=512,
                                 num_experts=32, num_experts_per_tok=4, head_dim=64, num_attention_heads=8,
                                 num_key_value_heads=2, mlp_only_layers=[])
    quantized, _ = write_prequantized(source, root / "compressed", root / "dequantized", "compressed")
    return shard_by_block(quantized)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux's /proc to read peak memory")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loading_a_sharded_prequantized_moe_span_peaks_near_what_it_holds(prequant_moe, dtype, monkeypatch):
    # A block loads part by part (attention, router, each expert's projections) and the heap is trimmed
    # as it goes: the load peaks at most 1.3x the memory the loaded span holds (plus a few MiB of
    # working memory), where reading whole blocks peaked at 2x (packed, unpacked and float scales at once)
    import homeswarm.model.loader as loader
    from homeswarm.model.heap import trim_heap

    # the heap is trimmed once the process grew this much: garbage up to it may be held at any moment,
    # so a span this small is checked at a finer grain than a node's 32 MiB
    monkeypatch.setattr(loader, "_TRIM_BYTES", 2 << 20)
    trim_heap()  # what earlier work freed (the checkpoint's writing) must not be returned during the load
    before = _status_bytes("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    span = load_span(prequant_moe, 0, 3, dtype=dtype)
    held = _status_bytes("VmRSS") - before
    peak = _status_bytes("VmHWM") - before
    tensors = sum(t.nbytes for t in [*span.parameters(), *span.buffers()])
    assert tensors * 0.9 <= held <= tensors * 1.1 + (8 << 20)  # nothing kept beside the span's own tensors
    assert peak <= 1.3 * held + loader._TRIM_BYTES + (8 << 20), (peak >> 20, held >> 20)
