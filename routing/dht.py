"""The one adapter over ``hivemind.DHT``: announce server records, read them back, list models.

hivemind runs its DHT peer in a child process, forked from ours. Forking while gRPC's threads live
is unsafe: gRPC's fork handler can then block ``fork()`` itself forever (seen here: a test process
that had used gRPC channels hung inside ``os.fork`` when it started its next client). So a DHT is
forked straight from this process only while no gRPC thread runs in it; otherwise it is forked from a
fork server (a clean process started by exec, with hivemind already imported).

The DHT process goes with its owner, however the owner ends: it leaves the owner's process group (a
signal to the group, such as Ctrl-C or a service manager's SIGTERM, reaches the owner alone, which then
announces offline through the DHT and stops it in order), exits on SIGTERM taking its p2pd with it, and
a watchdog thread in it exits the same way once the owner process is gone (killed with SIGKILL, say).
p2pd in turn goes with the DHT process however that ends, SIGKILL included (Linux's parent-death
signal); the owner notices a dead DHT process through :meth:`SwarmDHT.is_alive`.

Layout in the DHT: every block ``i`` of model ``M`` has key ``homeswarm/M/block/i`` whose subkeys are
``<peer id>[owner:<the node's public key>]`` and whose values are ``ServerRecord.to_dict()``, signed
with that key (``routing.signing``: every DHT peer drops records that are unsigned or not their signer's); key ``homeswarm/models`` has one subkey
per model with ``{"num_blocks": L}``. Values expire unless refreshed. Everything read back is
validated: a malformed or inconsistent record is dropped (and logged), never passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import io
import logging
import multiprocessing.popen_forkserver
import os
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeoutError
from functools import partial
from typing import Any

import hivemind
from hivemind.dht.node import DHTNode
from hivemind.utils import get_dht_time

from homeswarm.routing.records import InvalidRecord, PeerId, ServerRecord
from homeswarm.routing.signing import NodeKey, owner_of

logger = logging.getLogger(__name__)

MODELS_KEY = "homeswarm/models"
_DEATH_CHECK = 1.0  # seconds between checks, while waiting on a DHT call, that the DHT process still runs
OWNER_POLL = 0.5  # seconds between the DHT process's checks that its owner still runs
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

    def __init__(self, dht: hivemind.DHT, call_timeout: float = CALL_TIMEOUT, key: NodeKey | None = None):
        self.dht = dht
        self.call_timeout = call_timeout
        self.key = key  # a node's: its identity and the signer of its records (None: reads only)
        # hivemind sends each call down one pipe; threads (announcer, hand-off checks) take turns at it
        self._send_lock = threading.Lock()

    def _call(self, coro: Any) -> Any:
        """A future of ``coro`` run in the DHT process."""
        with self._send_lock:
            return self.dht.run_coroutine(coro, return_future=True)

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
        start_method: str = "auto",
        key: NodeKey | None = None,
        relays: Sequence[str] = (),
        relay_service: bool = False,
    ) -> SwarmDHT:
        """Start a DHT peer in its own process, waiting at most ``start_timeout`` s per attempt.

        A process that does not get ready in time (say, stuck bootstrapping) is killed with its p2pd
        and the start retried, so the caller gets a DHT or a ``DHTStartError``, never a wait without
        end. Where the fork itself could hang (gRPC threads running here), the fork server is used.

        ``start_method``: "fork", "forkserver", or "auto" (fork while no gRPC thread runs here).
        ``key``: a node's key, which becomes the peer's identity and signs what it announces; every peer
        (with or without a key) validates the records it stores and reads.

        ``relays``: multiaddrs of relay peers, for a peer that others cannot dial. Its p2pd then takes
        reservations on exactly these relays at once (libp2p's relay discovery waits minutes for enough
        candidates), counts itself as unreachable, and joins the DHT as a client, as such a peer cannot
        answer the DHT's requests directly (see ``homeswarm.routing.relay``).

        ``relay_service``: relay for such peers with the limits p2pd is configured with (4 GiB and 30 min
        per relayed connection). p2pd always runs libp2p's default relay (128 KiB and 2 min per
        connection: a session through it breaks after about a hundred decoding steps of a small model)
        and replaces it with the configured one only once it counts itself publicly reachable, which
        AutoNAT never concludes for private addresses; so this tells p2pd that it is. Which of the two
        relays serves is still decided by a race at p2pd's start (the default one is registered by the
        daemon after the host starts, the configured one when the host hears it is public; the last to
        register wins): on this machine the configured one won in most starts, not all.
        """
        if start_method not in ("auto", "fork", "forkserver"):
            raise ValueError(f"start_method must be auto, fork or forkserver, got {start_method!r}")
        if start_method == "auto":
            start_method = "forkserver" if _grpc_threads_running() else "fork"
        dht_class = _ManagedDHT if start_method == "fork" else _ForkServerDHT
        ip_proto = "ip6" if ":" in host else "ip4"
        relay_options: dict[str, Any] = {}
        if relays:
            client_mode = True
            relay_options = dict(use_auto_relay=True, trusted_relays=list(relays), force_reachability="private")
        elif relay_service:
            relay_options = dict(force_reachability="public")
        validators = (key or _READER_KEY()).validators(MODELS_KEY)
        with tempfile.TemporaryDirectory(prefix="homeswarm-id-") as folder:
            identity: dict[str, Any] = {}
            if key is not None:  # p2pd reads it once, at start
                identity = {"identity_path": os.path.join(folder, "identity.key"), "check_if_identity_free": False}
                key.write_identity(identity["identity_path"])
            return cls._start(dht_class, initial_peers, host, port, ip_proto, client_mode, start_timeout, attempts,
                              validators, identity, key, relay_options)

    @classmethod
    def _start(cls, dht_class: type, initial_peers: Sequence[str], host: str, port: int, ip_proto: str,
               client_mode: bool, start_timeout: float, attempts: int, validators: list, identity: dict[str, Any],
               key: NodeKey | None, relay_options: dict[str, Any]) -> SwarmDHT:
        for attempt in range(1, attempts + 1):
            dht = dht_class(
                initial_peers=list(initial_peers),
                start=False,
                host_maddrs=[f"/{ip_proto}/{host}/tcp/{port}"],
                client_mode=client_mode,
                num_workers=4,
                record_validators=validators,
                **identity,
                **relay_options,
            )
            dht.static_relays_only = "trusted_relays" in relay_options
            dht.owner = (os.getpid(), _start_time(os.getpid()))
            dht.start()
            try:
                dht.wait_until_ready(start_timeout)
            except FutureTimeoutError:
                logger.warning("the DHT process did not get ready within %g s (attempt %d of %d); killing it",
                               start_timeout, attempt, attempts)
                _kill_process_tree(dht.pid)
                dht.join(5)
                continue
            return cls(dht, key=key)
        raise DHTStartError(f"the DHT did not start within {start_timeout:g} s, {attempts} attempts")

    @property
    def peer_id(self) -> str:
        return self.dht.peer_id.to_base58()

    def is_alive(self) -> bool:
        """Whether the DHT process still runs (it may have been killed on its own)."""
        return self.dht.is_alive()

    def visible_maddrs(self) -> list[str]:
        return [str(m) for m in self.dht.get_visible_maddrs()]

    def announce(self, record: ServerRecord, num_blocks: int, expiration_time: float) -> None:
        """Store the record under every block it serves, and the model in the model index."""
        if self.key is None or record.peer_id != self.key.peer_id:
            raise ValueError("a DHT peer announces only records of its own key's peer id")
        keys = [block_key(record.model, i) for i in range(record.start, record.end)] + [MODELS_KEY]
        values: list[Any] = [record.to_dict()] * record.num_blocks + [{"num_blocks": num_blocks}]
        subkeys = [self.key.subkey()] * record.num_blocks + [record.model]
        self._wait(self._call(partial(_store_many, keys, values, subkeys, expiration_time)), "announcing")

    def get_servers(self, model: str, start: int, end: int) -> list[ServerRecord]:
        """Every valid record announced for blocks [start, end), one per peer (the freshest)."""
        return self.lookup_servers(model, start, end).result()

    def get_servers_timed(self, model: str, start: int, end: int) -> list[tuple[float, ServerRecord]]:
        """Like :meth:`get_servers`, each record with its expiration time (DHT time, see :func:`dht_time`)."""
        return self.lookup_servers(model, start, end).result_timed()

    def lookup_servers(self, model: str, start: int, end: int) -> ServersLookup:
        """Start reading the records of blocks [start, end) without waiting for them."""
        keys = [block_key(model, i) for i in range(start, end)]
        future = self._call(partial(_get_many, keys))
        return ServersLookup(self, future, model, start, end)

    def list_models(self) -> dict[str, int]:
        """Model name -> number of blocks, for every model some node announces."""
        with self._send_lock:
            future = self.dht.get(MODELS_KEY, latest=True, return_future=True)
        entry = self._wait(future, "listing models")
        models: dict[str, int] = {}
        if entry is not None and isinstance(entry.value, dict):
            for name, item in entry.value.items():
                value = getattr(item, "value", None)
                if isinstance(name, str) and isinstance(value, dict) and isinstance(value.get("num_blocks"), int):
                    models[name] = value["num_blocks"]
        return models

    def num_peers(self) -> int:
        """Peers in this DHT peer's routing table. A lookup drops the peers that fail to answer, so after
        one, 0 means no peer of the swarm is reachable (not merely that nothing is announced)."""
        return self._wait(self._call(_count_peers), "counting peers")

    def _wait(self, future: Any, what: str) -> Any:
        """A DHT call's result, or DHTTimeout: a DHT process that died never settles its futures, so the
        wait also ends, within a second, once the process is gone (killed along with its p2pd, say)."""
        deadline = time.monotonic() + self.call_timeout
        while True:
            try:
                return future.result(max(0.0, min(_DEATH_CHECK, deadline - time.monotonic())))
            except FutureTimeoutError:
                alive = self.dht.is_alive()
                if alive and time.monotonic() < deadline:
                    continue
                future.cancel()
                if time.monotonic() < deadline:
                    raise DHTTimeout(f"{what} did not finish: the DHT process has exited") from None
                raise DHTTimeout(f"{what} took more than {self.call_timeout:g} s"
                                 + ("" if alive else " (the DHT process has exited)")) from None

    def call(self, coroutine_fn: Any, what: str) -> Any:
        """Run ``coroutine_fn(dht, node)`` in the DHT process and wait (bounded) for its result."""
        return self._wait(self._call(coroutine_fn), what)

    def shutdown(self) -> None:
        self.dht.shutdown()


class ServersLookup:
    """A lookup of server records in flight: ``done()`` never blocks; ``result()`` waits (bounded)."""

    def __init__(self, dht: SwarmDHT, future: Any, model: str, start: int, end: int):
        self._dht, self._future = dht, future
        self.model, self.start, self.end = model, start, end

    def done(self) -> bool:
        return self._future.done()

    def result(self) -> list[ServerRecord]:
        """The valid records, one per peer (the freshest); DHTTimeout if the DHT does not answer."""
        return [record for _, record in self.result_timed()]

    def result_timed(self) -> list[tuple[float, ServerRecord]]:
        """The same records, each with its expiration time."""
        found: dict[str, Any] = self._dht._wait(self._future, "reading server records")
        return _parse_servers(found, self.model, self.start, self.end)


@functools.lru_cache(maxsize=1)
def _READER_KEY() -> NodeKey:  # noqa: N802
    """The key of a peer that only reads (client, bootstrap peer, dashboard): it validates, never signs."""
    return NodeKey()


def _parse_servers(found: dict[str, Any], model: str, start: int, end: int) -> list[tuple[float, ServerRecord]]:
    best: dict[PeerId, tuple[float, ServerRecord]] = {}
    for block in range(start, end):
        key = block_key(model, block)
        entry = found.get(key)
        if entry is None or not isinstance(entry.value, dict):
            continue
        for subkey, item in entry.value.items():
            try:
                record = ServerRecord.from_dict(item.value)
            except (InvalidRecord, AttributeError) as e:
                logger.debug("dropping a malformed record under %s: %s", key, e)
                continue
            if owner_of(subkey) != record.peer_id or record.model != model or not record.start <= block < record.end:
                logger.debug("dropping an inconsistent record under %s from %s", key, subkey)
                continue
            expiration = item.expiration_time
            if record.peer_id not in best or best[record.peer_id][0] < expiration:
                best[record.peer_id] = (expiration, record)
    return list(best.values())


async def _store_many(
    keys: list[str], values: list[Any], subkeys: list[str], expiration_time: float, dht: hivemind.DHT, node: DHTNode
) -> None:
    await node.store_many(keys, values, expiration_time, subkeys=subkeys, await_all_replicas=False)


async def _get_many(keys: list[str], dht: hivemind.DHT, node: DHTNode) -> dict[str, Any]:
    return await node.get_many(keys, sufficient_expiration_time=float("inf"))


async def _count_peers(dht: hivemind.DHT, node: DHTNode) -> int:
    return len(node.protocol.routing_table.uid_to_peer_id)


_GRPC_THREAD_NAMES = ("event_engine", "grpc", "lifeguard")  # gRPC core's native threads


def _grpc_threads_running() -> bool:
    """Whether gRPC's native threads run in this process (thread names from /proc; False elsewhere)."""
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        return False
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/comm") as f:
                if f.read().startswith(_GRPC_THREAD_NAMES):
                    return True
        except OSError:
            continue  # the thread has ended
    return False


