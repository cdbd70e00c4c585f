"""Ray Train overhead: what `spd-ray run` on Ray Train (1 worker, local Ray) costs over the same
run with `--in-process`, for one registry experiment, as ratios measured in one invocation.

    python benchmarks/ray_overhead.py [--experiment tms_5-2] [--steps 2000] [--repeats 3]
                                      [--interleave N] [--window 10] [--out DIR]

Pairs (`--repeats`): `spd-ray run` with and without `--in-process`, each a fresh process as a user
runs it, in turns (in-process, Ray, in-process, Ray, ...: this host's speed drifts by 10-20% over
minutes, so one pair says little). Per pair: whole-command wall time (Ray start, worker start,
teardown included), the loop's time per step (evals included in both) and the median over log
intervals of steps/s (evals excluded); with more than one pair, the medians.

Interleaved (`--interleave N`, Linux): the per-step ratio alone, with the host's drift cancelled.
An in-process run and a Ray run are both started and kept alive, and only one runs at a time - the
other is frozen with SIGSTOP, the Ray one with every process of its Ray (GCS, raylet, agents,
controller), so a frozen Ray takes no CPU. They take turns of `--window` seconds (A B, B A, ...);
each pair of turns gives one ratio, and the median of N is printed. It runs before the pairs
(`--repeats 0` skips those).

Every run uses a fresh output root (`--out`, else a temporary folder removed afterwards), the
default torch threads (SPD_RAY_THREADS is dropped) and a private local Ray unless RAY_ADDRESS names
another, as a user runs them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from spd_ray.argtypes import nonneg_int, positive_int


def overhead_runs(
    experiment: str, out: str | None, prefix: str, overrides: tuple[str, ...] = ()
) -> tuple[Path, dict[str, str], Callable[[str], list[str]]]:
    """The output root, environment and `spd-ray run` command line (per run name) of the
    overhead benchmarks: fresh runs of `experiment` with default threads, as a user runs them."""
    root = Path(out or tempfile.mkdtemp(prefix=prefix))
    env = {**os.environ, "SPD_RAY_OUT": str(root)}
    env.pop("SPD_RAY_THREADS", None)
    # A private Ray, not a cluster some `ray start` left on this machine (RAY_ADDRESS wins).
    env.setdefault("RAY_ADDRESS", "local")

    def command(name: str) -> list[str]:
        sets = [arg for o in overrides for arg in ("--set", o)]
        run = ["run", experiment, "--name", name, "--fresh", *sets]
        return [sys.executable, "-m", "spd_ray.cli", *run]

    return root, env, command


def ray_overhead(
    experiment: str,
    steps: int,
    out: str | None = None,
    repeats: int = 1,
    overrides: tuple[str, ...] = (),
) -> list[dict[str, float]]:
    """In-process/Ray pairs of whole runs, in turns (see the module docstring). A short warm-up
    run first fills the on-disk torch.compile cache that every run then uses."""
    root, env, command = overhead_runs(experiment, out, "spd-ray-overhead-", overrides)

    def run(name: str, *extra: str) -> float:
        t0 = time.perf_counter()
        res = subprocess.run([*command(name), *extra], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{name} failed: {res.stderr[-2000:]}")
        return time.perf_counter() - t0

    def loop_s(name: str) -> float:
        return float(json.loads((root / name / "summary.json").read_text())["wall_seconds"])

    def median_steps_per_s(name: str) -> float:
        rows = [json.loads(line) for line in (root / name / "metrics.jsonl").open()]
        return statistics.median(r["train/steps_per_s"] for r in rows if "train/steps_per_s" in r)

    pairs = []
    try:
        run("warmup", "--in-process", "--steps", "20")  # trains the target, fills compile caches
        for i in range(repeats):
            wall_in = run(f"in-process-{i}", "--in-process", "--steps", str(steps))
            wall_ray = run(f"ray-{i}", "--steps", str(steps))
            loop_in, loop_ray = loop_s(f"in-process-{i}"), loop_s(f"ray-{i}")
            pairs.append(
                {
                    "wall_in_process_s": wall_in,
                    "wall_ray_s": wall_ray,
                    "extra_wall_s": wall_ray - wall_in,
                    "step_ms_in_process": 1000 * loop_in / steps,
                    "step_ms_ray": 1000 * loop_ray / steps,
                    "step_ratio": loop_ray / loop_in,
                    "interval_ratio": median_steps_per_s(f"in-process-{i}")
                    / median_steps_per_s(f"ray-{i}"),
                }
            )
    finally:
        if out is None:
            shutil.rmtree(root, ignore_errors=True)
    return pairs


def descendants(root: int) -> list[int]:
    """`root` and every process below it (a local Ray's GCS, raylet and workers all descend
    from the driver that started it)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def signal_all(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class LoggedSteps:
    """The latest logged training step of a run, read from the tail of its metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def latest(self) -> int:
        try:
            with self.path.open("rb") as f:
                f.seek(max(0, self.path.stat().st_size - 16384))
                lines = f.read().decode(errors="ignore").splitlines()
        except FileNotFoundError:
            return 0
        for line in reversed(lines):
            try:
                row = json.loads(line)
            except ValueError:
                continue  # the first line of the tail is cut
            if "train/steps_per_s" in row:
                return int(row["step"])
        return 0

    def rate(self, seconds: float) -> float:
        """Steps/s over about `seconds`, timed between the first and the last log row that
        appear in that time (rows come every `train_log_freq` steps; arrival times are exact
        to the 20 ms poll)."""
        seen: list[tuple[int, float]] = []
        last, end = self.latest(), time.perf_counter() + seconds
        while time.perf_counter() < end:
            time.sleep(0.02)
            step = self.latest()
            if step != last:
                seen.append((step, time.perf_counter()))
                last = step
        if len(seen) < 2:
            return float("nan")
        return (seen[-1][0] - seen[0][0]) / (seen[-1][1] - seen[0][1])


def ray_overhead_interleaved(
    experiment: str,
    windows: int,
    window_s: float = 10.0,
    out: str | None = None,
    overrides: tuple[str, ...] = (),
) -> list[dict[str, float]]:
    """Per-step cost of Ray Train with the host's drift cancelled: two live runs taking turns,
    the idle one frozen (see the module docstring). One dict per pair of turns."""
    root, env, command = overhead_runs(experiment, out, "spd-ray-interleave-", overrides)
    steps = 10_000_000  # stopped from here long before the end

    def start(name: str, *extra: str) -> tuple[subprocess.Popen[bytes], LoggedSteps]:
        with (root / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*command(name), "--steps", str(steps), *extra],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        logged = LoggedSteps(root / name / "metrics.jsonl")
        deadline = time.monotonic() + 600
        while logged.latest() < 200:  # training, past its first steps
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: see {root / (name + '.log')}")
            time.sleep(0.2)
        return proc, logged

    ray_proc, ray_steps = start("ray")
    ray_pids = descendants(ray_proc.pid)
    signal_all(ray_pids, signal.SIGSTOP)
    in_proc, in_steps = None, None
    pairs: list[dict[str, float]] = []
    try:
        in_proc, in_steps = start("in-process", "--in-process")
        in_pids = descendants(in_proc.pid)
        turns = {
            "in_process": (in_pids, in_steps, ray_pids),
            "ray": (ray_pids, ray_steps, in_pids),
        }
        for i in range(windows):
            order = ("in_process", "ray") if i % 2 == 0 else ("ray", "in_process")
            rates: dict[str, float] = {}
            for name in order:
                running, logged, frozen = turns[name]
                signal_all(frozen, signal.SIGSTOP)
                signal_all(running, signal.SIGCONT)
                time.sleep(1.0)  # settle: caches, the log row in flight
                rates[name] = logged.rate(window_s)
            pairs.append(
                {
                    "steps_per_s_in_process": rates["in_process"],
                    "steps_per_s_ray": rates["ray"],
                    "ratio": rates["in_process"] / rates["ray"],
                }
            )
            print(
                f"  window pair {i}: in-process {rates['in_process']:.1f} steps/s, "
                f"Ray {rates['ray']:.1f} steps/s, ratio {pairs[-1]['ratio']:.3f}",
                file=sys.stderr,
            )
    finally:
        everything = descendants(ray_proc.pid) + (descendants(in_proc.pid) if in_proc else [])
        signal_all(everything, signal.SIGCONT)
        for proc in (ray_proc, in_proc):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for proc in (ray_proc, in_proc):
            if proc is None:
                continue
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        signal_all([p for p in everything if os.path.exists(f"/proc/{p}")], signal.SIGKILL)
        if out is None:
            shutil.rmtree(root, ignore_errors=True)
    return pairs


def print_interleaved(windows: list[dict[str, float]]) -> None:
    ratios = [w["ratio"] for w in windows if w["ratio"] == w["ratio"]]  # not NaN
    if len(ratios) >= 2:
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        print(
            f"interleaved: per-step ratio Ray/in-process {statistics.median(ratios):.3f} "
            f"(median of {len(ratios)} window pairs; quartiles {q1:.3f}-{q3:.3f})"
        )
    else:
        print("interleaved: too few window pairs with a rate")


def print_pairs(pairs: list[dict[str, float]]) -> None:
    print(
        f"{'pair':>4} {'wall in-proc s':>14} {'wall Ray s':>10} {'extra s':>8} "
        f"{'ms/step in-proc':>15} {'ms/step Ray':>11} {'step ratio':>10} {'interval ratio':>14}"
    )
    for i, r in enumerate(pairs):
        print(
            f"{i:>4} {r['wall_in_process_s']:>14.1f} {r['wall_ray_s']:>10.1f} "
            f"{r['extra_wall_s']:>+8.1f} {r['step_ms_in_process']:>15.2f} "
            f"{r['step_ms_ray']:>11.2f} {r['step_ratio']:>10.3f} {r['interval_ratio']:>14.3f}"
        )
    if len(pairs) > 1:
        med = {k: statistics.median(r[k] for r in pairs) for k in pairs[0]}
        print(
            f"median: Ray costs {med['extra_wall_s']:+.1f} s of wall time; per-step ratio "
            f"{med['step_ratio']:.3f} (loop time), {med['interval_ratio']:.3f} (median interval)"
        )
    print(
        "step ratio = Ray loop time / in-process loop time (evals included); interval ratio = "
        "in-process / Ray median steps/s over log intervals (evals excluded); above 1: Ray slower."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--experiment", default="tms_5-2", help="registry experiment")
    parser.add_argument("--steps", type=positive_int, default=2000, help="steps of each paired run")
    parser.add_argument(
        "--repeats", type=nonneg_int, default=3, help="in-process/Ray pairs, run in turns (0: none)"
    )
    parser.add_argument(
        "--interleave",
        type=nonneg_int,
        default=0,
        metavar="N",
        help="first measure the per-step ratio with both runs alive, taking turns (the other "
        "frozen) for N window pairs - the host's drift cancels (Linux)",
    )
    parser.add_argument("--window", type=float, default=10.0, help="seconds per interleaved turn")
    parser.add_argument("--out", help="output root to keep the runs in (default: a temp folder)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for every run (repeatable), e.g. --set eval_freq=1000000 to keep "
        "an LM's evals out of the windows",
    )
    args = parser.parse_args()
    sets = tuple(args.overrides)
    if args.window <= 0:
        parser.error(f"--window must be positive, not {args.window}")

    print(f"# {args.experiment}, torch {torch.__version__}", file=sys.stderr)
    if args.interleave:
        print(
            f"# {args.experiment}: in-process and Ray runs taking turns, {args.window:.0f} s each",
            file=sys.stderr,
        )
        windows = ray_overhead_interleaved(
            args.experiment, args.interleave, args.window, args.out, sets
        )
        print_interleaved(windows)
    if args.repeats:
        print(f"# {args.experiment}, {args.steps} steps per run", file=sys.stderr)
        print_pairs(ray_overhead(args.experiment, args.steps, args.out, args.repeats, sets))


if __name__ == "__main__":
    main()
