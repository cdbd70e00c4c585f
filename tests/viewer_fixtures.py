"""The viewer's test runs and a live server over them (session-scoped: built once;
`tests/conftest.py` offers the fixtures to every test), and helpers for its tests.

- `viewer_runs["lm"]`: a copy of the tiny Llama run (`lm_run`) with a harvest (Ray) and labels
  plus detection scores for its 12 most active subcomponents from a fake OpenAI-compatible
  endpoint on 127.0.0.1 (label text `detects <key>`), so tests can predict what a page shows.
- `viewer_runs["tms"]`: the short tms_5-2 run (`short_tms`) with no harvest: the missing-analysis
  pages and the toy prompt.
- `viewer_url`: `spd-ray app` on both, started as a user starts it (a subprocess on a free
  loopback port), its printed URL read back.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_args import spd_ray_cmd
from harvest_fixtures import spd_ray_cli
from llm_server import LLMServer, default_answer
from ray_head import RayHead

LABEL_MODEL = "viewer-model"
N_LABELLED = 12


def label_answer(request: dict[str, Any]) -> str:
    """`detects <key>` for a label request; a valid stub for anything else (scores, checks)."""
    text = next(m["content"] for m in request["messages"] if m["role"] == "user")
    key = re.search(r"Subcomponent (\S+):", text)
    if key is None:
        return default_answer(request)
    return json.dumps(
        {"label": f"detects {key.group(1)}", "confidence": "high", "reasoning": "From examples."}
    )


@pytest.fixture(scope="session")
def viewer_runs(
    lm_run: tuple[Path, dict[str, str]],
    short_tms: Path,
    ray_head: RayHead,
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[dict[str, Path], dict[str, str]]:
    """({"lm": run, "tms": run}, environment for CLI calls)."""
    source, env = lm_run
    out = tmp_path_factory.mktemp("viewer") / "out"
    out.mkdir()
    (out / "assets").symlink_to((source.parent / "assets").resolve())
    run = out / "lm"
    shutil.copytree(source, run, ignore=shutil.ignore_patterns("harvest*", "autointerp", "tb"))
    env = {**env, "SPD_RAY_OUT": str(out), "RAY_ADDRESS": ray_head.address, "VIEWER_KEY": "sk-v"}
    res = spd_ray_cli(
        env, "harvest", str(run), "--batches", "4", "--batch-size", "8", "--no-progress"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    with LLMServer(api_key="sk-v", answer=label_answer) as server:
        res = spd_ray_cli(
            env,
            "autointerp",
            str(run),
            "--base-url",
            server.base_url,
            "--model",
            LABEL_MODEL,
            "--api-key-env",
            "VIEWER_KEY",
            "--limit",
            str(N_LABELLED),
            "--actors",
            "1",
            "--score",
            "detection",
            "--no-progress",
        )
    assert res.returncode == 0, res.stderr[-3000:]
    return {"lm": run, "tms": short_tms}, env


def start_app(
    env: dict[str, str], *args: str, timeout: float = 120
) -> tuple[subprocess.Popen[str], str]:
    """`spd-ray app ARGS` in its own process; (process, the URL it printed last)."""
    proc = subprocess.Popen(
        spd_ray_cmd("app", *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("http://"):
            return proc, line.strip()
        if not line and proc.poll() is not None:
            break
    proc.kill()
    raise AssertionError(f"spd-ray app printed no URL: {proc.stderr.read()[-3000:]}")


def stop_app(proc: subprocess.Popen[str]) -> None:
    """Killed outright: the viewer writes nothing, and a graceful stop waits out keep-alives."""
    proc.kill()
    proc.wait(timeout=20)


@pytest.fixture(scope="session")
def viewer_url(viewer_runs: tuple[dict[str, Path], dict[str, str]]) -> Iterator[str]:
    runs, env = viewer_runs
    proc, url = start_app(env, str(runs["lm"]), str(runs["tms"]))
    try:
        yield url.rstrip("/")
    finally:
        stop_app(proc)


def sse_events(text: str) -> list[tuple[str, Any]]:
    """(event name, decoded data) of each server-sent event in a response body."""
    events = []
    for block in text.split("\n\n"):
        name, data = "message", []
        for line in block.splitlines():
            if line.startswith("event:"):
                name = line[len("event:") :].strip()
            elif line.startswith("data:"):
                data.append(line[len("data:") :].strip())
        if data:
            events.append((name, json.loads("\n".join(data))))
    return events
