"""`spd-ray bench`: time the training step of registry experiments with their registry configs.

Runs the real loop (same step function as `spd-ray run`) with evals and the faithfulness warmup
switched off, records every step's wall time and prints the median steps/s after warm-up, the
samples/s and the peak memory. Compare numbers only within one invocation: the machine is shared.
"""

from __future__ import annotations

import resource
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from spd_ray.registry import load_experiment
from spd_ray.targets import load_target
from spd_ray.train.loop import make_state, run_loop
from spd_ray.train.run import build_worker
from spd_ray.train.rundir import output_root, tune_malloc


class _NullReporter:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        pass

    def checkpoint(self, step: int, state: dict[str, Any], final: bool) -> None:
        pass


def bench_one(
    experiment: str,
    steps: int,
    warmup: int,
    overrides: list[str] | None = None,
    device: str = "cpu",
) -> dict[str, float]:
    total = warmup + steps
    _, config = load_experiment(
        experiment,
        [
            *(overrides or []),
            f"steps={total}",
            f"eval_freq={total}",
            "slow_eval_freq=null",
            "n_eval_steps=1",
            "eval_metric_configs=[]",
            "faithfulness_warmup_steps=0",
            "slow_eval_on_first_step=false",
        ],
    )
    target = load_target(config, output_root())
    worker = build_worker(config, target, device=device)
    times: list[float] = []
    worker.ctx.on_step = lambda step, seconds: times.append(seconds)
    run_loop(config, worker.ctx, make_state(config, worker.ctx), _NullReporter())
    timed = times[warmup:]
    median = statistics.median(timed)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available() and device != "cpu":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    return {
        "steps_per_s": 1.0 / median,
        "samples_per_s": config.batch_size / median,
        "p90_step_ms": 1000 * statistics.quantiles(timed, n=10)[-1],
        "peak_mem_mb": peak_mb,
    }


def run_bench(experiments: list[str], steps: int, warmup: int, threads: int) -> None:
    tune_malloc()
    if threads:
        torch.set_num_threads(threads)
    print(f"# torch {torch.__version__}, {torch.get_num_threads()} threads", file=sys.stderr)
    print(f"{'experiment':<14} {'steps/s':>8} {'samples/s':>10} {'p90 ms':>8} {'peak MB':>8}")
    for name in experiments:
        r = bench_one(name, steps, warmup)
        print(
            f"{name:<14} {r['steps_per_s']:>8.1f} {r['samples_per_s']:>10.0f} "
            f"{r['p90_step_ms']:>8.1f} {r['peak_mem_mb']:>8.0f}"
        )


def _overhead_runs(
    experiment: str, out: str | None, prefix: str
) -> tuple[Path, dict[str, str], Callable[[str], list[str]]]:
    """The output root, environment and `spd-ray run` command line (per run name) of the
    overhead benchmarks: fresh runs of `experiment` with default threads, as a user runs them."""
    import os
    import tempfile

    root = Path(out or tempfile.mkdtemp(prefix=prefix))
    env = {**os.environ, "SPD_RAY_OUT": str(root)}
    env.pop("SPD_RAY_THREADS", None)

    def command(name: str) -> list[str]:
        return [sys.executable, "-m", "spd_ray.cli", "run", experiment, "--name", name, "--fresh"]

    return root, env, command


def ray_overhead(
    experiment: str, steps: int, out: str | None = None, repeats: int = 1
) -> list[dict[str, float]]:
    """What running on Ray Train (1 worker, local Ray) costs over the in-process loop, for one
    registry experiment: `spd-ray run` with and without `--in-process`, each in a fresh process
    as a user runs them, `repeats` times in turns (in-process, Ray, in-process, Ray, ...: this
    host's speed drifts by 10-20% over minutes, so one pair says little). Per pair: whole-command
    wall time (Ray start, worker start, teardown included), the loop's time per step (evals
    included in both) and the median over log intervals of steps/s (evals excluded). A short
    warm-up run first fills the on-disk torch.compile cache that every run then uses."""
    import json
    import subprocess
    import time

    root, env, command = _overhead_runs(experiment, out, "spd-ray-overhead-")

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

    run("warmup", "--in-process", "--steps", "20")  # trains the target, fills compile caches
    pairs = []
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
    return pairs