class _ManagedDHT(hivemind.DHT):
    """hivemind's DHT process, made to end with the process that started it (see the module docstring)."""

    owner: tuple[int, int | None] = (0, None)  # (pid, start time) of the process that started it
    static_relays_only = False  # reserve slots on the trusted relays only, without relay discovery

    def run(self) -> None:
        _manage_dht_process(*self.owner)
        if self.static_relays_only:
            _disable_relay_discovery()
        super().run()


def _manage_dht_process(owner_pid: int, owner_start: int | None) -> None:
    """In the DHT process, before hivemind starts: leave the owner's process group, exit on SIGTERM and
    when the owner is gone, in both cases with p2pd."""
    try:
        os.setpgid(0, 0)
    except OSError as e:  # a platform without process groups: the owner's group signals reach us too
        logger.debug("the DHT process stays in its owner's process group: %s", e)
    # forked from the owner, we inherit its signal handlers (its event loop's, which do nothing here)
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGTERM, lambda *_: _exit_with_children(0))
    _children_die_with_us()
    if owner_pid:
        threading.Thread(target=_watch_owner, args=(owner_pid, owner_start), name="owner-watchdog",
                         daemon=True).start()


_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def _children_die_with_us() -> None:
    """Have every process that asyncio starts in this process (hivemind starts p2pd so) receive SIGKILL
    when this process dies, however it dies (SIGKILL included): Linux's parent-death signal, armed in
    the child between fork and exec. hivemind offers no hook for how it starts p2pd, so this wraps
    asyncio's ``create_subprocess_exec`` in this process only (the DHT process, which runs hivemind
    alone). Elsewhere than on Linux nothing changes: the exits above stop p2pd in order."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError) as e:
        logger.debug("no prctl here, so p2pd outlives a killed DHT process: %s", e)
        return
    parent = os.getpid()

    def arm() -> None:  # runs in the child, between fork and exec
        prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    original = asyncio.subprocess.create_subprocess_exec

    async def create_subprocess_exec(*args: Any, **kwargs: Any) -> asyncio.subprocess.Process:
        kwargs.setdefault("preexec_fn", arm)
        return await original(*args, **kwargs)

    asyncio.subprocess.create_subprocess_exec = create_subprocess_exec
    asyncio.create_subprocess_exec = create_subprocess_exec


def _watch_owner(owner_pid: int, owner_start: int | None) -> None:
    while _process_alive(owner_pid, owner_start):
        time.sleep(OWNER_POLL)
    logger.warning("the process that started this DHT peer is gone; stopping")
    _exit_with_children(0)


def _disable_relay_discovery() -> None:
    """In the DHT process: start p2pd with ``-relayDiscovery=false`` (hivemind has no option for it).

    With discovery on, p2pd's autorelay waits for four relay candidates, or three minutes, before it
    reserves a slot; with the trusted relays as its only, static, candidates it reserves at once.
    """
    from hivemind.p2p import P2P

    make_args = P2P._make_process_args
    P2P._make_process_args = staticmethod(lambda *args, **kwargs: make_args(*args, **kwargs, relayDiscovery=False))


def _exit_with_children(code: int) -> None:
    """Stop p2pd (SIGTERM, then SIGKILL after a second), remove the sockets hivemind's shutdown would have
    removed, and exit at once."""
    children = _children(os.getpid())
    sockets = [path for pid in children for path in p2pd_sockets(pid)]
    for pid in children:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline and any(_process_alive(pid, None) for pid in children):
        time.sleep(0.02)
    for pid in children:
        _kill_process_tree(pid)
    for path in sockets:
        with contextlib.suppress(OSError):
            os.unlink(path)
    os._exit(code)


def p2pd_sockets(pid: int) -> list[str]:
    """The Unix sockets of p2pd process ``pid`` (its control socket, from its command line) and of hivemind's
    side of it (named alike): files in /tmp that only an orderly shutdown removes. None for another process."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            args = f.read().decode(errors="replace").split("\0")
    except OSError:
        return []
    for arg in args:
        if arg.startswith("-listen=/unix/"):
            daemon = arg[len("-listen=/unix"):]
            folder, name = os.path.split(daemon)
            if name.startswith("hivemind-p2pd-"):
                return [daemon, os.path.join(folder, "hivemind-p2pclient-" + name[len("hivemind-p2pd-"):])]
            return [daemon]
    return []


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), telling it from a later one with its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def _process_alive(pid: int, start: int | None) -> bool:
    """Whether ``pid`` runs (a zombie does not), and is the process that started at ``start`` if given."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return not os.path.exists("/proc/self")  # without /proc, kill(pid, 0) is all we know
    if fields[0] in ("Z", "X"):
        return False
    return start is None or int(fields[19]) == start


class _ForkServerDHT(_ManagedDHT):
    """hivemind's DHT process, forked from the fork server rather than from this process."""

    @staticmethod
    def _Popen(process_obj):  # noqa: ANN001, ANN205, N802 - multiprocessing's hook
        _start_fork_server()
        return _ForkServerPopen(process_obj)


