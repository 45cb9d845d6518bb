"""The console scripts' entry points: OpenMP's wait policy is chosen before torch loads, then the real
``main`` runs (``join-swarm``: :func:`homeswarm.node.main.main`; ``homeswarm``:
:func:`homeswarm.client.cli.main`).

Why: torch's CPU build runs its parallel operations on libgomp, whose idle threads spin after every
parallel operation for ``GOMP_SPINCOUNT`` rounds (300,000 by default: milliseconds) before they sleep.
Inside one process that is what keeps back-to-back operations fast; but a node, a client and their DHT
processes sharing a machine's cores take turns, and a process that has just finished its step then
burns a core the next one in the chain needs (a client spinning after its LM head slowed the first
node's step). With 10,000 rounds, greedy decoding through 2 nodes on 2 cores ran 16 tok/s instead of
14 (a 16-layer, hidden-1024 model) and 100-110 instead of 72-93 (8 layers, hidden 256), while
``transformers`` in one process kept its speed; at 1,000 rounds it lost half of it (docs/BENCHMARKS.md,
"The loopback gap"). libgomp reads the variable once, when torch is imported, so it is set here, before
any import of torch, and only where neither ``GOMP_SPINCOUNT`` nor ``OMP_WAIT_POLICY`` is set already.
Importing this module changes nothing.

The command lines are parsed and checked before the real ``main`` is imported: ``--help`` and bad input
answer in a fraction of a second, without loading torch or hivemind.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

SPIN_COUNT = "10000"


def configure_openmp(environ: MutableMapping[str, str] | None = None) -> None:
    """Set ``GOMP_SPINCOUNT`` to :data:`SPIN_COUNT` unless the wait policy is configured already."""
    environ = os.environ if environ is None else environ
    if "GOMP_SPINCOUNT" not in environ and "OMP_WAIT_POLICY" not in environ:
        environ["GOMP_SPINCOUNT"] = SPIN_COUNT


def join_swarm() -> None:
    configure_openmp()
    from homeswarm.node.preflight import parse_args

    config = parse_args()  # --help and bad input answer here, before torch and hivemind load (seconds)
    from homeswarm.node.main import run

    run(config)


def homeswarm() -> None:
    configure_openmp()
    from homeswarm.client.cli import main

    main()
