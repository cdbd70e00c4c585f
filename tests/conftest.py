"""Test-session settings (Ray on loopback, without auth or usage stats; Hugging Face offline) and
the one Ray cluster that every Ray test of the session shares."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from ray_head import RAY_TEST_ENV, RayHead, start_head, stop_head
from s3_server import BUCKET, S3Server, s3_server

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


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """A moto S3 server on loopback with the bucket `BUCKET`, for one test module."""
    with s3_server((BUCKET,)) as server:
        yield server


@pytest.fixture(scope="session")
def shared_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An output root shared by the session's Ray tests, so each toy target trains once."""
    return tmp_path_factory.mktemp("out")


# Session fixtures kept in their own modules, offered to every test from here: the tiny-LM assets
# (lm_conftest_fixtures.py), a decomposed tiny Llama run (harvest_fixtures.py) and the viewer's
# runs and server (viewer_fixtures.py). Plain helpers (ray_head, multinode, s3_server, llm_server,
# the fixture modules' functions) are imported by name: tests/ is on sys.path (pyproject's pytest
# `pythonpath`).
from harvest_fixtures import lm_run  # noqa: E402, F401
from lm_conftest_fixtures import hf_datasets_cache, tiny_lm_assets  # noqa: E402, F401
from viewer_fixtures import viewer_runs, viewer_url  # noqa: E402, F401


@pytest.fixture(scope="session")
def short_tms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 100-step tms_5-2 decomposition (in-process) that analyses read: a checkpoint, not a good
    one. Tests write only their own files beside it (clustering/<name>, comparison.json,
    figures/component-activations)."""
    from harvest_fixtures import short_tms_run

    return short_tms_run(tmp_path_factory.mktemp("short-tms"), steps=100)
