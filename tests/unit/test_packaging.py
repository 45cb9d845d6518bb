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


def test_the_console_scripts_set_openmp_spinning_before_torch_loads():
    import subprocess
    import sys

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"join-swarm": "homeswarm.launch:join_swarm", "homeswarm": "homeswarm.launch:homeswarm"}
    # the launcher imports no torch before it sets the variable (libgomp reads it once, at load)
    code = "import sys, homeswarm.launch; assert 'torch' not in sys.modules, 'torch loaded'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_configure_openmp_keeps_what_the_user_set():
    from homeswarm.launch import SPIN_COUNT, configure_openmp

    env: dict[str, str] = {}
    configure_openmp(env)
    assert env == {"GOMP_SPINCOUNT": SPIN_COUNT}
    for own in ({"GOMP_SPINCOUNT": "300000"}, {"OMP_WAIT_POLICY": "ACTIVE"}):
        env = dict(own)
        configure_openmp(env)
        assert env == own
