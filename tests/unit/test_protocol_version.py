"""Protocol version compatibility rule."""

from __future__ import annotations

from homeswarm.protocol import PROTOCOL_VERSION, check_protocol_version


def test_current_version_is_one_and_accepted() -> None:
    assert PROTOCOL_VERSION == 1
    assert check_protocol_version(PROTOCOL_VERSION) is None


def test_missing_version_is_rejected() -> None:
    message = check_protocol_version(0)
    assert message is not None
    assert "0" in message and str(PROTOCOL_VERSION) in message


def test_other_versions_are_rejected_naming_both() -> None:
    for other in (2, 7, 2**32 - 1):
        message = check_protocol_version(other)
        assert message is not None
        assert str(other) in message and f"version {PROTOCOL_VERSION}" in message
