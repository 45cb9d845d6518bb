"""How blocks are written for people: ``A:B``, the blocks A to B-1, as ``--blocks A:B`` takes them.

One notation for input and output, so that what a message names can be given back to a command:
`homeswarm status` saying "blocks 2:4 served by nobody" means ``join-swarm --blocks 2:4`` fills the
gap. Half-open like Python's slices and like the spans on the wire (``start``, ``end`` exclusive).
Pure: numbers in, text out.
"""

from __future__ import annotations

from collections.abc import Iterable


def block_range(start: int, end: int) -> str:
    """Blocks ``start`` to ``end - 1``: '2:4'."""
    return f"{start}:{end}"


def block_ranges(blocks: Iterable[int]) -> str:
    """A set of blocks as its runs: [0, 1, 2, 5, 7, 8] -> '0:3, 5:6, 7:9'."""
    runs: list[list[int]] = []
    for block in sorted(set(blocks)):
        if runs and block == runs[-1][1]:
            runs[-1][1] = block + 1
        else:
            runs.append([block, block + 1])
    return ", ".join(block_range(a, b) for a, b in runs)
