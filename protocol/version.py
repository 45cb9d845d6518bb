"""The wire protocol's version and the compatibility rule between peers.

Every request carries `protocol_version`; a node answers a version it does not speak with
FAILED_PRECONDITION and the message from `check_protocol_version`.

Invariants:
- Bump `PROTOCOL_VERSION` on any change that an older peer would misread (a renumbered field, a
  changed meaning); adding an optional field that old peers can ignore needs no bump.
- 0 is never a valid version: it is what proto3 reads when the field is missing, i.e. a peer
  that predates versioning or forgot to set it.
- Versions must match exactly for now; a range of accepted versions comes with the first bump.
"""

from __future__ import annotations

PROTOCOL_VERSION: int = 1


def check_protocol_version(version: int) -> str | None:
    """Return why a peer speaking `version` cannot be served, or None if it can."""
    if version == PROTOCOL_VERSION:
        return None
    if version == 0:
        return (
            f"request has no protocol_version (read as 0); this peer speaks protocol version "
            f"{PROTOCOL_VERSION}"
        )
    return (
        f"protocol version {version} is not supported; this peer speaks protocol version "
        f"{PROTOCOL_VERSION}"
    )
