"""Runs whose output root is a bucket, against a real S3-compatible server (moto) on 127.0.0.1:
the whole run directory lands in the bucket; a run killed after a checkpoint, its local staging
folder deleted, resumes from the bucket and ends as an uninterrupted run; `load_run`,
`harvest` and `harvest-show` work on the run's URI; a bucket that cannot be reached fails
before any work with one line."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_args import fast, spd_ray_cmd
from s3_server import BUCKET, S3Server

STEPS, SAVE = 600, 100
ARGS = [
    "tms_5-2",
    "--steps",
    str(STEPS),
    *fast(
        faithfulness_warmup_steps=None,
        save_freq=SAVE,
        eval_freq=300,
        slow_eval_freq=STEPS,
        train_log_freq=50,
    ),
]


def _keys(s3: S3Server, prefix: str) -> set[str]:
    listed = s3.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix) :] for o in listed}


def _object(s3: S3Server, key: str) -> bytes:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[no-any-return]


def _same(a: dict[str, float], b: dict[str, float], rtol: float) -> None:
    keys = [k for k in a if k not in ("train/steps_per_s", "train/lr")]
    assert keys and set(keys) <= set(b)
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-9), key


def _steps_in(metrics: bytes) -> list[int]:
    rows = [json.loads(line) for line in metrics.decode().splitlines() if line.strip()]
    return [r["step"] for r in rows if "train/loss/total" in r]


@pytest.mark.slow
def test_a_run_in_a_bucket_resumes_from_the_bucket(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = subprocess.run(
        spd_ray_cmd(
            "run", *ARGS, "--name", "ref", "--in-process", "--out", str(tmp_path / "local")
        ),
        env={**os.environ, "SPD_RAY_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert ref.returncode == 0, ref.stderr[-3000:]
    reference = json.loads((tmp_path / "local" / "ref" / "summary.json").read_text())

    staging = tmp_path / "staging"
    args = spd_ray_cmd("run", *ARGS, "--out", f"s3://{BUCKET}/runs", "--name", "r")
    proc = subprocess.Popen(
        args,
        env=s3.driver_env(staging),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the driver and the Ray it started go together
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        keys = _keys(s3, "runs/r/")
        if "checkpoint.pt" in keys and "metrics.jsonl" in keys:
            done = _steps_in(_object(s3, "runs/r/metrics.jsonl"))
            if done and done[-1] >= SAVE:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    sent = _steps_in(_object(s3, "runs/r/metrics.jsonl"))
    assert SAVE <= sent[-1] < STEPS, sent
    shutil.rmtree(staging)  # the node's disk is gone: only the bucket has the run

    env = s3.driver_env(staging)
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = re.search(r"resumed r from step (\d+)", res.stderr)
    assert resumed and SAVE <= int(resumed.group(1)) < STEPS, res.stderr[-3000:]
    keys = _keys(s3, "runs/r/")
    assert {"config.yaml", "checkpoint.pt", "metrics.jsonl", "summary.json", "workers.json"} <= keys
    assert any(k.startswith("ray/checkpoint_") for k in keys), "Ray Train's storage is the bucket"
    assert any(k.startswith("tb/events.out.tfevents") for k in keys)
    summary = json.loads(_object(s3, "runs/r/summary.json"))
    assert summary["final_step"] == STEPS
    _same(reference["final_eval"], summary["final_eval"], rtol=1e-6)
    steps = _steps_in(_object(s3, "runs/r/metrics.jsonl"))
    assert steps == list(range(50, STEPS + 1, 50)), "metrics lost or duplicated across the kill"

    # A reader on another machine (a fresh staging folder) loads the run from its URI.
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("SPD_RAY_STAGING", str(tmp_path / "reader"))
    from spd_ray.api import load_run

    loaded = load_run(f"s3://{BUCKET}/runs/r")
    assert loaded.step == STEPS
    assert loaded.run_dir == tmp_path / "reader" / "s3" / BUCKET / "runs" / "r"
    _harvest_and_show(s3, tmp_path)


def _harvest_and_show(s3: S3Server, tmp_path: Path) -> None:
    """`harvest` of the run's URI puts the harvest into the bucket; `harvest-show` of the URI
    reads it back on a machine that never saw it."""
    uri = f"s3://{BUCKET}/runs/r"
    env = s3.driver_env(tmp_path / "harvester")
    res = subprocess.run(
        spd_ray_cmd(
            "harvest", uri, "--batches", "4", "--batch-size", "64", "--actors", "1", "--no-progress"
        ),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    harvested = {k for k in _keys(s3, "runs/r/") if k.startswith("harvest/")}
    assert "harvest/meta.json" in harvested, sorted(harvested)
    show = subprocess.run(
        spd_ray_cmd("harvest-show", uri, "linear1:0"),
        env=s3.driver_env(tmp_path / "viewer"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert show.returncode == 0, show.stderr[-3000:]
    assert "linear1" in show.stdout, show.stdout[-2000:]


@pytest.mark.parametrize(
    ("where", "expect"),
    [
        ("s3://no-such-bucket/runs", "no-such-bucket"),
        ("closed-port", "AWS_ENDPOINT_URL"),
    ],
)
def test_a_bucket_that_cannot_be_reached_fails_before_any_work(
    s3: S3Server, tmp_path: Path, where: str, expect: str
) -> None:
    extra: dict[str, Any] = {}
    out = where
    if where == "closed-port":
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        extra["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{port}"
        out = f"s3://{BUCKET}/runs"
    t0 = time.monotonic()
    res = subprocess.run(
        spd_ray_cmd("run", *ARGS, "--out", out, "--name", "never"),
        env=s3.driver_env(tmp_path / "staging", **extra),
        capture_output=True,
        text=True,
        timeout=120,
    )
    wall = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith("spd-ray run: error: ")]
    assert len(errors) == 1 and expect in errors[0], res.stderr[-3000:]
    assert s3.env["AWS_SECRET_ACCESS_KEY"] not in res.stderr
    assert not (tmp_path / "staging").exists()
    assert wall < 30, f"the refusal took {wall:.0f} s"


@pytest.mark.slow
def test_several_runs_in_one_command_land_in_the_bucket(s3: S3Server, tmp_path: Path) -> None:
    short = ["--steps", "20", "--set", "autocast_bf16=false", "--set", "n_eval_steps=2"]
    res = subprocess.run(
        spd_ray_cmd(
            "run", "tms_5-2,resid_mlp1", *short, "--out", f"s3://{BUCKET}/many", "--name", "m"
        ),
        env=s3.driver_env(tmp_path / "staging"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    for experiment in ("tms_5-2", "resid_mlp1"):
        summary = json.loads(_object(s3, f"many/m-{experiment}/summary.json"))
        assert summary["final_step"] == 20
        local = tmp_path / "staging" / "s3" / BUCKET / "many" / f"m-{experiment}"
        assert json.loads((local / "summary.json").read_text()) == summary
