"""The ``--ready-file`` of the daemons (interface contract): one JSON object, written atomically.

Readers (scripts, tests) poll for the file; since it appears with ``os.replace``, they see either
nothing or the whole object, never a partial write.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_ready_file(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload))
    os.replace(tmp, target)


def certificate_path(ready_file: str | os.PathLike[str]) -> Path:
    """Where a TLS node writes its announced certificate (PEM) beside its ready file: ``PATH.pem``."""
    return Path(f"{os.fspath(ready_file)}.pem")


def write_certificate(ready_file: str | os.PathLike[str], cert_pem: str) -> None:
    """Write the certificate beside the ready file, atomically; call before ``write_ready_file``."""
    target = certificate_path(ready_file)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    tmp.write_text(cert_pem)
    os.replace(tmp, target)


def read_ready_file(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The object, or None while the file does not exist yet."""
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        return None
