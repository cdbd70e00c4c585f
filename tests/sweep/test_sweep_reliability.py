"""Sweep reliability: names that would leave the output root, arguments checked before any file,
`--gpu` without GPUs, the per-sweep lock, sweep.json kept as it is on a plain rerun, and results
files replaced whole while `sweep-status` reads them."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path

import pytest
from cli_args import spd_ray_cmd
from harvest_fixtures import hold_lock, spd_ray_main
from ray_head import RayHead

from spd_ray.config import ConfigError
from spd_ray.io import Lock
from spd_ray.registry import load_experiment
from spd_ray.sweep.results import TrialRow, make_row, write_best_configs
from spd_ray.sweep.tune_driver import (
    LOCK_FILE,
    SPEC_FILE,
    SweepSpec,
    _save_spec,
    run_sweep,
    sweep_status,
    write_results,
)

COEFF = "loss_metric_configs.ImportanceMinimalityLoss.coeff"
SPACE = f"tms_5-2:\n  {COEFF}: {{loguniform: [1.0e-4, 1.0e-1]}}\n"
TWO = [("eval/loss/StochasticReconLoss", "min"), ("eval/l0/total", "min")]


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(spd_ray_cmd(*args), capture_output=True, text=True, env=env, timeout=300)


def _main(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    *args: str,
) -> subprocess.CompletedProcess[str]:
    """`_cli` in this process, for commands that fail before any Ray: `connect_ray` fails the
    test, and `RAY_ADDRESS=local` keeps a recorded cluster from being attached to first."""

    def no_ray() -> None:
        raise AssertionError(f"spd-ray {' '.join(args)} reached Ray")

    monkeypatch.setattr("spd_ray.ray_session.connect_ray", no_ray)
    return spd_ray_main(capsys, monkeypatch, {**env, "RAY_ADDRESS": "local"}, *args)


def _env(out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return {**env, "SPD_RAY_OUT": str(out), "SPD_RAY_THREADS": "1", **extra}


def _snapshot(top: Path) -> dict[str, bytes | None]:
    """Every path under `top` with its bytes (None for folders)."""
    return {
        str(p.relative_to(top)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(top.rglob("*"))
    }


@pytest.fixture
def space(tmp_path: Path) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(SPACE)
    return path


def _spec(**changes: object) -> SweepSpec:
    experiment, base = load_experiment("tms_5-2")
    spec = SweepSpec(
        experiment=experiment,
        target="tms_5-2",
        space_file="space.yaml",
        space={COEFF: "LogUniform(0.0001, 0.1)"},
        overrides=[],
        objectives=[list(o) for o in TWO],  # type: ignore[misc]
        trials=40,
        concurrent=0,
        workers_per_trial=1,
        gpu=False,
        scheduler="none",
        seed=0,
        base_config=base.model_dump(mode="json"),
    )
    return replace(spec, **changes)  # type: ignore[arg-type]


def _rows(n: int, shift: float = 0.0) -> list[TrialRow]:
    """n trials on the front x + y = n (all non-dominated), with long params for a big table."""
    return [
        make_row(
            f"trial{i:03d}",
            "finished",
            {COEFF: 1e-3 * (i + 1), "wandb_run_name_prefix": "x" * 200},
            {TWO[0][0]: float(i) + shift, TWO[1][0]: float(n - i)},
            100,
            f"/runs/trial{i:03d}",
        )
        for i in range(n)
    ]


# ---------------------------------------------------------------------------------------------
# Names and arguments: rejected before anything is created or deleted
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["..", "/", ".", "a/b"])
def test_bad_sweep_names_fail_and_delete_nothing(tmp_path: Path, space: Path, name: str) -> None:
    out = tmp_path / "root" / "out"
    for keep in ["root/keep.txt", "root/out/keep.txt", "root/out/a/b/keep.txt", "keep.txt"]:
        (tmp_path / keep).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / keep).write_text(f"{keep} stays\n")
    before = _snapshot(tmp_path)
    with pytest.raises(ValueError, match="--name") as err:
        run_sweep("tms_5-2", space, name=name, out=out, trials=2, steps=10)
    assert repr(name) in str(err.value)
    with pytest.raises(ValueError, match="name"):
        sweep_status(name, out)
    assert _snapshot(tmp_path) == before


def test_bad_name_on_the_cli_is_one_line_with_exit_2(
    tmp_path: Path, space: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    (out / "keep.txt").parent.mkdir(parents=True)
    (out / "keep.txt").write_text("stays\n")
    before = _snapshot(tmp_path)
    res = _main(
        capsys, monkeypatch, _env(out), "sweep", "tms_5-2", "--space", str(space), "--name", ".."
    )
    assert res.returncode == 2, res.stderr[-2000:]
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--name '..'" in lines[0], res.stderr
    res = _main(capsys, monkeypatch, _env(out), "sweep-status", "a/b")
    assert res.returncode == 2 and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert _snapshot(tmp_path) == before


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"concurrent": 0}, "--concurrent"),
        ({"concurrent": -1}, "--concurrent"),
        ({"trials": 0}, "--trials"),
        ({"workers_per_trial": 0}, "--workers-per-trial"),
        ({"steps": 0}, "--steps"),
        ({"scheduler": "hyperband"}, "--scheduler"),
        ({"objectives": [("eval/l0/total", "down")]}, "--objective"),
        ({"objectives": [("eval/l0/total", "min")] * 2}, "--objective"),
        ({"scheduler": "asha", "objectives": TWO}, "--scheduler asha"),
    ],
)
def test_bad_arguments_fail_before_sweep_json(
    tmp_path: Path, space: Path, kwargs: dict[str, object], flag: str
) -> None:
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=flag):
        run_sweep("tms_5-2", space, name="s", out=out, **kwargs)  # type: ignore[arg-type]
    assert not (out / "s").exists()


def test_negative_concurrent_on_the_cli_writes_no_sweep_json(
    tmp_path: Path, space: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    args = ["sweep", "tms_5-2", "--space", str(space), "--concurrent"]
    for value in ("-1", "0"):
        res = _main(capsys, monkeypatch, _env(out), *args, value)  # argparse
        assert res.returncode == 2 and "--concurrent" in res.stderr, res.stderr[-2000:]
    assert not out.exists() or not list(out.rglob(SPEC_FILE))


def test_gpu_on_a_cluster_without_gpus_fails_at_once(
    ray_head: RayHead, tmp_path: Path, space: Path
) -> None:
    out = tmp_path / "out"
    env = {**_env(out), **ray_head.env(), "SPD_RAY_OUT": str(out)}
    t0 = time.monotonic()
    res = _cli(env, "sweep", "tms_5-2", "--space", str(space), "--gpu", "--name", "g")
    seconds = time.monotonic() - t0
    assert res.returncode == 2, res.stderr[-3000:]
    last = res.stderr.strip().splitlines()[-1]
    assert "--gpu" in last and "needs 1 GPU(s)" in last and "has 0" in last, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    assert not (out / "g").exists()  # no sweep.json, no lock, no target trained
    assert not out.exists() or not any(out.iterdir())
    assert seconds < 90, f"took {seconds:.0f}s"


# ---------------------------------------------------------------------------------------------
# The lock
# ---------------------------------------------------------------------------------------------

HOLD = 'from spd_ray.io import Lock; Lock(Path(sys.argv[1]), "sweep held").acquire()'


def test_second_sweep_on_a_locked_name_exits_naming_the_holder(
    tmp_path: Path, space: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    sweep_dir = out / "held"
    sweep_dir.mkdir(parents=True)
    # A stored spec that this command contradicts (another seed): only a command that got past
    # the lock can report it, so the error says which of the two it reached.
    _save_spec(sweep_dir / SPEC_FILE, _spec(seed=7))
    holder = hold_lock(HOLD, str(sweep_dir / LOCK_FILE))
    try:
        args = ["sweep", "tms_5-2", "--space", str(space), "--name", "held", "--steps", "10"]
        t0 = time.monotonic()
        res = _main(capsys, monkeypatch, _env(out), *args)
        seconds = time.monotonic() - t0
        assert res.returncode == 2, res.stderr[-3000:]
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1, res.stderr
        assert "sweep held is in use by" in lines[0] and f"pid {holder.pid} " in lines[0]
        assert seconds < 60, f"took {seconds:.0f}s"
    finally:
        holder.kill()  # SIGKILL: the holder never releases the lock itself
        holder.wait()
    assert holder.returncode == -9

    res = _main(capsys, monkeypatch, _env(out), *args)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "in use by" not in res.stderr
    assert "is a sweep with a different" in res.stderr, res.stderr[-3000:]
    with Lock(sweep_dir / LOCK_FILE, "sweep held") as lock:
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


# ---------------------------------------------------------------------------------------------
# Durable files
# ---------------------------------------------------------------------------------------------


def test_sweep_json_is_written_only_when_new_or_changed(tmp_path: Path) -> None:
    path = tmp_path / SPEC_FILE
    assert _save_spec(path, _spec()) is True
    first = path.stat()
    time.sleep(0.01)
    assert _save_spec(path, _spec()) is False  # a plain rerun
    again = path.stat()
    assert (again.st_ino, again.st_mtime_ns) == (first.st_ino, first.st_mtime_ns)
    assert _save_spec(path, _spec(concurrent=2)) is True  # may change between runs
    assert json.loads(path.read_text())["concurrent"] == 2
    text = path.read_text()
    with pytest.raises(ConfigError, match="different seed"):
        _save_spec(path, _spec(concurrent=2, seed=1))
    assert path.read_text() == text
    assert [p.name for p in tmp_path.iterdir()] == [SPEC_FILE]  # no temp files left


def test_status_never_reads_a_partial_table_while_results_are_rewritten(tmp_path: Path) -> None:
    sweep_dir = tmp_path / "out" / "s"
    sweep_dir.mkdir(parents=True)
    spec = _spec()
    (sweep_dir / SPEC_FILE).write_text(json.dumps(asdict(spec)))
    small, big = _rows(3), _rows(40)
    write_results(sweep_dir, small, spec)
    stop = threading.Event()
    writes = [0]

    def writer() -> None:
        from spd_ray.sweep.results import write_table

        while not stop.is_set():
            write_table(big if writes[0] % 2 else small, sweep_dir / "results.csv")
            writes[0] += 1

    thread = threading.Thread(target=writer)
    thread.start()
    seen: list[int] = []
    try:
        t0 = time.monotonic()
        while time.monotonic() - t0 < 3.0:
            head = sweep_status("s", tmp_path / "out").splitlines()[0]
            seen.append(int(head.split(": ")[1].split("/")[0]))
    finally:
        stop.set()
        thread.join()
    assert writes[0] >= 20 and len(seen) >= 20, (writes[0], len(seen))
    assert set(seen) == {3, 40}, sorted(set(seen))  # both versions seen, never a partial one
    assert not list(sweep_dir.glob(".*.tmp"))


def test_best_configs_are_replaced_and_stale_pareto_files_removed_after(tmp_path: Path) -> None:
    spec = _spec()
    sweep_dir = tmp_path / "s"
    sweep_dir.mkdir()
    write_results(sweep_dir, _rows(4), spec)
    assert sorted(p.name for p in sweep_dir.glob("pareto_*.yaml")) == [
        f"pareto_{i}.yaml" for i in range(4)
    ]
    png = (sweep_dir / "objectives.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 1000
    assert (sweep_dir / "results.parquet").stat().st_size > 0

    # No trial has the objectives: it fails before touching the files it would replace.
    before = _snapshot(sweep_dir)
    bad = [make_row("t", "error", {COEFF: 1e-3}, {})]
    base = load_experiment("tms_5-2")[1]
    with pytest.raises(ValueError, match="no trial reported"):
        write_best_configs(bad, spec.objective_list(), base, sweep_dir)
    assert _snapshot(sweep_dir) == before

    # A smaller front: the new files replace the old ones, the stale ones go.
    rows = _rows(4)
    rows[0]["metrics"] = {TWO[0][0]: -1.0, TWO[1][0]: -1.0}  # dominates the rest
    write_results(sweep_dir, rows, spec)
    assert [p.name for p in sweep_dir.glob("pareto_*.yaml")] == ["pareto_0.yaml"]
    assert "Pareto trial 1/1 trial000" in (sweep_dir / "pareto_0.yaml").read_text()
    assert not list(sweep_dir.glob(".*.tmp"))
