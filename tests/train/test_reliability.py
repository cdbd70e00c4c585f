"""Faults a run must survive (README: Reliability): kills at any moment, torn files, unreadable or
crafted checkpoints, a second command on the same run, a full disk, a crash between the final
checkpoint and the summary, bad names and arguments. Each ends with the same final metrics as an
uninterrupted run, every (step, metric) once, or a one-line message that deleted nothing."""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from harvest_fixtures import hold_lock, spd_ray_main

import spd_ray
from spd_ray import runs as rundir_module
from spd_ray.config import load_config
from spd_ray.io import Lock
from spd_ray.runs import CheckpointError, RunDir

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_resid_mlp.yaml"
# 200 steps, a checkpoint every 20, figures only at the end: long enough to be killed mid-way.
LONG = ["--set", "steps=200", "--set", "save_freq=20", "--set", "eval_freq=50"]
LONG += ["--set", "slow_eval_freq=200"]


def _env(out: Path) -> dict[str, str]:
    return {**os.environ, "SPD_RAY_OUT": str(out), "SPD_RAY_THREADS": "1"}


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "spd_ray.cli", *args]


def _cli(*args: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(_argv(*args), capture_output=True, text=True, env=_env(out), timeout=600)


def _main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str, out: Path
) -> subprocess.CompletedProcess[str]:
    """`spd-ray ARGS --out OUT` in this process, for commands that fail or finish before any Ray
    (`RAY_ADDRESS` points nowhere): no interpreter start per call."""
    env = {**_env(out), "RAY_ADDRESS": "127.0.0.1:1"}
    return spd_ray_main(capsys, monkeypatch, env, *args, "--out", str(out))