def _descendants(root: int) -> list[int]:
    """`root` and every process below it (a local Ray's GCS, raylet and workers all descend
    from the driver that started it)."""
    import os

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


def _signal_all(pids: list[int], sig: int) -> None:
    import contextlib
    import os

    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


class _LoggedSteps:
    """The latest logged training step of a run, read from the tail of its metrics.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def latest(self) -> int:
        import json

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
        import time

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
    experiment: str, windows: int, window_s: float = 10.0, out: str | None = None
) -> list[dict[str, float]]:
    """Per-step cost of Ray Train (1 worker, local Ray) measured so that the host's drift
    cancels: an in-process run and a Ray run are both started and kept alive, and only one of
    them runs at a time - the other is frozen with SIGSTOP, the Ray one with every process of
    its Ray (GCS, raylet, agents, controller), so a frozen Ray takes no CPU. They take turns
    in windows of `window_s` seconds (A B, B A, ...); each pair of adjacent windows gives one
    ratio of steps/s. Linux only (reads /proc)."""
    import os
    import shutil
    import signal
    import subprocess
    import time

    root, env, command = _overhead_runs(experiment, out, "spd-ray-interleave-")
    steps = 10_000_000  # stopped from here long before the end

    def start(name: str, *extra: str) -> tuple[subprocess.Popen[bytes], _LoggedSteps]:
        with (root / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*command(name), "--steps", str(steps), *extra],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=log,
                start_new_session=True,
            )
        logged = _LoggedSteps(root / name / "metrics.jsonl")
        deadline = time.monotonic() + 600
        while logged.latest() < 200:  # training, past its first steps
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{name} did not start: see {root / (name + '.log')}")
            time.sleep(0.2)
        return proc, logged

    ray_proc, ray_steps = start("ray")
    ray_pids = _descendants(ray_proc.pid)
    _signal_all(ray_pids, signal.SIGSTOP)
    in_proc, in_steps = None, None
    pairs: list[dict[str, float]] = []
    try:
        in_proc, in_steps = start("in-process", "--in-process")
        in_pids = _descendants(in_proc.pid)
        turns = {
            "in_process": (in_pids, in_steps, ray_pids),
            "ray": (ray_pids, ray_steps, in_pids),
        }
        for i in range(windows):
            order = ("in_process", "ray") if i % 2 == 0 else ("ray", "in_process")
            rates: dict[str, float] = {}
            for name in order:
                running, logged, frozen = turns[name]
                _signal_all(frozen, signal.SIGSTOP)
                _signal_all(running, signal.SIGCONT)
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
        everything = _descendants(ray_proc.pid) + (_descendants(in_proc.pid) if in_proc else [])
        _signal_all(everything, signal.SIGCONT)
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
        _signal_all([p for p in everything if os.path.exists(f"/proc/{p}")], signal.SIGKILL)
        if out is None:
            shutil.rmtree(root, ignore_errors=True)
    return pairs


def run_ray_overhead(
    experiment: str, steps: int, repeats: int = 1, interleave: int = 0, window_s: float = 10.0
) -> None:
    if interleave:
        print(
            f"# {experiment}: in-process and Ray runs taking turns, {window_s:.0f} s each",
            file=sys.stderr,
        )
        windows = ray_overhead_interleaved(experiment, interleave, window_s)
        ratios = [w["ratio"] for w in windows if w["ratio"] == w["ratio"]]  # not NaN
        if len(ratios) >= 2:
            q1, _, q3 = statistics.quantiles(ratios, n=4)
            print(
                f"interleaved: per-step ratio Ray/in-process {statistics.median(ratios):.3f} "
                f"(median of {len(ratios)} window pairs; quartiles {q1:.3f}-{q3:.3f})"
            )
        else:
            print("interleaved: too few window pairs with a rate")
        if not repeats:
            return
    pairs = ray_overhead(experiment, steps, repeats=repeats)
    print(f"# {experiment}, {steps} steps, torch {torch.__version__}", file=sys.stderr)
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
