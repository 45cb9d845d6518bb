"""The one adapter over ``hivemind.DHT``: announce server records, read them back, list models.

Layout in the DHT: every block ``i`` of model ``M`` has key ``homeswarm/M/block/i`` whose subkeys are
peer ids and whose values are ``ServerRecord.to_dict()``; key ``homeswarm/models`` has one subkey
per model with ``{"num_blocks": L}``. Values expire unless refreshed. Everything read back is
validated: a malformed or inconsistent record is dropped (and logged), never passed on.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial
from typing import Any

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from homeswarm.routing.records import InvalidRecord, PeerId, ServerRecord

logger = logging.getLogger(__name__)

MODELS_KEY = "homeswarm/models"


def block_key(model: str, block: int) -> str:
    return f"homeswarm/{model}/block/{block}"


def dht_time() -> float:
    return get_dht_time()


class SwarmDHT:
    """A started hivemind DHT peer plus homeswarm's view of it."""

    def __init__(self, dht: hivemind.DHT):
        self.dht = dht

    @classmethod
    def create(
        cls,
        initial_peers: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_mode: bool = False,
    ) -> SwarmDHT:
        ip_proto = "ip6" if ":" in host else "ip4"
        dht = hivemind.DHT(
            initial_peers=list(initial_peers),
            start=True,
            host_maddrs=[f"/{ip_proto}/{host}/tcp/{port}"],
            client_mode=client_mode,
            num_workers=4,
        )
        return cls(dht)

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def announce(self, record: ServerRecord, num_blocks: int, expiration_time: float) -> None:
        """Store the record under every block it serves, and the model in the model index."""
        keys = [block_key(record.model, i) for i in range(record.start, record.end)] + [MODELS_KEY]
        values: list[Any] = [record.to_dict()] * record.num_blocks + [{"num_blocks": num_blocks}]
        subkeys = [record.peer_id] * record.num_blocks + [record.model]
        self.dht.run_coroutine(partial(_store_many, keys, values, subkeys, expiration_time))

    def get_servers(self, model: str, start: int, end: int) -> list[ServerRecord]:
        """Every valid record announced for blocks [start, end), one per peer (the freshest)."""
        keys = [block_key(model, i) for i in range(start, end)]
        found: dict[str, Any] = self.dht.run_coroutine(partial(_get_many, keys))
        best: dict[PeerId, tuple[float, ServerRecord]] = {}
        for block, key in zip(range(start, end), keys, strict=True):
            entry = found.get(key)
            if entry is None or not isinstance(entry.value, dict):
                continue
            for subkey, item in entry.value.items():
                try:
                    record = ServerRecord.from_dict(item.value)
                except (InvalidRecord, AttributeError) as e:
                    logger.debug("dropping a malformed record under %s: %s", key, e)
                    continue
                if record.peer_id != subkey or record.model != model or not record.start <= block < record.end:
                    logger.debug("dropping an inconsistent record under %s from %s", key, subkey)
                    continue
                expiration = item.expiration_time
                if record.peer_id not in best or best[record.peer_id][0] < expiration:
                    best[record.peer_id] = (expiration, record)
        return [record for _, record in best.values()]

    def list_models(self) -> dict[str, int]:
        """Model name -> number of blocks, for every model some node announces."""
        entry = self.dht.get(MODELS_KEY, latest=True)
        models: dict[str, int] = {}
        if entry is not None and isinstance(entry.value, dict):
            for name, item in entry.value.items():
                value = getattr(item, "value", None)
                if isinstance(name, str) and isinstance(value, dict) and isinstance(value.get("num_blocks"), int):
                    models[name] = value["num_blocks"]
        return models

    def shutdown(self) -> None:
        self.dht.shutdown()


async def _store_many(
    keys: list[str], values: list[Any], subkeys: list[str], expiration_time: float, dht: hivemind.DHT, node: DHTNode
) -> None:
    await node.store_many(keys, values, expiration_time, subkeys=subkeys, await_all_replicas=False)


async def _get_many(keys: list[str], dht: hivemind.DHT, node: DHTNode) -> dict[str, Any]:
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))

