"""A client's files from the nodes serving a model: embeddings, final norm and LM head, tokenizer, no hub.

A client given a folder with ``config.json`` and no head tensors (neither ``model.safetensors`` nor the
shards its index names for them) reads the swarm's records, asks each online node which client files it
can send and their sha256 (Info ``file_digests``), and fetches each over the Weights rpc (``file``):
"head" (the tensors of no block as one canonical safetensors file, the same bytes from every holder) into
``head.safetensors``, and the tokenizer and generation config files the swarm offers. A file is taken
only with the sha256 a ``weight_digests.json`` beside ``config.json`` names for it (its ``files``), else
the one at least two nodes with different peer ids announce (and more than any other); a node whose bytes
hash to anything else is banned for the fetch and the file fetched from the next; a transfer broken off
resumes at its offset from the next. Files go to ``CACHE/peer-weights/NAME-CONFIGHASH-client/`` (default
``$XDG_CACHE_HOME/homeswarm`` or ``~/.cache/homeswarm``), with an index naming the head's tensors: an
ordinary checkpoint folder for the client from then on; a restart fetches nothing.

Invariants: a file is in place only once its sha256 matched; every failure is a ``PeerFilesError`` whose
message is one line.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections import Counter
from pathlib import Path

import grpc

from homeswarm.model.checkpoint import INDEX_FILE, SINGLE_FILE
from homeswarm.model.hub import CLIENT_FILES, head_files, peer_cache_folder
from homeswarm.protocol import PROTOCOL_VERSION, node_pb2, node_pb2_grpc
from homeswarm.routing.dht import SwarmDHT
from homeswarm.routing.records import ServerState

from .transport import ChannelPool, HopFailed

logger = logging.getLogger(__name__)

HEAD = "head"
HEAD_FILE = "head.safetensors"
DIGESTS_FILE = "weight_digests.json"
MIN_AGREEING = 2
CALL_TIMEOUT = 3600.0  # seconds one file's transfer may take in all
_SMALL_FILE_BYTES = 64 << 20


class PeerFilesError(RuntimeError):
    """Client files that could not be had from the swarm (message: one line)."""


class NoPeerFiles(PeerFilesError):  # noqa: N818 - a kind of PeerFilesError
    """No node serving the model offers its head: most often a folder without weights given by mistake."""


def needs_peers(model_dir: str | os.PathLike[str]) -> bool:
    """Whether ``model_dir`` holds ``config.json`` and not the head's tensors."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir() or not (model_dir / "config.json").is_file() or (model_dir / SINGLE_FILE).is_file():
        return False
    if not (model_dir / INDEX_FILE).is_file():
        return True
    return not all((model_dir / name).is_file() for name in head_files(model_dir))


def _folder(model_dir: Path, model_name: str, cache_root: str | os.PathLike[str] | None) -> Path:
    return peer_cache_folder(model_dir, model_name, cache_root, suffix="-client")


def _agreed(offers: dict[str, dict[str, str]], name: str) -> str | None:
    counts = Counter(digests[name] for digests in offers.values() if name in digests)
    ranked = counts.most_common(2)
    if ranked and ranked[0][1] >= MIN_AGREEING and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
        return ranked[0][0]
    return None


