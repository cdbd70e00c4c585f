"""`spd-ray bench`: time the training step of registry experiments with their registry configs.

Runs the real loop (same step function as `spd-ray run`) with evals and the faithfulness warmup
switched off, records every step's wall time and prints the median steps/s after warm-up, the
samples/s and the peak memory. Compare numbers only within one invocation: the machine is shared.
What Ray Train costs over the in-process loop is measured by `benchmarks/ray_overhead.py`.
"""

from __future__ import annotations

import resource
import statistics
import sys
from typing import Any

import torch
from matplotlib.figure import Figure

from spd_ray.registry import load_experiment
from spd_ray.runs import output_root, tune_malloc
from spd_ray.targets import load_target
from spd_ray.train.loop import make_state, run_loop
from spd_ray.train.worker import build_worker


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
