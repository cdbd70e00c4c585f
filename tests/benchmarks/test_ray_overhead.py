"""The pieces of `benchmarks/ray_overhead.py --interleave` that decide what is measured: which
processes get frozen, which step a run's log says it reached, and the rate between log rows (timed
on a fake clock, so the test asserts the arithmetic, not this host's speed)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
from multinode import wait_until


def _load_benchmark() -> ModuleType:
    """benchmarks/ is a folder of scripts, not a package: load the script as a module."""
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "ray_overhead.py"
    spec = importlib.util.spec_from_file_location("ray_overhead", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ray_overhead = _load_benchmark()


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[0]


def test_a_process_tree_is_found_whole_and_frozen_and_thawed_together() -> None:
    # A parent with two children and a grandchild each, like a driver with its Ray under it.
    script = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', "
        "'import subprocess, sys, time; "
        'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
        "time.sleep(60)']) for _ in range(2)]\n"
        "time.sleep(60)\n"
    )
    root = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(lambda: len(ray_overhead.descendants(root.pid)) == 5, 30, every_s=0.1)
        tree = ray_overhead.descendants(root.pid)
        assert len(tree) == 5 and tree[0] == root.pid
        assert os.getpid() not in tree
        ray_overhead.signal_all(tree, signal.SIGSTOP)
        wait_until(lambda: {_state(p) for p in tree} == {"T"}, 10, every_s=0.05)
        ray_overhead.signal_all(tree, signal.SIGCONT)
        wait_until(lambda: "T" not in {_state(p) for p in tree}, 10, every_s=0.05)
    finally:
        ray_overhead.signal_all(ray_overhead.descendants(root.pid), signal.SIGKILL)
        root.wait()


def test_logged_steps_reads_the_last_train_row_past_eval_rows_and_a_cut_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metrics.jsonl"
    logged = ray_overhead.LoggedSteps(path)
    assert logged.latest() == 0  # no file yet: not started
    rows = [{"step": s, "train/loss/total": 1.0, "train/steps_per_s": 90.0} for s in (100, 200)]
    rows.append({"step": 200, "eval/loss": 0.5, "pad": "x" * 20000})  # longer than the tail read
    rows.append({"step": 300, "train/loss/total": 1.0, "train/steps_per_s": 90.0})
    rows.append({"step": 300, "eval/loss": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert logged.latest() == 300


class _PlayedRun:
    """Stands in for the `time` module of the benchmark: a clock in whole milliseconds that only
    `sleep` advances, and a run that appends a train row to `path` every `every_ms` of it
    (`per_row` steps apart) until `stop_ms`."""

    def __init__(
        self, path: Path, every_ms: int, per_row: int, start_ms: int, stop_ms: int | None = None
    ):
        self.path, self.every_ms, self.per_row, self.stop_ms = path, every_ms, per_row, stop_ms
        self.ms = start_ms
        self.next_row_ms = (start_ms // every_ms + 1) * every_ms
        self.sleeps = 0

    def perf_counter(self) -> float:
        return self.ms / 1000

    def sleep(self, seconds: float) -> None:
        self.sleeps += 1
        self.ms += round(seconds * 1000)
        with self.path.open("a") as f:
            while self.next_row_ms <= self.ms and (
                self.stop_ms is None or self.next_row_ms <= self.stop_ms
            ):
                step = self.per_row * (self.next_row_ms // self.every_ms)
                f.write(json.dumps({"step": step, "train/steps_per_s": 1.0}) + "\n")
                self.next_row_ms += self.every_ms


@pytest.mark.parametrize(
    ("every_ms", "per_row", "start_ms", "expected"),
    [(100, 100, 0, 1000.0), (100, 100, 37, 1000.0), (300, 200, 130, 200 / 0.3)],
)
def test_logged_steps_rate_is_steps_between_rows_over_their_arrival_times(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    every_ms: int,
    per_row: int,
    start_ms: int,
    expected: float,
) -> None:
    """Whatever the window's edges, the rate is exact to the 20 ms poll."""
    run = _PlayedRun(tmp_path / "metrics.jsonl", every_ms, per_row, start_ms)
    monkeypatch.setattr(ray_overhead, "time", run)
    rate = ray_overhead.LoggedSteps(run.path).rate(1.5)
    assert rate == pytest.approx(expected, rel=1e-9)
    assert (run.ms - start_ms, run.sleeps) == (1500, 75)  # polled every 20 ms for 1.5 s


def test_logged_steps_rate_is_nan_when_under_two_rows_arrive(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _PlayedRun(tmp_path / "metrics.jsonl", 100, 100, 0, stop_ms=100)  # one row, then stuck
    monkeypatch.setattr(ray_overhead, "time", run)
    assert math.isnan(ray_overhead.LoggedSteps(run.path).rate(1.5))
