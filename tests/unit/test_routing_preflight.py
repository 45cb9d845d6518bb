"""routing.preflight: the checks that run before a DHT peer starts, and the words for one that failed."""

from __future__ import annotations

import pytest

from homeswarm.routing.preflight import (
    check_initial_peers,
    explain_dht_error,
    is_multiaddr,
    split_peers_argv,
)

PEER = "/ip4/127.0.0.1/tcp/4001/p2p/12D3KooWBGeVDU6RWjU62wSHBu8SxcPN7iTm4V8PdZLu2sjXWcx9"
OTHER = "/dns4/example.org/tcp/31337/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"


@pytest.mark.parametrize(("argv", "expected"), [
    # a model's folder after the peers: the peers end where a word is no multiaddr
    (["--initial-peers", PEER, "model/demo", "--prompt", "x"], [f"--initial-peers={PEER}", "model/demo", "--prompt", "x"]),
    (["--initial-peers", PEER, OTHER, "m"], [f"--initial-peers={PEER}", f"--initial-peers={OTHER}", "m"]),
    # the usual order, comma-separated values, the flag repeated, the = form
    (["m", "--initial-peers", f"{PEER},{OTHER}"], ["m", f"--initial-peers={PEER}", f"--initial-peers={OTHER}"]),
    (["--initial-peers", PEER, "--initial-peers", OTHER, "m"],
     [f"--initial-peers={PEER}", f"--initial-peers={OTHER}", "m"]),
    ([f"--initial-peers={PEER}", "m"], [f"--initial-peers={PEER}", "m"]),
    # a malformed first value stays a value (and is refused by name); no value is argparse's error
    (["--initial-peers", "garbage", "m"], ["--initial-peers=garbage", "m"]),
    (["m", "--initial-peers"], ["m", "--initial-peers"]),
    (["m", "--", "--initial-peers", "x"], ["m", "--", "--initial-peers", "x"]),
])  # fmt: skip
def test_peers_end_where_a_positional_begins(argv, expected):
    assert split_peers_argv(argv) == expected


def test_multiaddrs_need_a_peer_id():
    assert is_multiaddr(PEER) and is_multiaddr(OTHER) and not is_multiaddr("/home/me/model")
    assert check_initial_peers([PEER, OTHER]) is None
    for bad in ("garbage", "/ip4/1.2.3.4/tcp/1", "/ip4/1.2.3.4/tcp/1/p2p/", "model/demo"):
        message = check_initial_peers([PEER, bad])
        assert message is not None and repr(bad) in message and "/p2p/PEER_ID" in message



def test_p2pd_errors_say_what_was_tried_and_what_to_check():
    raw = ("Daemon failed to start: 2026/12/07 21:14:03 failed to connect to bootstrap peers\n"
           "main.main()\n\t/home/runner/go/src/p2pd/main.go:312 +0x1c5f")
    message = explain_dht_error(RuntimeError(raw), [PEER, OTHER], "127.0.0.1", 0)
    assert "\n" not in message and "2026/12/07" not in message
    assert PEER in message and OTHER in message and "running" in message and "firewall" in message
    taken = explain_dht_error(RuntimeError("listen tcp4 127.0.0.1:4001: bind: address already in use"), [], "127.0.0.1",
                              4001)
    assert "port 4001" in taken and "taken" in taken
    assert explain_dht_error(RuntimeError("2026/12/07 21:14:03 something new"), [], "h", 1) == "something new"
    assert explain_dht_error(TimeoutError(), [], "h", 1) == "TimeoutError"
