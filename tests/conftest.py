"""Test-session settings (Ray on loopback, without auth or usage stats; Hugging Face offline) and
the one Ray cluster that every Ray test of the session shares."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from ray_head import RAY_TEST_ENV, RayHead, start_head, stop_head  # noqa: E402

for _key, _value in RAY_TEST_ENV.items():
    os.environ.setdefault(_key, _value)
os.environ.pop("RAY_ADDRESS", None)  # tests choose their cluster explicitly


@pytest.fixture(scope="session")
def ray_head() -> Iterator[RayHead]:
    """A `ray start --head` cluster on 127.0.0.1 (2 CPUs, dashboard for job submission), started
    once per test session and stopped by process id at the end."""
    venv_bin = str(Path(sys.executable).parent)
    os.environ["PATH"] = venv_bin + os.pathsep + os.environ.get("PATH", "")
    head = start_head(num_cpus=2)
    try:
        yield head
    finally:
        stop_head(head)


@pytest.fixture(scope="session")
def shared_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output root shared by the session's Ray tests, so each toy target trains once."""
    return tmp_path_factory.mktemp("out")


# Language-model fixtures (tiny-LM assets built once per session): see lm_conftest_fixtures.py.
from harvest_fixtures import lm_run  # noqa: E402, F401
from lm_conftest_fixtures import hf_datasets_cache, tiny_lm_assets  # noqa: E402, F401
