"""Checkpoints from the Hugging Face hub, downloaded by the slice: only the files a node or client needs.

Responsibility: tell a repository id (``owner/name``) from a folder; fetch ``config.json`` and the
safetensors index first (:func:`fetch_checkpoint_info`), then only the shard files holding the tensors of
a span of blocks (:func:`fetch_span_files`, a node, once its blocks are chosen) or of the embeddings,
final norm and LM head plus the tokenizer (:func:`fetch_client_files`, a client).

Files go to huggingface_hub's cache (``--cache-dir``, default ``$HF_HUB_CACHE`` or
``~/.cache/huggingface/hub``), one snapshot folder per commit, which is then an ordinary (partial)
checkpoint folder. Everything after ``config.json`` is fetched at the commit ``config.json`` came from,
so files of two revisions never mix, and files already in the snapshot cost no request at all: a restart
downloads nothing (it asks the hub once which commit the branch is at, and with the hub unreachable
goes on with the commit it has). A download broken off is resumed where it stopped (huggingface_hub
retries with an HTTP range) and shows a progress bar. ``$HF_ENDPOINT`` (read at each call) points
at another hub; ``$HF_TOKEN`` authenticates for gated repositories.

Invariants: nothing here imports the network layers of homeswarm; a folder that exists is never taken
for a repository id; every failure is a :class:`HubError` whose message is one line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import INDEX_FILE, SINGLE_FILE, block_of

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
# what a client reads besides the head's tensors (each optional): ids, chat template, stop tokens
CLIENT_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REPO_FOLDER = "models--"


class HubError(OSError):
    """A repository, revision or file that could not be had from the hub (message: one line)."""


def is_hub_id(text: str | os.PathLike[str]) -> bool:
    """Whether ``text`` names a hub repository (``owner/name``) rather than a file or folder here (where a
    folder ``owner`` exists here, ``owner/name`` is a path: a mistyped one fails at once, not after the
    hub's retries)."""
    text = str(text)
    return (bool(_REPO_ID.match(text)) and "--" not in text and ".." not in text
            and not text.endswith((".", "-")) and not Path(text).parent.exists())


@dataclass(frozen=True)
class HubSnapshot:
    """A snapshot folder of huggingface_hub's cache: ``CACHE/models--OWNER--NAME/snapshots/COMMIT``."""

    repo_id: str
    commit: str
    cache_dir: Path

    @classmethod
    def of(cls, model_dir: str | os.PathLike[str]) -> HubSnapshot | None:
        """The snapshot ``model_dir`` is, or None for any other folder (nothing is downloaded into those)."""
        path = Path(model_dir).absolute()
        repo_folder = path.parent.parent
        if not (_COMMIT.match(path.name) and path.parent.name == "snapshots"
                and repo_folder.name.startswith(_REPO_FOLDER)):
            return None
        # huggingface_hub refuses "--" in repository ids, so the folder name reads back unambiguously
        return cls(repo_folder.name[len(_REPO_FOLDER):].replace("--", "/"), path.name, repo_folder.parent)


def _endpoint(endpoint: str | None) -> str | None:
    return endpoint or os.environ.get("HF_ENDPOINT") or None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _download(repo_id: str, filename: str, *, revision: str, cache_dir: str | os.PathLike[str] | None,
              endpoint: str | None, optional: bool = False) -> Path | None:
    """One file of the repository into the cache (nothing is sent if the snapshot has it already); None
    when ``optional`` and the repository has no such file."""
    from huggingface_hub import hf_hub_download, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if _COMMIT.match(revision):
        cached = try_to_load_from_cache(repo_id, filename, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return Path(cached)
        if cached is not None and optional:  # the hub said before that this commit has no such file
            return None
    where = _endpoint(endpoint) or "https://huggingface.co"
    try:
        return Path(hf_hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir,
                                    endpoint=_endpoint(endpoint)))
    except GatedRepoError:
        raise HubError(f"{repo_id} on {where} is gated: accept its terms on the hub, then log in "
                       f"(`hf auth login`) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise HubError(f"{repo_id} is neither a folder here nor a repository on {where} (a private one needs "
                       f"HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise HubError(f"{repo_id} on {where} has no revision {revision!r}") from None
    except LocalEntryNotFoundError as e:
        raise HubError(f"could not download {filename} of {repo_id} from {where}, and the cache does not "
                       f"have it: {_first_line(e)}") from None
    except EntryNotFoundError:
        if optional:
            return None
        raise HubError(f"{repo_id} on {where} has no file {filename}") from None
    except (OSError, ValueError) as e:  # HTTP errors, connection errors, a full disk, a bad cache folder
        raise HubError(f"could not download {filename} of {repo_id} from {where}: {_first_line(e)}") from None


def fetch_checkpoint_info(repo_id: str, *, revision: str = "main", cache_dir: str | os.PathLike[str] | None = None,
                          endpoint: str | None = None) -> Path:
    """``config.json`` and the safetensors index of ``repo_id``: the snapshot folder holding them."""
    config = _download(repo_id, CONFIG_FILE, revision=revision, cache_dir=cache_dir, endpoint=endpoint)
    assert config is not None
    snapshot = config.parent
    commit = snapshot.name
    if _download(repo_id, INDEX_FILE, revision=commit, cache_dir=cache_dir, endpoint=endpoint,
                 optional=True) is None:
        logger.info("%s has no %s: its weights are one file, %s, needed whole", repo_id, INDEX_FILE, SINGLE_FILE)
    return snapshot


def needed_files(model_dir: str | os.PathLike[str], wanted: Callable[[str], bool]) -> list[str]:
    """The weight files holding the tensors whose names ``wanted`` accepts, per the folder's index (an
    unsharded checkpoint: its one file)."""
    index = Path(model_dir) / INDEX_FILE
    if not index.is_file():
        return [SINGLE_FILE]
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        return sorted({Path(f).name for name, f in weight_map.items() if wanted(name)})
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index: {e}") from None


def span_files(model_dir: str | os.PathLike[str], start: int, end: int) -> list[str]:
    """The weight files a node serving blocks [start, end) needs."""
    return needed_files(model_dir, lambda name: (b := block_of(name)) is not None and start <= b < end)


def head_files(model_dir: str | os.PathLike[str]) -> list[str]:
    """The weight files holding the tensors of no block (embeddings, final norm, LM head): a client's."""
    return needed_files(model_dir, lambda name: block_of(name) is None)


def _fetch(model_dir: Path, files: list[str], what: str, *, endpoint: str | None, optional: bool = False) -> None:
    snapshot = HubSnapshot.of(model_dir)
    if snapshot is None:
        return
    todo = [f for f in files if not (model_dir / f).is_file()]
    if todo and not optional:
        logger.info("downloading %d file(s) of %s for %s (%d already here)", len(todo), snapshot.repo_id, what,
                    len(files) - len(todo))
    for name in todo:
        _download(snapshot.repo_id, name, revision=snapshot.commit, cache_dir=snapshot.cache_dir, endpoint=endpoint,
                  optional=optional)


def fetch_span_files(model_dir: str | os.PathLike[str], start: int, end: int, *, endpoint: str | None = None) -> None:
    """Download into a hub snapshot folder the shards of blocks [start, end) it lacks; for any other folder,
    nothing (the loader names the shard files it lacks, if any)."""
    model_dir = Path(model_dir)
    _fetch(model_dir, span_files(model_dir, start, end), f"blocks {start}:{end}", endpoint=endpoint)


def fetch_client_files(repo_id: str, *, revision: str = "main", cache_dir: str | os.PathLike[str] | None = None,
                       endpoint: str | None = None) -> Path:
    """``config.json``, the index, the shards of the embeddings, final norm and head, and the tokenizer files
    the repository has: the snapshot folder holding them."""
    snapshot = fetch_checkpoint_info(repo_id, revision=revision, cache_dir=cache_dir, endpoint=endpoint)
    _fetch(snapshot, list(CLIENT_FILES), "the tokenizer", endpoint=endpoint, optional=True)
    _fetch(snapshot, head_files(snapshot), "the embeddings and the head", endpoint=endpoint)
    return snapshot


def local_blocks(model_dir: str | os.PathLike[str], num_blocks: int) -> list[int]:
    """The blocks (of ``num_blocks``) whose weight files are all in the folder."""
    model_dir = Path(model_dir)
    missing: set[int] = set()
    index = model_dir / INDEX_FILE
    if not index.is_file():
        return list(range(num_blocks)) if (model_dir / SINGLE_FILE).is_file() else []
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        present = {f: (model_dir / Path(f).name).is_file() for f in set(weight_map.values())}
        for name, file_name in weight_map.items():
            block = block_of(name)
            if block is not None and not present[file_name]:
                missing.add(block)
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index} is not a valid safetensors index: {e}") from None
    return [b for b in range(num_blocks) if b not in missing]


_PEER_NAME = re.compile(r"[^A-Za-z0-9_.-]+")
_SMALL_FILE_BYTES = 64 << 20  # tokenizers and configs; never a weight file


def default_cache_root() -> Path:
    """Where files fetched from peers go without ``--cache-dir``: ``$XDG_CACHE_HOME/homeswarm``."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "homeswarm"


def peer_cache_folder(model_dir: str | os.PathLike[str], model_name: str, cache_root: str | os.PathLike[str] | None,
                      suffix: str = "") -> Path:
    """The folder for ``model_name``'s files from peers (one per config: ``NAME-CONFIGHASH`` + ``suffix``), created
    with the model folder's small files (config, tokenizer, digest list; never weights nor the index)."""
    model_dir = Path(model_dir)
    config = (model_dir / CONFIG_FILE).read_bytes()
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    name = _PEER_NAME.sub("_", model_name).strip("._")[:80] or "model"
    folder = root / "peer-weights" / f"{name}-{hashlib.sha256(config).hexdigest()[:16]}{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    for path in model_dir.iterdir():
        if (path.is_file() and path.name != INDEX_FILE and not path.name.endswith((".safetensors", ".gguf", ".bin"))
                and path.stat().st_size <= _SMALL_FILE_BYTES):
            target = folder / path.name
            if not target.is_file() or target.read_bytes() != path.read_bytes():
                shutil.copyfile(path, target)
    return folder
