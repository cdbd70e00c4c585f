"""`spd-ray sweep` end to end on the session's shared Ray cluster: TPE with ASHA, a reference-format
grid with 2-worker trials, a two-objective Pareto front, and resume after the driver is killed."""

from __future__ import annotations

import csv
import json
import math
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_args import fast, spd_ray_cmd
from ray_head import RayHead

FAST = fast(train_log_freq=20, batch_size=1024)


def _env(head: RayHead, out: Path) -> dict[str, str]:
    return {**head.env(), "SPD_RAY_OUT": str(out), "SPD_RAY_THREADS": "1"}


def _sweep(head: RayHead, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        spd_ray_cmd("sweep", *args),
        capture_output=True,
        text=True,
        env=_env(head, out),
        timeout=900,
    )


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _space(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(text)
    return path


@pytest.mark.slow  # CI time: see the CI note in CONTRIBUTING.md
def test_tpe_with_asha_finds_a_best_config_that_reruns(
    ray_head: RayHead, shared_out: Path, tmp_path: Path
) -> None:
    space = _space(
        tmp_path,
        "tms_5-2:\n"
        "  loss_metric_configs.ImportanceMinimalityLoss.coeff: {loguniform: [1.0e-4, 1.0e-1]}\n"
        "  lr_schedule.start_val: {loguniform: [3.0e-4, 3.0e-2]}\n",
    )
    objective = "eval/loss/StochasticReconLoss"
    # One trial at a time: the rung decisions then depend only on the (seeded) trials' metrics.
    args = ["tms_5-2", "--space", str(space), "--trials", "8", "--concurrent", "1"]
    args += ["--steps", "200", *FAST]
    args += ["--set", "eval_freq=50", "--objective", f"{objective}:min", "--scheduler", "asha"]
    res = _sweep(ray_head, shared_out, *args, "--name", "tpe")
    assert res.returncode == 0, res.stderr[-3000:]
    sweep_dir = shared_out / "tpe"
    assert Path(res.stdout.strip().splitlines()[-1]) == sweep_dir
    rows = _rows(sweep_dir)
    assert len(rows) == 8
    statuses = [r["status"] for r in rows]
    assert "finished" in statuses
    # ASHA stopped the weak ones at a rung (50 or 100 steps of 200).
    stopped = [r for r in rows if r["status"] == "stopped early"]
    assert stopped and all(int(r["iterations"]) < 200 for r in stopped)
    assert (sweep_dir / "objectives.png").stat().st_size > 1000

    import optuna

    study = optuna.load_study(study_name="tpe", storage=f"sqlite:///{sweep_dir / 'study.db'}")
    assert len(study.trials) == 8

    # The best YAML is a runnable config; running it reproduces the best trial's metric.
    finished = [r for r in rows if r["status"] == "finished"]
    best = min(finished, key=lambda r: float(r[f"metric/{objective}"]))
    rerun = subprocess.run(
        spd_ray_cmd("run", str(sweep_dir / "best.yaml"), "--in-process", "--name", "best-rerun"),
        capture_output=True,
        text=True,
        env=_env(ray_head, shared_out),
        timeout=600,
    )
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = json.loads((shared_out / "best-rerun" / "summary.json").read_text())
    assert summary["final_eval"][objective] == pytest.approx(
        float(best[f"metric/{objective}"]), rel=1e-6
    )


@pytest.mark.slow  # CI time: see the CI note in CONTRIBUTING.md
def test_reference_grid_runs_the_cartesian_product_on_two_worker_trials(
    ray_head: RayHead, shared_out: Path, tmp_path: Path
) -> None:
    """2 trials x 2 workers on a 2-CPU cluster: fractional CPUs, no deadlock."""
    space = _space(
        tmp_path,
        "global:\n"
        "  seed: {values: [0, 1]}\n"
        "  loss_metric_configs:\n"
        "    - classname: ImportanceMinimalityLoss\n"
        "      coeff: {values: [1.0e-3, 3.0e-3]}\n",
    )
    args = ["tms_5-2", "--space", str(space), "--steps", "40", *FAST, "--set", "eval_freq=20"]
    args += ["--workers-per-trial", "2", "--concurrent", "2", "--name", "grid"]
    res = _sweep(ray_head, shared_out, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    rows = _rows(shared_out / "grid")
    combos = {
        (int(r["param/seed"]), float(r["param/loss_metric_configs.ImportanceMinimalityLoss.coeff"]))
        for r in rows
    }
    assert len(rows) == 4 and combos == {(0, 1e-3), (0, 3e-3), (1, 1e-3), (1, 3e-3)}
    for r in rows:
        assert r["status"] == "finished"
        assert json.loads((Path(r["run_dir"]) / "summary.json").read_text())["workers"] == 2


@pytest.mark.slow
def test_two_objective_sweep_resumes_after_kill_and_returns_a_pareto_front(
    ray_head: RayHead, shared_out: Path, tmp_path: Path
) -> None:
    space = _space(
        tmp_path,
        "tms_5-2:\n"
        "  loss_metric_configs.ImportanceMinimalityLoss.coeff: {loguniform: [1.0e-4, 1.0e-1]}\n",
    )
    args = ["tms_5-2", "--space", str(space), "--trials", "5", "--concurrent", "1"]
    args += ["--steps", "150", *FAST, "--set", "eval_freq=50", "--name", "pareto"]
    sweep_dir = shared_out / "pareto"
    proc = subprocess.Popen(
        spd_ray_cmd("sweep", *args),
        env=_env(ray_head, shared_out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    done: list[dict[str, str]] = []
    while time.time() < deadline and proc.poll() is None:
        if (sweep_dir / "results.csv").exists():
            done = [r for r in _rows(sweep_dir) if r["status"] == "finished"]
            if len(done) >= 2:
                break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 <= len(done) < 5
    before = {r["trial_id"]: (Path(r["run_dir"]) / "metrics.jsonl").read_bytes() for r in done}

    res = _sweep(ray_head, shared_out, *args)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming sweep pareto" in res.stdout + res.stderr
    rows = _rows(sweep_dir)
    assert len(rows) == 5 and all(r["status"] == "finished" for r in rows)
    for trial_id, metrics in before.items():  # finished trials were not run again
        row = next(r for r in rows if r["trial_id"] == trial_id)
        assert (Path(row["run_dir"]) / "metrics.jsonl").read_bytes() == metrics

    # The Pareto files are exactly the non-dominated trials.
    keys = ("metric/eval/loss/StochasticReconLoss", "metric/eval/l0/total")
    points = {r["trial_id"]: tuple(float(r[k]) for k in keys) for r in rows}
    assert all(math.isfinite(v) for p in points.values() for v in p)

    def dominated(p: tuple[float, ...]) -> bool:
        return any(
            all(a <= b for a, b in zip(q, p, strict=True)) and q != p for q in points.values()
        )

    front = {t for t, p in points.items() if not dominated(p)}
    pareto_files = sorted(sweep_dir.glob("pareto_*.yaml"))
    assert len(pareto_files) == len(front) >= 1
    status = subprocess.run(
        spd_ray_cmd("sweep-status", "pareto"), capture_output=True, text=True,
        env=_env(ray_head, shared_out), timeout=120,
    )  # fmt: skip
    assert status.returncode == 0 and all(t in status.stdout for t in points)
