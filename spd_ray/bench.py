"""`spd-ray bench`: time the training step of registry experiments with their registry configs.

Runs the real loop (same step function as `spd-ray run`) with evals and the faithfulness warmup
switched off, records every step's wall time and prints the median steps/s after warm-up, the
samples/s and the peak memory. Compare numbers only within one invocation: the machine is shared.
"""

from __future__ import annotations

import resource
import statistics
import sys
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


def ray_overhead(experiment: str, steps: int, out: str | None = None) -> dict[str, float]:
    """What running on Ray Train (1 worker, local Ray) costs over the in-process loop, for one
    registry experiment: `spd-ray run` with and without `--in-process`, each in a fresh process
    as a user runs them. Reports whole-command wall time (Ray start, worker start, teardown
    included) and the loop's time per step (evals included in both). A short warm-up run first
    fills the on-disk torch.compile cache that both then use."""
    import json
    import os
    import subprocess
    import tempfile
    import time
    from pathlib import Path

    root = Path(out or tempfile.mkdtemp(prefix="spd-ray-overhead-"))
    env = {**os.environ, "SPD_RAY_OUT": str(root)}
    env.pop("SPD_RAY_THREADS", None)

    def run(name: str, *extra: str) -> float:
        cmd = [sys.executable, "-m", "spd_ray.cli", "run", experiment, "--name", name, "--fresh"]
        t0 = time.perf_counter()
        res = subprocess.run([*cmd, *extra], env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{name} failed: {res.stderr[-2000:]}")
        return time.perf_counter() - t0

    run("warmup", "--in-process", "--steps", "20")  # trains the target, fills compile caches
    wall_in = run("in-process", "--in-process", "--steps", str(steps))
    wall_ray = run("ray", "--steps", str(steps))

    def loop_s(name: str) -> float:
        return float(json.loads((root / name / "summary.json").read_text())["wall_seconds"])

    loop_in, loop_ray = loop_s("in-process"), loop_s("ray")
    return {
        "wall_in_process_s": wall_in,
        "wall_ray_s": wall_ray,
        "extra_wall_s": wall_ray - wall_in,
        "step_ms_in_process": 1000 * loop_in / steps,
        "step_ms_ray": 1000 * loop_ray / steps,
        "step_ratio": loop_ray / loop_in,
    }


def run_ray_overhead(experiment: str, steps: int) -> None:
    r = ray_overhead(experiment, steps)
    print(f"# {experiment}, {steps} steps, torch {torch.__version__}", file=sys.stderr)
    print(
        f"in-process: {r['wall_in_process_s']:.1f} s wall, {r['step_ms_in_process']:.2f} ms/step\n"
        f"Ray Train, 1 worker: {r['wall_ray_s']:.1f} s wall, {r['step_ms_ray']:.2f} ms/step\n"
        f"Ray costs {r['extra_wall_s']:+.1f} s of wall time; per-step ratio "
        f"{r['step_ratio']:.3f}"
    )
