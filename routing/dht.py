"""The one adapter over ``hivemind.DHT``: announce server records, read them back, list models.

Layout in the DHT: every block ``i`` of model ``M`` has key ``homeswarm/M/block/i`` whose subkeys are
peer ids and whose values are ``ServerRecord.to_dict()``; key ``homeswarm/models`` has one subkey
per model with ``{"num_blocks": L}``. Values expire unless refreshed. Everything read back is
validated: a malformed or inconsistent record is dropped (and logged), never passed on.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from functools import partial
from typing import Any

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from homeswarm.routing.records import InvalidRecord, PeerId, ServerRecord

logger = logging.getLogger(__name__)

MODELS_KEY = "homeswarm/models"
START_TIMEOUT = 60.0  # a DHT peer is normally ready in well under a second; bootstrapping is bounded too
CALL_TIMEOUT = 60.0  # one store or lookup; hivemind bounds each network request, this bounds a dead DHT process


class DHTStartError(RuntimeError):
    """The DHT peer could not be started."""


class DHTTimeout(TimeoutError):
    """A store or lookup did not finish in time."""


def block_key(model: str, block: int) -> str:
    return f"homeswarm/{model}/block/{block}"


def dht_time() -> float:
    return get_dht_time()


class SwarmDHT:
    """A started hivemind DHT peer plus homeswarm's view of it."""

    def __init__(self, dht: hivemind.DHT, call_timeout: float = CALL_TIMEOUT):
        self.dht = dht
        self.call_timeout = call_timeout

    @classmethod
    def create(
        cls,
        initial_peers: Sequence[str] = (),
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        client_mode: bool = False,
        start_timeout: float = START_TIMEOUT,
        attempts: int = 2,
    ) -> SwarmDHT:
        """Start a DHT peer in its own process, waiting at most ``start_timeout`` s per attempt.

        hivemind forks that process; forking a process whose other threads hold locks (gRPC's, say)
        can leave the child stuck before it is ready. Such a child is killed and the start retried,
        so a caller gets a DHT or a ``DHTStartError``, never a hang.
        """
        ip_proto = "ip6" if ":" in host else "ip4"
        for attempt in range(1, attempts + 1):
            dht = hivemind.DHT(
                initial_peers=list(initial_peers),
                start=False,
                host_maddrs=[f"/{ip_proto}/{host}/tcp/{port}"],
                client_mode=client_mode,
                num_workers=4,
            )
            dht.start()
            try:
                dht.wait_until_ready(start_timeout)
            except FutureTimeoutError:
                logger.warning("the DHT process did not get ready within %g s (attempt %d of %d); killing it",
                               start_timeout, attempt, attempts)
                _kill_process_tree(dht.pid)
                dht.join(5)
                continue
            return cls(dht)
        raise DHTStartError(f"the DHT did not start within {start_timeout:g} s, {attempts} attempts")

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
        self._wait(self.dht.run_coroutine(partial(_store_many, keys, values, subkeys, expiration_time),
                                          return_future=True), "announcing")

    def get_servers(self, model: str, start: int, end: int) -> list[ServerRecord]:
        """Every valid record announced for blocks [start, end), one per peer (the freshest)."""
        keys = [block_key(model, i) for i in range(start, end)]
        found: dict[str, Any] = self._wait(
            self.dht.run_coroutine(partial(_get_many, keys), return_future=True), "reading server records"
        )
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
        entry = self._wait(self.dht.get(MODELS_KEY, latest=True, return_future=True), "listing models")
        models: dict[str, int] = {}
        if entry is not None and isinstance(entry.value, dict):
            for name, item in entry.value.items():
                value = getattr(item, "value", None)
                if isinstance(name, str) and isinstance(value, dict) and isinstance(value.get("num_blocks"), int):
                    models[name] = value["num_blocks"]
        return models

    def _wait(self, future: Any, what: str) -> Any:
        """A DHT call's result, or DHTTimeout: a DHT process that died never settles its futures."""
        try:
            return future.result(self.call_timeout)
        except FutureTimeoutError:
            future.cancel()
            alive = "" if self.dht.is_alive() else " (the DHT process has exited)"
            raise DHTTimeout(f"{what} took more than {self.call_timeout:g} s{alive}") from None

    def shutdown(self) -> None:
        self.dht.shutdown()


async def _store_many(
    keys: list[str], values: list[Any], subkeys: list[str], expiration_time: float, dht: hivemind.DHT, node: DHTNode
) -> None:
    await node.store_many(keys, values, expiration_time, subkeys=subkeys, await_all_replicas=False)


async def _get_many(keys: list[str], dht: hivemind.DHT, node: DHTNode) -> dict[str, Any]:
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))



def _kill_process_tree(pid: int | None) -> None:
    """SIGKILL a process and its descendants (the DHT process starts the p2pd daemon)."""
    if pid is None:
        return
    for child in _children(pid):
        _kill_process_tree(child)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _children(pid: int) -> list[int]:
    """Child process ids, from /proc (Linux); none elsewhere."""
    children: list[int] = []
    try:
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                children += [int(c) for c in f.read().split()]
    except OSError:
        pass
    return children
