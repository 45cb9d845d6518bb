"""join-swarm --adapters on the command line: names (the folders' names) checked before anything loads."""

from __future__ import annotations

import pytest

from homeswarm.node.config import ConfigError, NodeConfig


def parse(*adapters: str) -> NodeConfig:
    return NodeConfig.from_args(["model", "--new-swarm", "--adapters", *adapters])


def test_adapter_folders_are_read_with_their_names():
    assert parse("a/style", "b/chat-v2/").adapters == ("a/style", "b/chat-v2/")
    assert NodeConfig.from_args(["model", "--new-swarm"]).adapters == ()


@pytest.mark.parametrize("folders, message", [
    (("a/style", "b/style"), "--adapters: two folders have the same name (style, style); names must differ"),
    (("a/my adapter",), "an adapter's name is its folder's name, which must be 1-64 letters, digits, '.', '_' or "
                        "'-' (starting with a letter or digit), got 'my adapter'"),
    (("a/.hidden",), "got '.hidden'"),
])
def test_bad_adapter_names_are_refused(folders, message):
    with pytest.raises(ConfigError) as caught:
        parse(*folders)
    assert message in str(caught.value)
