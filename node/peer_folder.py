"""The folder a node keeps the blocks it fetched from peers in: an ordinary checkpoint folder once written.

A model folder that holds no block's weights (``config.json`` alone, or with the safetensors index but
none of the shards) gets its blocks from peers. They go to ``CACHE/peer-weights/NAME-CONFIGHASH/``
(``--cache-dir``, default ``$XDG_CACHE_HOME/homeswarm`` or ``~/.cache/homeswarm``): ``config.json`` and the
folder's other small files (tokenizer, generation config) copied, one ``block-NNNNN.safetensors`` per
block (the canonical file of ``node.weight_stream``), a ``.part`` file beside it while its transfer is
under way, and a ``model.safetensors.index.json`` naming every tensor of the blocks held, so the loader,
the digests and the Weights rpc read it like any checkpoint. The folder is keyed by the model name and
the config's hash: another model, or another config under the same name, never mixes with it.

A digest list (``weight_digests.json``, written by ``python -m homeswarm.node.peer_folder MODEL_DIR``
from a whole checkpoint: its blocks' digests, and the sha256 of a client's files) may travel with
``config.json``: it comes from where the config comes from, so its digests are trusted as the config is,
and one peer serving the blocks is then enough (a swarm with a single seeder); without it a block needs
the digest two peers agree on.

Invariants: a ``block-*.safetensors`` file exists only once its digest matched the agreed one (it is
renamed from its ``.part`` then), so a restart trusts the blocks it finds; the index is replaced
atomically.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from homeswarm.model.checkpoint import INDEX_FILE, SINGLE_FILE
from homeswarm.model.hub import local_blocks, peer_cache_folder

CONFIG_FILE = "config.json"
DIGESTS_FILE = "weight_digests.json"
_BLOCK_FILE = re.compile(r"block-(\d{5})\.safetensors")


def needs_peers(model_dir: str | os.PathLike[str], num_blocks: int) -> bool:
    """Whether ``model_dir`` is a checkpoint folder holding ``config.json`` and no block's weights."""
    model_dir = Path(model_dir)
    if not (model_dir / CONFIG_FILE).is_file() or (model_dir / SINGLE_FILE).is_file():
        return False
    if not (model_dir / INDEX_FILE).is_file():
        return True
    return not local_blocks(model_dir, num_blocks)


def trusted_digests(folder: str | os.PathLike[str]) -> dict[int, str]:
    """Block -> digest from the folder's ``weight_digests.json`` ({} without one); ValueError if malformed."""
    path = Path(folder) / DIGESTS_FILE
    if not path.is_file():
        return {}
    try:
        blocks = json.loads(path.read_text(encoding="utf-8"))["blocks"]
        digests = {int(block): str(digest) for block, digest in blocks.items()}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path} is not a digest list ({{\"blocks\": {{\"0\": \"sha256 hex\", ...}}}}): {e}") from None
    if not all(block >= 0 and re.fullmatch(r"[0-9a-f]{64}", d) for block, d in digests.items()):
        raise ValueError(f"{path}: blocks must be numbers >= 0 and digests sha256 in hex")
    return digests


def write_digests(model_dir: str | os.PathLike[str], out: str | os.PathLike[str] | None = None, *,
                  cache_path: str | os.PathLike[str] | None = None) -> Path:
    """Write the digest list of the blocks ``model_dir`` holds (to ``out``, default its own folder)."""
    from homeswarm.model.digest import block_digests
    from homeswarm.node.weight_upload import WeightUploader

    digests = block_digests(model_dir, cache_path=cache_path)
    files = WeightUploader(model_dir, "", rate=0).file_digests()  # a client's: the head, the tokenizer
    path = Path(out) if out is not None else Path(model_dir) / DIGESTS_FILE
    path.write_text(json.dumps({"blocks": {str(b): d for b, d in sorted(digests.items())}, "files": files},
                               indent=1) + "\n")
    return path


def block_file(block: int) -> str:
    return f"block-{block:05d}.safetensors"


def peer_folder(model_dir: str | os.PathLike[str], model_name: str, cache_root: str | os.PathLike[str] | None) -> Path:
    """The folder for ``model_name``'s blocks from peers, created with the model folder's small files."""
    folder = peer_cache_folder(model_dir, model_name, cache_root)
    if not (folder / INDEX_FILE).is_file():
        write_index(folder)
    return folder


def held_blocks(folder: str | os.PathLike[str]) -> list[int]:
    """The blocks whose verified file the folder holds."""
    return sorted(int(m.group(1)) for p in Path(folder).iterdir() if (m := _BLOCK_FILE.fullmatch(p.name)))


def write_index(folder: str | os.PathLike[str]) -> None:
    """Name every tensor of the block files held in the folder's index (atomically)."""
    folder = Path(folder)
    weight_map = {}
    for block in held_blocks(folder):
        with open(folder / block_file(block), "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
        weight_map.update(dict.fromkeys((n for n in header if n != "__metadata__"), block_file(block)))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".index-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    os.replace(tmp, folder / INDEX_FILE)


if __name__ == "__main__":  # python -m homeswarm.node.peer_folder MODEL_DIR [OUT]: a seeder's digest list
    import sys

    if len(sys.argv) not in (2, 3) or not Path(sys.argv[1]).is_dir():
        print("usage: python -m homeswarm.node.peer_folder MODEL_DIR [OUT.json]", file=sys.stderr)
        sys.exit(2)
    print(write_digests(sys.argv[1], sys.argv[2] if len(sys.argv) == 3 else None))
