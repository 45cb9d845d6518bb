"""NodeConfig.from_args: the join-swarm flags of the interface contract, and every way to get them wrong."""

from __future__ import annotations

import pytest

from homeswarm.node.config import ConfigError, NodeConfig


def parse(*argv: str) -> NodeConfig:
    return NodeConfig.from_args(list(argv))


def test_contract_flags():
    c = parse("/models/llama", "--blocks", "0:3", "--new-swarm", "--port", "0", "--public-address", "h:1",
              "--dtype", "bfloat16", "--ready-file", "f")  # fmt: skip
    assert c.model_dir == "/models/llama"
    assert c.blocks == "0:3" and c.block_range() == (0, 3)
    assert c.new_swarm is True and c.initial_peers == ()
    assert c.port == 0 and isinstance(c.port, int)
    assert c.public_address == "h:1"
    assert c.dtype == "bfloat16"
    assert c.ready_file == "f"
    assert c.num_blocks is None


def test_defaults():
    c = parse("m", "--new-swarm")
    assert (c.host, c.port, c.dtype, c.blocks, c.num_blocks, c.model_name) == (
        "127.0.0.1",
        0,
        "float32",
        None,
        None,
        None,
    )
    assert c.block_range() is None


def test_initial_peers_and_num_blocks():
    c = parse("m", "--initial-peers", "/ip4/1.2.3.4/tcp/1/p2p/Qa", "/ip4/5.6.7.8/tcp/2/p2p/Qb", "--num-blocks", "4",
              "--model-name", "llama", "--host", "0.0.0.0", "--public-name", "bob")  # fmt: skip
    assert c.initial_peers == ("/ip4/1.2.3.4/tcp/1/p2p/Qa", "/ip4/5.6.7.8/tcp/2/p2p/Qb")
    assert isinstance(c.initial_peers, tuple)
    assert c.num_blocks == 4 and c.model_name == "llama" and c.host == "0.0.0.0" and c.public_name == "bob"


def test_config_is_frozen():
    c = parse("m", "--new-swarm")
    with pytest.raises(AttributeError):
        c.port = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    "argv",
    [
        ["m"],  # neither
        ["m", "--new-swarm", "--initial-peers", "/ip4/1.2.3.4/tcp/1"],  # both
    ],
)
def test_exactly_one_of_new_swarm_or_initial_peers(argv):
    with pytest.raises(ConfigError, match="exactly one of --new-swarm or --initial-peers"):
        parse(*argv)


@pytest.mark.parametrize("blocks", ["3:1", "2:2", "a:b", "-1:2", "1", "1:2:3", "", ":4"])
def test_bad_blocks(blocks):
    with pytest.raises(ConfigError, match="--blocks"):
        parse("m", "--new-swarm", f"--blocks={blocks}")


def test_blocks_and_num_blocks_exclusive():
    with pytest.raises(ConfigError, match="at most one of --blocks"):
        parse("m", "--new-swarm", "--blocks", "0:3", "--num-blocks", "3")


def test_num_blocks_positive():
    with pytest.raises(ConfigError, match="--num-blocks"):
        parse("m", "--new-swarm", "--num-blocks", "0")


@pytest.mark.parametrize("address", ["h", "h:", ":80", "h:0", "h:70000", "h:port", "h:-1", "h o st:80", "h:80\n", "h/x:80"])
def test_bad_public_address(address):
    with pytest.raises(ConfigError, match="--public-address"):
        parse("m", "--new-swarm", f"--public-address={address}")


@pytest.mark.parametrize("flag", ["--port", "--dht-port"])
@pytest.mark.parametrize("port", ["-1", "65536", "70000"])
def test_bad_ports(flag, port):
    with pytest.raises(ConfigError, match="ports"):
        parse("m", "--new-swarm", f"{flag}={port}")


def test_highest_port_accepted():
    assert parse("m", "--new-swarm", "--port", "65535").port == 65535


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--max-batch-size", "0"), ("--max-session-length", "0"), ("--max-cache-tokens", "0"),
     ("--session-idle-timeout", "0"), ("--shutdown-grace", "-1"), ("--announce-ttl", "0")],
)  # fmt: skip
def test_non_positive_limits(flag, value):
    with pytest.raises(ConfigError):
        parse("m", "--new-swarm", f"{flag}={value}")


@pytest.mark.parametrize(
    "argv", [["m", "--new-swarm", "--dtype", "int8"], ["m", "--new-swarm", "--port", "abc"], []]
)
def test_argparse_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse(*argv)
    assert e.value.code == 2
    assert "error" in capsys.readouterr().err


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


@pytest.mark.parametrize("flag", ["--inline-compute-ms", "--batch-wait-ms"])
@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_bad_compute_timings(flag, value):
    with pytest.raises(ConfigError, match=flag):
        parse("m", "--new-swarm", f"{flag}={value}")


def test_inline_compute_ms_default_and_off():
    assert parse("m", "--new-swarm").inline_compute_ms == 5.0
    assert parse("m", "--new-swarm", "--inline-compute-ms", "0").inline_compute_ms == 0.0


def test_quant_flags():
    c = parse("m", "--new-swarm")
    assert c.quant == "none" and c.quant_group_size == 32
    c = parse("m", "--new-swarm", "--quant", "int4", "--quant-group-size", "128")
    assert c.quant == "int4" and c.quant_group_size == 128 and isinstance(c.quant_group_size, int)
    assert parse("m", "--new-swarm", "--quant", "int8").quant == "int8"


@pytest.mark.parametrize("argv", [["--quant", "int3"], ["--quant", "INT8"], ["--quant", ""], ["--quant-group-size", "16"],
                                  ["--quant-group-size", "256"], ["--quant-group-size", "x"]])
def test_bad_quant_flags_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse("m", "--new-swarm", *argv)
    assert e.value.code == 2
    assert "--quant" in capsys.readouterr().err


def test_quant_checked_when_built_in_code():
    with pytest.raises(ConfigError, match="--quant"):
        NodeConfig(model_dir="m", new_swarm=True, quant="fp8").validate()
    with pytest.raises(ConfigError, match="--quant-group-size"):
        NodeConfig(model_dir="m", new_swarm=True, quant="int4", quant_group_size=48).validate()


def test_reachability_modes():
    peers = ["--initial-peers", "/ip4/127.0.0.1/tcp/1/p2p/X"]
    assert NodeConfig.from_args(["m", *peers]).reachability == "auto"
    assert NodeConfig.from_args(["m", *peers, "--reachability", "relayed"]).reachability == "relayed"
    with pytest.raises(ConfigError, match="relayed needs --initial-peers"):
        NodeConfig.from_args(["m", "--new-swarm", "--reachability", "relayed"])
    with pytest.raises(SystemExit):
        NodeConfig.from_args(["m", *peers, "--reachability", "sometimes"])
