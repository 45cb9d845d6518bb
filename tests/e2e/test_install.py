"""Building the package as `pip install .` and `pip install -e .` do prints no setuptools warnings.

The build runs on a copy of the tracked files in a temporary folder (setuptools writes build/ and
*.egg-info beside the sources), with the venv's setuptools (no build isolation: nothing downloaded),
through the same PEP 517 hooks pip calls. The wheel must carry the demo checkpoints and the kernels'
sources, which the package data declares.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
WARNINGS = ("Warning", "deprecated", "would be ignored", "is absent from the `packages`")
HOOKS = """
import pathlib, sys
from setuptools import build_meta
out = pathlib.Path(sys.argv[1])
built = [build_meta.build_wheel(str(out)), build_meta.build_editable(str(out))]
(out.parent / "built.txt").write_text(" ".join(built))
"""


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    copy = tmp_path_factory.mktemp("src")
    for name in filter(None, tracked.decode().split("\0")):
        if name.startswith(("tests/", "bench/", "docs/", "deploy/")) or not (ROOT / name).is_file():
            continue  # not part of the package (a file deleted in the work tree stays listed until committed)
        target = copy / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    return copy


def test_wheel_and_editable_builds_print_no_setuptools_warnings(source, tmp_path):
    out = tmp_path / "dist"
    out.mkdir()
    result = subprocess.run([sys.executable, "-c", HOOKS, str(out)], cwd=source, capture_output=True, text=True,
                            timeout=100)
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    noisy = [line for line in log.splitlines() if any(word in line for word in WARNINGS)]
    assert not noisy, "\n".join(noisy[:20])
    wheel, editable = (tmp_path / "built.txt").read_text().split()
    names = set(zipfile.ZipFile(out / wheel).namelist())
    for demo in ("demo", "demo_draft"):
        for file in ("config.json", "model.safetensors", "tokenizer.json", "README.md"):
            assert f"homeswarm/model/{demo}/{file}" in names
    assert "homeswarm/model/kernels/ops.cpp" in names and "homeswarm/protocol/node.proto" in names
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    assert "License-Expression: Apache-2.0" in zipfile.ZipFile(out / wheel).read(metadata).decode()
    assert editable.endswith(".whl") and (out / editable).is_file()
