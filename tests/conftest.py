"""Settings every test shares: daemons started by the tests keep their caches (the throughput
self-test's results) in a folder of this test run, never in the user's home; everything the run puts
in the temporary folder goes into one scratch folder of its own, removed at the end (a killed run's is
removed by the next run); daemons started in a session of their own die with the test process
(tests/helpers/scratch.py)."""

from __future__ import annotations

import os

import pytest

from tests.helpers.scratch import arm_popen, scratch_folder


@pytest.fixture(scope="session", autouse=True)
def _scratch(tmp_path_factory: pytest.TempPathFactory):
    tmp_path_factory.getbasetemp()  # pytest's own folder first, where it keeps the last runs' for inspection
    with scratch_folder() as folder, arm_popen():
        yield folder


@pytest.fixture(scope="session", autouse=True)
def _private_cache_home(tmp_path_factory: pytest.TempPathFactory):
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache-home"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old
