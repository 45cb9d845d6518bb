"""Which block to fetch from which peer, and what a failure means: the pure core of fetching weights from peers.

Plain data in, plain data out; no sockets, no clock. A block is fetched only against the digest that at
least ``MIN_AGREEING`` peers with different peer ids announce for it (and more peers than announce any
other digest for it); only peers announcing that digest are asked for it. Each peer fetches one block at
a time, so blocks spread across peers, the faster ones taking more; a block with bytes already on disk
(a broken transfer) is taken first, to be resumed at its offset.

What a failure means:
- a stream that breaks or stalls: the peer is dropped for this fetch (``broke``), its block goes back to
  the pool with its bytes kept;
- a finished file whose digest (or header) is wrong (``mismatched``): the bytes are discarded; the peer that
  sent all of them is banned. When several peers sent parts of it (a resumed transfer), which one lied
  cannot be told: nobody is banned and the block is fetched again from scratch, from one peer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

MIN_AGREEING = 2
EARLIER_RUN = "(an earlier run)"  # the sender of bytes a partial file held before this fetch: nobody to ban


@dataclass(frozen=True)
class PeerOffer:
    """A peer serving blocks, how to reach it, and the digest it announces for each of them."""

    peer_id: str
    address: str
    digests: dict[int, str]
    tls_cert: str = ""
    relays: tuple[str, ...] = ()


def agreed_digests(offers: Iterable[PeerOffer], blocks: Iterable[int], min_peers: int = MIN_AGREEING) -> dict[int, str]:
    """Block -> the digest at least ``min_peers`` distinct peers announce, and more peers than any other digest;
    blocks without one are left out."""
    by_block: dict[int, dict[str, set[str]]] = {}
    for offer in offers:
        for block, digest in offer.digests.items():
            by_block.setdefault(block, {}).setdefault(digest, set()).add(offer.peer_id)
    agreed = {}
    for block in blocks:
        counts = Counter({digest: len(peers) for digest, peers in by_block.get(block, {}).items()})
        ranked = counts.most_common(2)
        if ranked and ranked[0][1] >= min_peers and (len(ranked) == 1 or ranked[0][1] > ranked[1][1]):
            agreed[block] = ranked[0][0]
    return agreed


@dataclass
class FetchPlan:
    """The state of one fetch: blocks pending, in flight, done; peers banned or dropped."""

    blocks: list[int]
    offers: list[PeerOffer]
    agreed: dict[int, str]
    partial: dict[int, int] = field(default_factory=dict)  # block -> bytes already on disk
    done: set[int] = field(default_factory=set)
    active: dict[int, str] = field(default_factory=dict)  # block -> peer fetching it
    banned: set[str] = field(default_factory=set)
    dropped: set[str] = field(default_factory=set)
    contributors: dict[int, set[str]] = field(default_factory=dict)
    resumed: list[tuple[int, int, str]] = field(default_factory=list)  # (block, offset, peer) of each resume

    def usable(self, peer_id: str) -> bool:
        return peer_id not in self.banned and peer_id not in self.dropped

    def serves(self, offer: PeerOffer, block: int) -> bool:
        return block in self.agreed and offer.digests.get(block) == self.agreed[block]

    @property
    def pending(self) -> list[int]:
        return [b for b in self.blocks if b not in self.done and b not in self.active]

    @property
    def complete(self) -> bool:
        return len(self.done) == len(set(self.blocks))

    def take(self, offer: PeerOffer) -> int | None:
        """The next block for ``offer``'s peer (now in flight), or None when it has nothing left to give."""
        if not self.usable(offer.peer_id):
            return None
        candidates = [b for b in self.pending if self.serves(offer, b)]
        if not candidates:
            return None
        block = min(candidates, key=lambda b: (self.partial.get(b, 0) == 0, b))  # resume broken transfers first
        self.active[block] = offer.peer_id
        if self.partial.get(block, 0) > 0:
            self.resumed.append((block, self.partial[block], offer.peer_id))
        return block

    def received(self, block: int, peer_id: str, size: int) -> None:
        self.contributors.setdefault(block, set()).add(peer_id)
        self.partial[block] = self.partial.get(block, 0) + size

    def finished(self, block: int) -> None:
        self.active.pop(block, None)
        self.partial.pop(block, None)
        self.contributors.pop(block, None)
        self.done.add(block)

    def broke(self, block: int, peer_id: str) -> None:
        """The peer's stream broke or stalled: drop the peer, keep the block's bytes for a resume."""
        self.active.pop(block, None)
        self.dropped.add(peer_id)

    def mismatched(self, block: int) -> str | None:
        """The block's bytes are wrong and discarded; the peer banned for it (None: several sent parts)."""
        self.active.pop(block, None)
        senders = self.contributors.pop(block, set())
        self.partial.pop(block, None)
        if len(senders) == 1 and EARLIER_RUN not in senders:
            (peer,) = senders
            self.banned.add(peer)
            return peer
        return None

    def stranded(self) -> list[int]:
        """Pending blocks that no usable peer can give."""
        return [b for b in self.pending
                if not any(self.usable(o.peer_id) and self.serves(o, b) for o in self.offers)]