def fetch_client_files(model_dir: str | os.PathLike[str], dht: SwarmDHT, pool: ChannelPool, model_name: str,
                       num_blocks: int, cache_root: str | os.PathLike[str] | None = None,
                       max_head_bytes: int = 1 << 40) -> Path:
    """The folder holding the client's files, fetched from the swarm's nodes (see the module's docstring)."""
    model_dir = Path(model_dir)
    folder = _folder(model_dir, model_name, cache_root)
    if (folder / HEAD_FILE).is_file() and (folder / INDEX_FILE).is_file():
        return folder
    trusted = {}
    if (folder / DIGESTS_FILE).is_file():
        try:
            trusted = dict(json.loads((folder / DIGESTS_FILE).read_text()).get("files", {}))
        except (ValueError, AttributeError, TypeError) as e:
            raise PeerFilesError(f"{model_dir / DIGESTS_FILE} is not a digest list: {e}") from None
    stubs: dict[str, node_pb2_grpc.NodeStub] = {}
    offers: dict[str, dict[str, str]] = {}
    for record in dht.get_servers(model_name, 0, num_blocks):
        if record.state != ServerState.ONLINE or record.peer_id in offers:
            continue
        pool.note_tls(record.peer_id, record.tls_cert)
        pool.note_relays(record.peer_id, record.relays)
        try:
            stub = node_pb2_grpc.NodeStub(pool.get(record.address, record.peer_id))
            info = stub.Info(node_pb2.InfoRequest(protocol_version=PROTOCOL_VERSION), timeout=10)
        except (grpc.RpcError, HopFailed) as e:
            logger.info("node %s at %s: no client files (%s)", record.peer_id, record.address, e)
            continue
        stubs[record.peer_id], offers[record.peer_id] = stub, dict(info.file_digests)
    banned: set[str] = set()
    for name in (HEAD, *CLIENT_FILES):
        digest = trusted.get(name) or _agreed(offers, name)
        if digest is None:
            if name == HEAD:
                raise NoPeerFiles(f"{model_dir} holds no head tensors (no model.safetensors, nor the shards its index "
                                  f"names for them), and no two nodes serving {model_name} offer the same ones "
                                  f"({len(offers)} node(s) asked): give the checkpoint folder with the head's "
                                  f"shards, or the model's name in the swarm (--model-name)")
            continue  # a tokenizer file the swarm does not have
        target = folder / (HEAD_FILE if name == HEAD else name)
        sources = [p for p, d in offers.items() if d.get(name) == digest and p not in banned]
        limit = max_head_bytes if name == HEAD else _SMALL_FILE_BYTES
        if not any(_fetch(stubs[p], p, model_name, name, digest, target, limit, banned) for p in sources):
            raise PeerFilesError(f"could not fetch {name} of {model_name} from any of {len(sources)} node(s) "
                                 f"offering it ({len(banned)} banned for wrong bytes)")
    with open(folder / HEAD_FILE, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    weight_map = dict.fromkeys(sorted(n for n in header if n != "__metadata__"), HEAD_FILE)
    (folder / INDEX_FILE).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    logger.info("fetched the head and %d other file(s) of %s from the swarm into %s",
                sum((folder / n).is_file() for n in CLIENT_FILES), model_name, folder)
    return folder


def _fetch(stub: node_pb2_grpc.NodeStub, peer: str, model_name: str, name: str, digest: str, target: Path,
           limit: int, banned: set[str]) -> bool:
    """Stream ``name`` from ``peer`` into ``target`` (resuming its .part); True once its sha256 is ``digest``."""
    part = target.with_name(target.name + ".part")
    offset = started = part.stat().st_size if part.is_file() else 0
    try:
        with open(part, "ab") as f:
            for chunk in stub.Weights(node_pb2.WeightsRequest(protocol_version=PROTOCOL_VERSION, model=model_name,
                                                              file=name, offset=offset), timeout=CALL_TIMEOUT):
                if chunk.offset != offset or chunk.total_bytes > limit or offset + len(chunk.data) > chunk.total_bytes:
                    raise ValueError(f"a chunk at {chunk.offset} of {chunk.total_bytes} bytes, at {offset}")
                f.write(chunk.data)
                offset += len(chunk.data)
    except grpc.RpcError as e:
        logger.info("%s from node %s broke off at byte %d (%s: %s)", name, peer, offset, e.code().name, e.details())
        return False
    except ValueError as e:
        logger.warning("node %s sent %s wrongly (%s); banned", peer, name, e)
        banned.add(peer)
        part.unlink()
        return False
    h = hashlib.sha256()
    with open(part, "rb") as f:
        while data := f.read(1 << 22):
            h.update(data)
    if h.hexdigest() != digest:
        if started:  # resumed from bytes another node sent: which one lied cannot be told; fetched again whole
            logger.warning("%s resumed from node %s has another sha256 than agreed; fetching it again", name, peer)
        else:
            logger.warning("node %s sent %s with another sha256 than agreed; banned", peer, name)
            banned.add(peer)
        with contextlib.suppress(OSError):
            part.unlink()
        return False
    os.replace(part, target)
    return True
