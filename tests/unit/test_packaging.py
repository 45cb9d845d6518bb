"""Every Python package under the mapped folders is listed in pyproject.toml, so that a normal
(non-editable) install, and the plain copy that the import contracts are checked on, hold all of it."""

from __future__ import annotations

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def test_every_subpackage_is_listed():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(config["packages"])
    found = set()
    for package, folder in config["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in relative:
                found.add(".".join((package, *relative)))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
