"""A test run's scratch folder, and making sure that the processes a test run starts die with it.

Everything a run writes to the temporary folder goes into one short folder, ``/tmp/hst<pid>-XXXX``
(unix socket paths are limited to 107 bytes, and hivemind and p2pd put theirs there), removed when the
run ends: multiprocessing's ``pymp-*`` folders, torch's ``torch-shm-dir-*``, and (for the DHTs the
tests run in-process) hivemind's sockets. The folder carries the run's pid, so a run that was killed
(a CI time-out, a SIGKILL) leaves a folder the next run recognizes as stale and removes.

Daemons that tests start in a session of their own (so that a Ctrl-C reaches the test first) are not
in pytest's process group: killed, pytest would leave them running. ``die_with_parent`` arms
PR_SET_PDEATHSIG in the child, so the kernel sends it SIGTERM once the thread that started it is gone;
``arm_popen`` applies it to every such ``subprocess.Popen`` started from the main thread (the signal
follows the thread, not the process: a child started from a worker thread would be killed when that
thread ends).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from homeswarm.client.local_swarm import with_parent_death_signal

PREFIX = "hst"
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_STALE = re.compile(rf"{PREFIX}(\d+)-")
SOCKETS = "hivemind-*.sock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale(root: str | os.PathLike[str]) -> list[Path]:
    """Remove the scratch folders in ``root`` of runs whose process is gone; what was removed."""
    removed = []
    for folder in Path(root).glob(f"{PREFIX}*-*"):
        match = _STALE.match(folder.name)
        if match and folder.is_dir() and not _alive(int(match.group(1))):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _bound_unix_paths() -> set[str] | None:
    """The paths of every bound unix socket of this network namespace (/proc/net/unix); None without it."""
    try:
        lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    except OSError:
        return None
    return {fields[7] for fields in (line.split() for line in lines) if len(fields) >= 8}


def dead_sockets(folder: str | os.PathLike[str], since: float) -> list[Path]:
    """hivemind's sockets in ``folder`` made since ``since`` that no process holds any more: left by
    daemons (which put theirs in /tmp whatever TMPDIR says) killed before they could remove them."""
    bound = _bound_unix_paths()
    if bound is None:
        return []
    # a daemon in another network namespace (tests/helpers/netns.py) binds where /proc/net/unix cannot see:
    # every live p2pd's sockets count as held
    from homeswarm.routing.dht import p2pd_sockets

    for pid in (int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()):
        bound.update(p2pd_sockets(pid))
    dead = []
    for path in Path(folder).glob(SOCKETS):
        try:
            if path.lstat().st_mtime >= since and path.is_socket() and str(path) not in bound:
                dead.append(path)
        except OSError:
            continue
    return dead


@contextlib.contextmanager
def scratch_folder(root: str | os.PathLike[str] | None = None) -> Iterator[Path]:
    """A fresh scratch folder made the temporary folder of this process and of what it starts (TMPDIR),
    removed on exit together with the hivemind sockets its run left in ``root``."""
    root = Path(root or tempfile.gettempdir())
    remove_stale(root)
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
    saved_env, saved_dir = os.environ.get("TMPDIR"), tempfile.tempdir
    started = folder.stat().st_mtime - 1
    os.environ["TMPDIR"] = tempfile.tempdir = str(folder)
    prefix = _redirect_hivemind_sockets(folder)
    try:
        yield folder
    finally:
        tempfile.tempdir = saved_dir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
        _restore_hivemind_sockets(prefix)
        for path in dead_sockets(root, started):
            with contextlib.suppress(OSError):
                path.unlink()
        _remove_after_multiprocessing(folder)


def _remove_after_multiprocessing(folder: Path) -> None:
    """Remove ``folder`` now, or, when multiprocessing's own temporary folder of this process is in it,
    right after multiprocessing removes that one at exit (it would fail, loudly, on a folder gone)."""
    import multiprocessing.util

    own = multiprocessing.util.process.current_process()._config.get("tempdir")
    if own is not None and Path(own).is_relative_to(folder):
        # finalizers run by decreasing priority: the temporary folder's is -100
        multiprocessing.util.Finalize(None, shutil.rmtree, args=(str(folder),), kwargs={"ignore_errors": True},
                                      exitpriority=-200)
    else:
        shutil.rmtree(folder, ignore_errors=True)


def _redirect_hivemind_sockets(folder: Path) -> str | None:
    """In-process DHTs: hivemind names its sockets under a fixed /tmp prefix, not TMPDIR's."""
    try:
        from hivemind.p2p import P2P
    except ImportError:
        return None
    saved = P2P._UNIX_SOCKET_PREFIX
    P2P._UNIX_SOCKET_PREFIX = f"/unix{folder}/hivemind-"
    return saved


def _restore_hivemind_sockets(saved: str | None) -> None:
    if saved is not None:
        from hivemind.p2p import P2P

        P2P._UNIX_SOCKET_PREFIX = saved


def die_with_parent(parent: int) -> Callable[[], None] | None:
    """A hook for a child between fork and exec: SIGTERM it once the thread that started it is gone. prctl
    is looked up here, in the parent: the child of a threaded process must not load libraries (a lock
    another thread held at the fork stays held). None where there is no prctl."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def arm() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the signal was armed
            os._exit(1)

    return arm


@contextlib.contextmanager
def arm_popen() -> Iterator[None]:
    """Every ``subprocess.Popen`` with ``start_new_session=True`` and no ``preexec_fn`` of its own, started
    from the main thread, dies with this process (see the module docstring)."""
    original: Callable[..., None] = subprocess.Popen.__init__

    def __init__(self: subprocess.Popen, *args: object, **kwargs: object) -> None:  # type: ignore[type-arg]
        if (kwargs.get("start_new_session") and kwargs.get("preexec_fn") is None
                and threading.current_thread() is threading.main_thread()):
            argv = args[0] if args else kwargs.get("args")
            if isinstance(argv, list | tuple) and argv and Path(str(argv[0])).name == "setpriv":
                pass  # armed already (LocalSwarm)
            elif isinstance(argv, list | tuple) and (armed := with_parent_death_signal([str(a) for a in argv])):
                args = (armed, *args[1:]) if args else args  # no Python in the forked child (see LocalSwarm)
                if not args:
                    kwargs["args"] = armed
            else:
                kwargs["preexec_fn"] = die_with_parent(os.getpid())
        original(self, *args, **kwargs)

    subprocess.Popen.__init__ = __init__  # type: ignore[method-assign]
    try:
        yield
    finally:
        subprocess.Popen.__init__ = original  # type: ignore[method-assign]
