"""ClientConfig: the client's limits and timeouts, each with its help text and a sane default."""

from __future__ import annotations

from dataclasses import dataclass, field


def _opt(default, help: str):  # noqa: ANN001, A002
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ClientConfig:
    connect_timeout: float = _opt(5.0, "seconds to wait for a node to answer a ping or open a session")
    step_timeout: float = _opt(30.0, "seconds one inference step on one node may take beyond what its tokens take "
                               "at the node's announced speed; then the client asks the node (Info): one that answers "
                               "is busy and waited for (up to max_step_wait), one that does not counts as failed")
    max_step_wait: float = _opt(600.0, "the longest the client waits for one step of a node that still answers Info "
                                "(busy behind other sessions' prefills) before it counts as failed")
    forward_timeout: float = _opt(300.0, "seconds a stateless forward pass may take")
    records_max_age: float = _opt(5.0, "re-read server records from the DHT in the background when older "
                                  "than this many seconds (planning goes on with the ones held)")
    records_max_stale: float = _opt(60.0, "wait for a fresh read of the server records when older than this")
    max_failovers: int = _opt(8, "node failures one generation may survive before giving up")
    ban_seconds: float = _opt(15.0, "how long a failed node is avoided; doubles with each further failure")
    max_ban_seconds: float = _opt(300.0, "the longest a node is avoided")
    rtt_smoothing: float = _opt(0.3, "weight of a new round-trip sample in the moving average")
    compression: str = _opt(
        "none",
        "compression of hidden states on the wire: none (exact), float16, bfloat16, int8, or auto "
        "(per hop: none on fast links, float16 on slow ones)",
    )
    auto_compression_rtt: float = _opt(0.005, "with compression=auto, hops whose round trip is at least this "
                                       "many seconds get float16")
    dtype: str = _opt("float32", "dtype of the client's embeddings and LM head")
    fast_greedy: bool = _opt(True, "greedy decoding with a float32 LM head of 4M weights or more reads an int8 "
                             "copy of it and recomputes in float32 only the rows that could hold the largest "
                             "logit: the same tokens in 0.23-0.39x of the head's time per token, for a quarter of "
                             "its memory again")
    exact: bool = _opt(False, "route only through nodes that serve the checkpoint's own weights (no int8 or "
                       "int4 quantization); by default any node is accepted")
    adapter: str = _opt("", "LoRA adapter (its name as nodes announce it) that every block runs with: routes only "
                        "through nodes that serve it; empty: the base weights")
    handoff: bool = _opt(True, "nodes pass hidden states straight to the next node (N+1 legs a step, not 2N)")
    verify_fraction: float = _opt(
        0.0, "share of steps (0..1) whose every hop is re-run on a second server of the same span and compared; "
        "a node caught returning wrong hidden states is banned and the step recomputed (checked steps are relayed)"
    )
    mirrors: bool = _opt(False, "give each hop a mirror where a second server of its blocks takes one: it gets the "
                         "same inputs, its answers are compared with the hop's before the step returns (a node "
                         "caught is banned and the right answer used), and it takes over at once when the hop "
                         "fails (no replay); costs the mirrors' compute and the client's bandwidth, and relays "
                         "every step (no hand-off). On by default on the command line (--trust: off, for a swarm "
                         "of trusted nodes); off here unless a program asks (it should on a public swarm)")
    require_tls: bool = _opt(False, "use only nodes whose signed record pins a TLS certificate (skip nodes started "
                             "with --insecure, which are otherwise dialled in plaintext)")
    check_weights: bool = _opt(True, "refuse nodes whose announced weights digest differs from the checkpoint's "
                               "(hashes the checkpoint folder's block tensors once, when it has them)")
    caught_ban_seconds: float = _opt(3600.0, "how long a node caught returning wrong hidden states is avoided")
    handoff_min_rtt: float = _opt(
        0.002, "use hand-off only when the route's nodes are on average at least this many seconds of round "
        "trip away; on faster links (one machine, a LAN) the client relays, which costs less CPU than pushing "
        "(a push costs about 1.2 ms more than relaying on one machine, and saves half a round trip)"
    )
