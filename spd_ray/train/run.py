"""Run one decomposition: `decompose` in this process (the Python API), `run_experiment` for
`spd-ray run` (in this process or on Ray Train, resumable by name, a local or object-store root).
Both open the run with `spd_ray.train.lifecycle`; the loop itself lives in `live_run`.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from spd_ray.config import Config
from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError
from spd_ray.io import child, safe_name
from spd_ray.ray_session import DEFAULT_WAIT_TIMEOUT_S
from spd_ray.runs import RunDir, output_root, tune_malloc
from spd_ray.targets import load_target, target_fingerprint
from spd_ray.train.lifecycle import (
    Outcome,
    check_launch,
    claim,
    live_run,
    open_run,
    prepare_ray_run,
)
from spd_ray.train.tracking import RunWriter
from spd_ray.train.worker import build_worker, preflight


class LocalReporter:
    """Writes the run directory (and the trackers) and shows progress in this process."""

    def __init__(
        self, run_dir: RunDir, config: Config, progress: bool, start_step: int = 0
    ) -> None:
        self.writer = RunWriter(run_dir, config, start_step)
        self.bar = (
            tqdm(total=config.steps, initial=start_step, desc=run_dir.path.name, file=sys.stderr)
            if progress
            else None
        )

    def on_step(self, step: int, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.log(step, metrics)
        if self.bar is not None and "train/loss/total" in metrics:
            self.bar.set_postfix(
                loss=f"{metrics['train/loss/total']:.3g}",
                steps_s=f"{metrics.get('train/steps_per_s', 0.0):.1f}",
            )

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        self.writer.figures(step, figures)

    def checkpoint(self, step: int, state: dict[str, Any], final: bool) -> None:
        self.writer.checkpoint(state)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close(summary)


@dataclass
class RunResult(Outcome):
    """`decompose`'s result: the outcome plus the trained model."""

    model: ComponentModel | None = None


def default_run_name(experiment: str) -> str:
    return f"{safe_name(experiment)}-{time.strftime('%Y%m%d-%H%M%S')}"


def decompose(
    config: Config,
    target: nn.Module | None = None,
    *,
    out: str | Path | None = None,
    name: str | None = None,
    fresh: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> RunResult:
    """Run one decomposition in this process (no Ray) and write its run directory.

    A given `target` is wrapped in place (its decomposed modules are swapped for wrappers that
    behave like the originals outside SPD forwards).

    Rerunning with the same `name` and `out` resumes from the run's checkpoint; `fresh=True` deletes
    the old run first (once the config is known to be good). Returns the final eval metrics and the
    trained model.
    """
    tune_malloc()
    root = output_root(out)
    run_name = default_run_name("run") if name is None else name
    run_dir = RunDir(child(root, run_name, "name"))
    if target is None:
        preflight(config)
    with claim(run_dir):
        if target is None:
            target = load_target(config, root)
        fingerprint = target_fingerprint(target)  # before build_worker wraps its modules
        worker = build_worker(config, target, root, device)  # validates modules and metrics first
        open_run(config, run_dir, root, fingerprint, fresh)
        lived = live_run(
            config, worker, run_dir, lambda start: LocalReporter(run_dir, config, progress, start)
        )
        return RunResult(
            run_name,
            run_dir.path,
            lived.metrics,
            lived.resumed_from,
            lived.already_finished,
            wall_s=lived.wall_s,
            model=worker.model,
        )


def run_experiment(
    config: Config,
    *,
    name: str,
    out: str | Path | None = None,
    fresh: bool = False,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    max_failures: int = 3,
    in_process: bool = False,
    placement: str | None = None,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    remote_run: str | None = None,
) -> Outcome:
    """What `spd-ray run` does: the run on Ray Train (or in this process), resumable by name.
    On Ray, the cluster must be able to hold the workers (an autoscaler gets `wait_timeout_s` to
    add nodes); `placement` is `pack` or `spread` (None: Ray Train's default). An object-store
    `out` runs in a staging folder synced with the bucket (`spd_ray.train.staged`)."""
    from spd_ray.sync import remote_root, sync_up
    from spd_ray.train.staged import staged_run

    uri = remote_root(out)
    if uri is not None:
        check_launch(config, workers, max_failures)
        with staged_run(uri, name) as staged:
            return run_experiment(
                config,
                name=name,
                out=staged.local_root,
                fresh=fresh,
                workers=workers,
                use_gpu=use_gpu,
                cpus_per_worker=cpus_per_worker,
                max_failures=max_failures,
                in_process=in_process,
                placement=placement,
                wait_timeout_s=wait_timeout_s,
                remote_run=staged.run_uri,
            )
    root = output_root(out)
    run_dir = RunDir(child(root, name, "--name"))
    check_launch(config, workers, max_failures)
    if cpus_per_worker is not None and not cpus_per_worker > 0:
        raise InputError(f"--cpus-per-worker must be > 0 (got {cpus_per_worker})")
    if in_process:
        if workers != 1:
            raise InputError("--in-process runs exactly one worker")
        if use_gpu and not torch.cuda.is_available():
            raise InputError(
                "--gpu: this machine has no CUDA GPU (torch.cuda.is_available() is False)"
            )
        threads = int(os.environ.get("SPD_RAY_THREADS", "0")) or os.cpu_count() or 1
        torch.set_num_threads(threads)
        device = "cuda" if use_gpu else "cpu"
        try:
            r = decompose(config, out=root, name=name, fresh=fresh, device=device)
        finally:
            if remote_run is not None and run_dir.path.exists():
                sync_up(run_dir.path, remote_run, delete=fresh)
        return Outcome(
            name, r.run_dir, r.metrics, r.resumed_from, r.already_finished, wall_s=r.wall_s
        )

    from spd_ray.capacity import capacity_for, require_gpus
    from spd_ray.ray_session import connect_ray
    from spd_ray.storage import check_shared_root
    from spd_ray.sync import sync_down
    from spd_ray.train.ray_driver import default_cpus_per_worker, run_on_ray, worker_bundle

    t0 = time.perf_counter()
    preflight(config)
    connect_ray()
    if use_gpu:
        require_gpus(workers, f"--workers {workers}")
    per_worker = cpus_per_worker or default_cpus_per_worker(workers)
    bundles = [worker_bundle(per_worker, use_gpu)] * workers
    with capacity_for(bundles, f"--workers {workers}", wait_timeout_s):
        if remote_run is None:  # a bucket is every node's; a local root must be too
            check_shared_root(root)
        with claim(run_dir):
            outcome = prepare_ray_run(config, run_dir, root, fresh)
            if outcome.already_finished:
                return outcome
            if remote_run is not None:
                sync_up(run_dir.path, remote_run, delete=fresh)
            try:
                run_on_ray(
                    config,
                    run_dir,
                    root,
                    workers,
                    use_gpu,
                    per_worker,
                    max_failures,
                    placement,
                    remote_run=remote_run,
                )
            finally:
                if remote_run is not None:  # what rank 0 sent, wherever it ran
                    sync_down(remote_run, run_dir.path)
            outcome.metrics = run_dir.read_summary()["final_eval"]
            outcome.wall_s = time.perf_counter() - t0
            return outcome
