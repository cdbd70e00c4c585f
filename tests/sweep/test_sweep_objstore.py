"""Sweeps whose output root is a bucket, against a real S3-compatible server (moto) on 127.0.0.1:
the sweep lands under `<prefix>/<name>/` in the local layout with a table that matches the trials'
summaries; `sweep-status` reads it from the bucket; a second driver is refused by the lease and an
unreachable bucket fails in one line, both before anything is written; a sweep killed mid-way
resumes from the bucket on another machine (staging folder) without running a finished trial
again, and its running trial goes on from the checkpoint it had sent."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_args import fast, spd_ray_cmd
from s3_server import BUCKET, S3Server

PREFIX = "sweeps"
FAST = fast(
    faithfulness_warmup_steps=10,
    train_log_freq=10,
    batch_size=1024,
    slow_eval_on_first_step="false",
)
SPACE = (
    "tms_5-2:\n"
    "  loss_metric_configs.ImportanceMinimalityLoss.coeff: {loguniform: [1.0e-4, 1.0e-1]}\n"
)
OBJECTIVES = ("eval/loss/StochasticReconLoss", "eval/l0/total")  # the default pair
TRIAL_FILES = {"config.yaml", "metrics.jsonl", "summary.json", "workers.json", "checkpoint.pt"}


def _sweep_args(
    tmp_path: Path, name: str, trials: int, steps: int, *extra: str, concurrent: int = 1
) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    return spd_ray_cmd(
        "sweep",
        "tms_5-2",
        "--space",
        str(space),
        "--trials",
        str(trials),
        "--concurrent",
        str(concurrent),
        "--steps",
        str(steps),
        *FAST,
        *extra,
        "--out",
        f"s3://{BUCKET}/{PREFIX}",
        "--name",
        name,
    )


def _keys(s3: S3Server, prefix: str) -> set[str]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :] for page in pages for o in page.get("Contents", [])}


def _object(s3: S3Server, key: str) -> bytes:
    return s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[no-any-return]


def _rows(s3: S3Server, name: str) -> list[dict[str, str]]:
    table = _object(s3, f"{PREFIX}/{name}/results.csv").decode()
    return list(csv.DictReader(io.StringIO(table)))


def _train_steps(metrics: bytes) -> list[int]:
    rows = [json.loads(line) for line in metrics.decode().splitlines() if line.strip()]
    return [r["step"] for r in rows if "train/loss/total" in r]


def _check_rows_match_summaries(s3: S3Server, name: str, rows: list[dict[str, str]]) -> None:
    """Every row is a finished trial whose metrics are its summary's in the bucket, and whose run
    directory in the bucket holds the run contract."""
    for row in rows:
        trial = f"{PREFIX}/{name}/trials/{row['trial_id']}"
        assert row["status"] == "finished"
        assert row["run_dir"] == f"s3://{BUCKET}/{trial}"
        assert _keys(s3, trial + "/") >= TRIAL_FILES, row["trial_id"]
        summary = json.loads(_object(s3, f"{trial}/summary.json"))
        assert int(row["iterations"]) == summary["final_step"]
        metrics = {k[len("metric/") :]: v for k, v in row.items() if k.startswith("metric/")}
        assert set(OBJECTIVES) <= set(metrics)
        for key, value in metrics.items():
            assert float(value) == summary["final_eval"][key], key


def _having(keys: set[str], name: str) -> set[str]:
    """The trials whose run directory in `keys` has a file matching `name`."""
    return {k.split("/")[1] for k in keys if re.fullmatch(rf"trials/\w+/{name}", k)}


def _front(rows: list[dict[str, str]]) -> set[str]:
    points = {r["trial_id"]: tuple(float(r[f"metric/{m}"]) for m in OBJECTIVES) for r in rows}

    def dominated(p: tuple[float, ...]) -> bool:
        return any(
            all(a <= b for a, b in zip(q, p, strict=True)) and q != p for q in points.values()
        )

    return {t for t, p in points.items() if not dominated(p)}


def test_a_sweep_in_a_bucket_lands_there_and_sweep_status_reads_it(
    s3: S3Server,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    staging = tmp_path / "staging"
    # Both trials at once (on the 2 CPUs): they send their run directories side by side.
    args = _sweep_args(tmp_path, "s", 2, 20, "--set", "eval_freq=20", concurrent=2)
    env = s3.driver_env(staging)
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]

    keys = _keys(s3, f"{PREFIX}/s/")
    assert {"sweep.json", "study.db", "results.csv", "results.parquet", "objectives.png"} <= keys
    assert "tune/tuner.pkl" in keys and any(k.startswith("tune/experiment_state-") for k in keys)
    # Tune keeps one marker per trial, no second copy of the run's checkpoints.
    tune_checkpoints = sorted(
        k for k in keys if k.startswith("tune/") and "/checkpoint_" in k and not k.endswith("/")
    )
    assert [k.split("/", 2)[2] for k in tune_checkpoints] == ["checkpoint_000000/trial.json"] * 2
    assert ".lease.json" not in keys  # released at the end
    rows = _rows(s3, "s")
    assert len(rows) == 2 and len({r["trial_id"] for r in rows}) == 2
    _check_rows_match_summaries(s3, "s", rows)
    # The Pareto files are the front of the final table: none left over from a larger front.
    pareto = {k for k in keys if k.startswith("pareto_")}
    assert len(pareto) == len(_front(rows)) >= 1, pareto
    # The toy target the driver trained is in the bucket for trials on other nodes.
    assert any(k.endswith("/target.pt") for k in _keys(s3, f"{PREFIX}/targets/"))

    # A reader elsewhere (its own staging folder) gets the table from the bucket, either way.
    reader = tmp_path / "reader"
    for key, value in s3.driver_env(reader).items():
        monkeypatch.setenv(key, value)
    from spd_ray.cli import main
    from spd_ray.sweep.tune_driver import sweep_status

    capsys.readouterr()
    assert main(["sweep-status", f"s3://{BUCKET}/{PREFIX}/s"]) == 0
    shown = capsys.readouterr().out
    assert f"sweep s: 2/2 trials ended (s3://{BUCKET}/{PREFIX}/s)" in shown
    assert all(r["trial_id"] in shown for r in rows)
    assert sweep_status("s", f"s3://{BUCKET}/{PREFIX}") == shown.rstrip("\n")
    assert not reader.exists()  # read object by object, nothing mirrored


def test_a_second_driver_on_the_sweep_is_refused_by_the_lease(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in s3.env.items():
        monkeypatch.setenv(key, value)
    from spd_ray.lease import RemoteLease

    staging = tmp_path / "staging"
    with RemoteLease(f"s3://{BUCKET}/{PREFIX}/held"):
        t0 = time.monotonic()
        res = subprocess.run(
            _sweep_args(tmp_path, "held", 2, 20),
            env=s3.driver_env(staging),
            capture_output=True,
            text=True,
            timeout=300,
        )
        seconds = time.monotonic() - t0
        assert res.returncode == 2, res.stderr[-3000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr[-3000:]
        assert f"s3://{BUCKET}/{PREFIX}/held is in use by pid {os.getpid()} " in lines[0]
        assert _keys(s3, f"{PREFIX}/held/") == {".lease.json"}  # nothing of a sweep
    assert not (staging / "s3" / BUCKET / PREFIX / "held").exists()
    assert seconds < 60, f"took {seconds:.0f}s (no Ray, no target before the lease)"


def test_an_unreachable_bucket_or_a_missing_sweep_fails_before_anything_is_written(
    s3: S3Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from spd_ray.sweep.tune_driver import run_sweep, sweep_status

    for key, value in s3.driver_env(tmp_path / "staging").items():
        monkeypatch.setenv(key, value)
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    missing = "bucket 'no-such-bucket' does not exist"
    with pytest.raises(ValueError, match=missing):
        run_sweep("tms_5-2", space, name="s", out="s3://no-such-bucket/sweeps", trials=2)
    with pytest.raises(ValueError, match=missing):
        sweep_status("s3://no-such-bucket/sweeps/s")
    with pytest.raises(FileNotFoundError, match=r"no sweep at s3://bucket/x/nothing \(sweep.json"):
        sweep_status("nothing", f"s3://{BUCKET}/x")
    assert not (tmp_path / "staging").exists()
    assert not _keys(s3, "x/")


@pytest.mark.slow
def test_a_sweep_killed_mid_way_resumes_from_the_bucket(s3: S3Server, tmp_path: Path) -> None:
    steps, save, trials = 80, 20, 3
    staging = tmp_path / "staging"
    args = _sweep_args(
        tmp_path, "r", trials, steps, "--set", "eval_freq=20", "--set", f"save_freq={save}"
    )
    proc = subprocess.Popen(
        args,
        env=s3.driver_env(staging),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the driver and the Ray it started go together
    )
    # Kill once a trial has finished and the next one has sent its second checkpoint.
    trial = f"{PREFIX}/r/trials"
    deadline = time.time() + 500
    done: list[dict[str, str]] = []
    running: str | None = None
    while time.time() < deadline and proc.poll() is None and running is None:
        keys = _keys(s3, f"{PREFIX}/r/")
        if "results.csv" in keys:
            done = [r for r in _rows(s3, "r") if r["status"] == "finished"]
        # A sync sends checkpoint.pt before metrics.jsonl, and summary.json last.
        saved = _having(keys, r"checkpoint\.pt") & _having(keys, r"metrics\.jsonl")
        for trial_id in sorted(saved - _having(keys, r"summary\.json")) if done else []:
            sent = _train_steps(_object(s3, f"{trial}/{trial_id}/metrics.jsonl"))
            if sent and sent[-1] >= 2 * save:
                running = trial_id
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert running is not None and 1 <= len(done) < trials
    before = {r["trial_id"]: _object(s3, f"{trial}/{r['trial_id']}/metrics.jsonl") for r in done}
    # The driver's machine is gone: another one, whose staging folder lies elsewhere, resumes.
    shutil.rmtree(staging)
    elsewhere = tmp_path / "elsewhere"
    env = s3.driver_env(elsewhere)
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming sweep r" in res.stdout + res.stderr
    rows = _rows(s3, "r")
    assert len(rows) == trials and len({r["trial_id"] for r in rows}) == trials
    _check_rows_match_summaries(s3, "r", rows)
    for trial_id, metrics in before.items():  # finished trials were not run again
        assert _object(s3, f"{trial}/{trial_id}/metrics.jsonl") == metrics
    # The trial that was running went on from the checkpoint it had sent.
    placed = json.loads(_object(s3, f"{trial}/{running}/workers.json"))
    assert 2 * save <= placed["resumed_from_step"] < steps
    for row in rows:  # each (step, metric) once, across the kill
        metrics = _object(s3, f"{trial}/{row['trial_id']}/metrics.jsonl")
        assert _train_steps(metrics) == list(range(10, steps + 1, 10)), row["trial_id"]
    assert ".lease.json" not in _keys(s3, f"{PREFIX}/r/")

    import optuna

    study_file = tmp_path / "study.db"
    study_file.write_bytes(_object(s3, f"{PREFIX}/r/study.db"))
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{study_file}")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == trials  # each trial told once