def _run(name: str, out: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _cli("run", str(TINY), "--name", name, *LONG, *extra, "--in-process", out=out)


def _final(run: Path) -> dict[str, float]:
    return json.loads((run / "summary.json").read_text())["final_eval"]


def _assert_same_final(a: Path, b: Path) -> None:
    fa, fb = _final(a), _final(b)
    assert fa.keys() == fb.keys()
    for key in fa:
        assert fb[key] == pytest.approx(fa[key], rel=1e-6, abs=1e-9), key


def _pairs(run: Path) -> Counter[tuple[int, str]]:
    """How often each (step, metric) appears in metrics.jsonl."""
    return Counter((m["step"], k) for m in RunDir(run).read_metrics() for k in m if k != "step")


def _tb_steps(run: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tb"))
    events.Reload()
    return [e.step for e in events.Scalars(tag)]


def _assert_like_reference(ref: Path, run: Path) -> None:
    """Same final metrics, the same (step, metric) pairs each exactly once, in metrics.jsonl and
    in TensorBoard."""
    _assert_same_final(ref, run)
    pairs = _pairs(run)
    assert max(pairs.values()) == 1, [p for p, n in pairs.items() if n > 1][:5]
    assert set(pairs) == set(_pairs(ref))
    for tag in ("train/loss/total", "eval/loss/StochasticReconLoss"):
        assert _tb_steps(run, tag) == _tb_steps(ref, tag)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    """An uninterrupted run (and how long its command took)."""
    out = tmp_path_factory.mktemp("ref")
    t0 = time.perf_counter()
    res = _run("ref", out)
    assert res.returncode == 0, res.stderr
    return out / "ref", time.perf_counter() - t0


def _kill_after(out: Path, name: str, delay_s: float) -> None:
    proc = subprocess.Popen(
        _argv("run", str(TINY), "--name", name, *LONG, "--in-process"),
        env=_env(out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(delay_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kill_when(out: Path, name: str, ready: object, timeout_s: float = 300) -> None:
    """Start the run and kill -9 it once `ready()` holds."""
    proc = subprocess.Popen(
        _argv("run", str(TINY), "--name", name, *LONG, "--in-process"),
        env=_env(out),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + timeout_s
    while time.time() < deadline and proc.poll() is None and not ready():  # type: ignore[operator]
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before the moment to kill it"
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _kills_then_finish(out: Path, reference: tuple[Path, float], kills: int, seed: int) -> Path:
    ref, wall = reference
    rng = random.Random(seed)
    for _ in range(kills):
        _kill_after(out, "k", rng.uniform(1.0, wall))
    res = _run("k", out)
    assert res.returncode == 0, res.stderr
    return out / "k"


def test_kills_at_random_moments_lose_and_duplicate_nothing(
    tmp_path: Path, reference: tuple[Path, float]
) -> None:
    run = _kills_then_finish(tmp_path, reference, kills=3, seed=0)
    _assert_like_reference(reference[0], run)


@pytest.mark.slow  # ten kills: ~3-5 minutes
def test_ten_kills_at_random_moments(tmp_path: Path, reference: tuple[Path, float]) -> None:
    run = _kills_then_finish(tmp_path, reference, kills=10, seed=1)
    _assert_like_reference(reference[0], run)


@pytest.mark.slow
def test_kill_before_the_first_checkpoint_logs_nothing_twice(
    tmp_path: Path, reference: tuple[Path, float]
) -> None:
    """Killed after its first metrics but before any checkpoint: the rerun starts over at step 0
    and cuts what the killed process logged."""
    metrics = tmp_path / "k" / "metrics.jsonl"

    def logged_without_checkpoint() -> bool:
        try:
            text = metrics.read_text()
        except FileNotFoundError:
            return False
        return '"train/loss/total"' in text and not (tmp_path / "k" / "checkpoint.pt").exists()

    # A first checkpoint only after 100 steps leaves a window with train metrics and no checkpoint.
    LONG_FIRST = [*LONG, "--set", "save_freq=100"]
    proc = subprocess.Popen(
        _argv("run", str(TINY), "--name", "k", *LONG_FIRST, "--in-process"),
        env=_env(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not logged_without_checkpoint():
        time.sleep(0.01)
    assert proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "k" / "checkpoint.pt").exists()
    assert any("train/loss/total" in m for m in RunDir(tmp_path / "k").read_metrics())
    res = _cli("run", str(TINY), "--name", "k", *LONG_FIRST, "--in-process", out=tmp_path)
    assert res.returncode == 0, res.stderr
    _assert_like_reference(reference[0], tmp_path / "k")


def _stopped_run(out: Path, name: str, at_step: int) -> Path:
    """A run killed right after its checkpoint at `at_step` was written."""
    ckpt = out / name / "checkpoint.pt"

    def saved() -> bool:
        try:
            return int(torch.load(ckpt, weights_only=True)["step"]) >= at_step
        except Exception:  # noqa: BLE001 - not there yet, or being replaced
            return False

    _kill_when(out, name, saved)
    return out / name


@pytest.mark.slow
def test_torn_last_line_of_metrics_is_skipped_and_cut(
    tmp_path: Path, reference: tuple[Path, float]
) -> None:
    run = _stopped_run(tmp_path, "t", 60)
    rows = RunDir(run).read_metrics()
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 61, "torn/marker": 0.12')  # a write cut by a full disk or a power loss
    assert RunDir(run).read_metrics() == rows  # readers skip it
    res = _run("t", tmp_path)
    assert res.returncode == 0, res.stderr
    assert "torn/marker" not in (run / "metrics.jsonl").read_text()
    _assert_like_reference(reference[0], run)


@pytest.mark.slow
def test_truncated_newest_checkpoint_falls_back_to_the_previous(
    tmp_path: Path, reference: tuple[Path, float]
) -> None:
    run = _stopped_run(tmp_path, "c", 80)
    newest = run / "checkpoint.pt"
    prev_step = int(torch.load(run / "checkpoint.prev.pt", weights_only=True)["step"])
    assert prev_step < int(torch.load(newest, weights_only=True)["step"])
    newest.write_bytes(newest.read_bytes()[:1000])
    res = _run("c", tmp_path)
    assert res.returncode == 0, res.stderr
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning: skipping")]
    assert len(warnings) == 1 and str(newest) in warnings[0]
    assert f"resumed c from step {prev_step}" in res.stderr
    _assert_like_reference(reference[0], run)


@pytest.mark.slow  # CI keeps the crafted-checkpoint case of the same reader
def test_no_readable_checkpoint_fails_in_one_line_naming_the_files(tmp_path: Path) -> None:
    run = _stopped_run(tmp_path, "d", 40)
    for path in (run / "checkpoint.pt", run / "checkpoint.prev.pt"):
        path.write_bytes(b"not a checkpoint")
    before = (run / "metrics.jsonl").read_bytes()
    res = _run("d", tmp_path)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert lines[-1].startswith("spd-ray run: error: no readable checkpoint in")
    assert "checkpoint.pt" in lines[-1] and "checkpoint.prev.pt" in lines[-1]
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing cut or rewritten


class _RunsCode:
    """Unpickling this calls os.system: what a crafted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_crafted_checkpoint_runs_no_code(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    config = load_config(TINY, ["steps=10"])
    result = spd_ray.decompose(config, out=tmp_path, name="x", progress=False)
    marker = tmp_path / "pwned"
    crafted = {"step": 10, "model": _RunsCode(marker)}
    with (result.run_dir / "checkpoint.pt").open("wb") as f:
        pickle.dump(crafted, f)
    (result.run_dir / "checkpoint.prev.pt").unlink(missing_ok=True)
    with pytest.raises(CheckpointError, match="checkpoint.pt"):
        spd_ray.load_run(result.run_dir)
    assert not marker.exists()
    for argv in (
        ["harvest", str(result.run_dir), "--batches", "1"],
        ["harvest-show", "x", "layers.0.mlp_in:0"],
    ):
        res = _main(capsys, monkeypatch, *argv, out=tmp_path)
        assert res.returncode != 0
        assert not marker.exists(), argv


@pytest.mark.slow
def test_disk_full_during_a_checkpoint_keeps_the_last_good_one(
    tmp_path: Path, reference: tuple[Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    overrides = [a for a in LONG if a != "--set"]
    config = load_config(TINY, overrides)
    real_save = torch.save
    calls = {"n": 0}

    def save_until_full(obj: object, f: object, *args: object, **kwargs: object) -> None:
        real_save(obj, f, *args, **kwargs)  # type: ignore[arg-type]
        if "checkpoint" in str(f):
            calls["n"] += 1
            if calls["n"] == 3:  # the checkpoint at step 60 meets a full disk
                raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(rundir_module.torch, "save", save_until_full)
    with pytest.raises(OSError, match="No space left"):
        spd_ray.decompose(config, out=tmp_path, name="full", progress=False)
    run = tmp_path / "full"
    assert int(torch.load(run / "checkpoint.pt", weights_only=True)["step"]) == 40
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(rundir_module.torch, "save", real_save)
    result = spd_ray.decompose(config, out=tmp_path, name="full", progress=False)
    assert result.resumed_from == 40
    _assert_like_reference(reference[0], run)


@pytest.mark.slow
def test_crash_between_final_checkpoint_and_summary(
    tmp_path: Path, reference: tuple[Path, float], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.set_num_threads(1)
    config = load_config(TINY, [a for a in LONG if a != "--set"])

    def crash(self: RunDir, summary: object) -> None:
        raise KeyboardInterrupt  # the process dies here

    with monkeypatch.context() as m:
        m.setattr(RunDir, "write_summary", crash)
        with pytest.raises(KeyboardInterrupt):
            spd_ray.decompose(config, out=tmp_path, name="s", progress=False)
    run = tmp_path / "s"
    assert not (run / "summary.json").exists()
    before = RunDir(run).read_metrics()
    result = spd_ray.decompose(config, out=tmp_path, name="s", progress=False)
    assert result.resumed_from == 200 and not result.already_finished
    assert RunDir(run).read_metrics() == before  # no step trained or evaluated again
    assert result.metrics == _final(run)
    _assert_like_reference(reference[0], run)


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    """Another process holding the advisory lock at `path`."""
    return hold_lock(
        "from spd_ray.io import Lock; Lock(Path(sys.argv[1]), 'test').acquire()", str(path)
    )


# Slow on Ray: that path starts (or attaches to) a Ray before it takes the run's lock.
@pytest.mark.parametrize("ray", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_second_command_on_a_live_run_exits_naming_the_holder(
    tmp_path: Path, ray: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    holder = _hold_lock(tmp_path / "busy" / ".lock")
    try:
        args = ["run", str(TINY), "--name", "busy", "--steps", "10"]
        t0 = time.perf_counter()
        if ray:  # a Ray of its own: not in this process
            res = _cli(*args, out=tmp_path)
        else:
            res = _main(capsys, monkeypatch, *args, "--in-process", out=tmp_path)
        assert res.returncode == 2
        line = res.stderr.strip().splitlines()[-1]
        assert f"pid {holder.pid} on host" in line and "busy" in line
        assert time.perf_counter() - t0 < 60  # at once: no target trained, no Ray started
        assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == [".lock"]
    finally:
        holder.kill()
        holder.wait()
    # The dead holder's lock is taken over.
    res = _main(capsys, monkeypatch, *args, "--in-process", out=tmp_path)
    assert res.returncode == 0, res.stderr


@pytest.mark.slow  # ~35 s; the lock it checks is the one every run takes (tested in CI below)
def test_fresh_refuses_while_an_analysis_of_the_run_is_live(tmp_path: Path) -> None:
    """`--fresh` takes the locks of a harvest or autointerp store inside the run before it
    deletes anything: a live one stops it, naming its holder."""
    args = ["run", str(TINY), "--name", "h", "--steps", "10", "--in-process"]
    assert _cli(*args, out=tmp_path).returncode == 0
    run = tmp_path / "h"
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    holder = _hold_lock(run / ".harvest.lock")
    try:
        res = _cli(*args, "--fresh", out=tmp_path)
        assert res.returncode == 2
        assert f"pid {holder.pid}" in res.stderr.strip().splitlines()[-1]
        after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
        # Lock files hold their last holder's pid; everything else is byte-identical.
        assert {k: v for k, v in after.items() if not k.endswith(".lock")} == {
            k: v for k, v in before.items() if not k.endswith(".lock")
        }
        assert (run / "checkpoint.pt").exists() and (run / "summary.json").exists()
    finally:
        holder.kill()
        holder.wait()
    assert _cli(*args, "--fresh", out=tmp_path).returncode == 0  # the holder is gone


def test_lock_is_exclusive_and_freed_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "r" / ".lock"
    holder = _hold_lock(path)
    from spd_ray.io import LockedError

    with pytest.raises(LockedError, match=f"pid {holder.pid}"):
        Lock(path, "run r").acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with Lock(path, "run r"), pytest.raises(LockedError, match=f"pid {os.getpid()}"):
        Lock(path, "run r").acquire()


@pytest.mark.parametrize("name", ["..", "/", ".", "a/b", "../x", ""])
@pytest.mark.parametrize("fresh", [False, True])
def test_bad_names_fail_in_one_line_and_delete_nothing(
    tmp_path: Path,
    name: str,
    fresh: bool,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "root" / "out"
    files = [tmp_path / "keep.txt", tmp_path / "root" / "keep.txt", root / "a" / "b" / "keep.txt"]
    for f in files:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("precious")
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    args = ["run", str(TINY), "--name", name, "--steps", "5", *(["--fresh"] if fresh else [])]
    res = _main(capsys, monkeypatch, *args, "--in-process", out=root)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "--name" in lines[0], res.stderr
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before
    assert all(f.read_text() == "precious" for f in files)


def test_fresh_with_a_config_typo_keeps_the_old_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["run", str(TINY), "--name", "old", "--steps", "10", "--in-process"]
    res = _main(capsys, monkeypatch, *args, out=tmp_path)
    assert res.returncode == 0, res.stderr
    before = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()}
    for bad in ("bogus_key=1", "module_info=[{module_pattern: 'nope.*', C: 4}]"):
        for ray in (False, True):
            args = ["run", str(TINY), "--name", "old", "--fresh", "--set", bad]
            res = _main(
                capsys, monkeypatch, *args, *([] if ray else ["--in-process"]), out=tmp_path
            )
            assert res.returncode == 2, res.stderr
            after = {p.name: p.read_bytes() for p in (tmp_path / "old").iterdir() if p.is_file()}
            assert after == before


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--workers", "0"),
        ("--max-failures", "-1"),
        ("--max-failures", "101"),
        ("--cpus-per-worker", "0"),
        ("--cpus-per-worker", "nan"),
        ("--steps", "-1"),
    ],
)
def test_numeric_flags_are_bounded_at_parse_time(
    tmp_path: Path,
    flag: str,
    value: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    res = _main(capsys, monkeypatch, "run", str(TINY), "--name", "n", flag, value, out=tmp_path)
    assert res.returncode == 2
    assert f"argument {flag}" in res.stderr
    assert not (tmp_path / "n").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without GPU")
@pytest.mark.parametrize("ray", [False, True])
def test_gpu_without_gpus_fails_before_anything(
    tmp_path: Path, ray: bool, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    args = ["run", str(TINY), "--name", "g", "--gpu", "--steps", "5"]
    if ray:  # the Ray path asks the cluster for its GPUs: a Ray of its own, not in this process
        res = _cli(*args, out=tmp_path)
    else:
        res = _main(capsys, monkeypatch, *args, "--in-process", out=tmp_path)
    assert res.returncode == 2
    assert "--gpu" in res.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "g").exists()
    assert not any(tmp_path.iterdir())  # no target trained either


@pytest.mark.slow  # CI time: a targeted case
def test_a_changed_target_is_refused_naming_both_fingerprints(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = load_config(TINY, ["steps=20", "save_freq=10"])
    result = spd_ray.decompose(config, out=tmp_path, name="f", progress=False)
    recorded = json.loads((result.run_dir / "target.json").read_text())["fingerprint"]
    copy = result.run_dir / "target.pt"
    payload = torch.load(copy, weights_only=True)
    key = next(k for k, v in payload["state_dict"].items() if v.is_floating_point())
    payload["state_dict"][key] = payload["state_dict"][key] + 1e-3
    torch.save(payload, copy)
    with pytest.raises(ValueError, match=recorded) as err:
        spd_ray.load_run(result.run_dir)
    assert "fingerprint" in str(err.value) and str(copy) in str(err.value)

    # The cached target a rerun would use, rebuilt with other weights: the run refuses to resume.
    from spd_ray.targets import cached_target_path

    assert config.target_model is not None
    cached = cached_target_path(config.target_model, tmp_path)
    torch.save(payload, cached)
    with pytest.raises(ValueError, match=recorded):
        spd_ray.decompose(config, out=tmp_path, name="f", progress=False)


def test_default_names_from_any_config_path_are_valid() -> None:
    from spd_ray.io import check_name
    from spd_ray.train.run import default_run_name

    for stem in ("my config", "a/b", "..", "résumé", "tms_5-2"):
        name = default_run_name(stem)
        assert check_name(name, "name") == name
    assert default_run_name("tms_5-2").startswith("tms_5-2-")