_fork_server_lock = threading.Lock()
_fork_server_started = False


def _start_fork_server() -> None:
    global _fork_server_started
    with _fork_server_lock:
        if not _fork_server_started:
            # the children import these from the server's memory instead of each importing them again
            multiprocessing.forkserver.set_forkserver_preload(["hivemind", "homeswarm.routing.dht"])
            multiprocessing.forkserver.ensure_running()
            _fork_server_started = True


class _ForkServerPopen(multiprocessing.popen_forkserver.Popen):
    """The standard fork-server launch, minus re-importing the parent's ``__main__`` in the child: the
    child needs only hivemind and this module, and a script without a ``__main__`` guard must not run
    again there."""

    def _launch(self, process_obj):  # noqa: ANN001
        from multiprocessing import context, forkserver, reduction, spawn, util

        prep_data = spawn.get_preparation_data(process_obj._name)
        prep_data.pop("init_main_from_name", None)
        prep_data.pop("init_main_from_path", None)
        buf = io.BytesIO()
        context.set_spawning_popen(self)
        try:
            reduction.dump(prep_data, buf)
            reduction.dump(process_obj, buf)
        finally:
            context.set_spawning_popen(None)
        self.sentinel, w = forkserver.connect_to_new_process(self._fds)
        _parent_w = os.dup(w)
        self.finalizer = util.Finalize(self, util.close_fds, (_parent_w, self.sentinel))
        with open(w, "wb", closefd=True) as f:
            f.write(buf.getbuffer())
        self.pid = forkserver.read_signed(self.sentinel)


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
