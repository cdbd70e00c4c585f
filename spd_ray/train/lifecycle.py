"""A run's lifecycle, written once: the in-process path (`decompose`), every Ray Train worker and
every sweep trial go through `live_run`, and every driver opens a run with `claim` and `open_run`.

Opening (driver, with the run's lock held): `--fresh` clears the old run, config.yaml and the
target's fingerprint are recorded or checked, a toy target's file is copied beside the run.
Living (each worker): resume from the newest readable checkpoint with `metrics.jsonl` cut back to
its step; stop at once when the run already finished; train with the caller's reporter; write
`summary.json`; record a non-finite loss in `error.txt`; close the writer and send the run to its
bucket, when it ends and when it fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from spd_ray.argtypes import MAX_FAILURES_LIMIT
from spd_ray.config import Config, FileTarget, ResidMLPTargetConfig, TMSTargetConfig, ToyTarget
from spd_ray.core.step import build_component_model
from spd_ray.errors import InputError
from spd_ray.io import write_text
from spd_ray.runs import ERROR_FILE, RunDir
from spd_ray.targets import cached_target_path, describe_target, load_target, target_fingerprint
from spd_ray.train.loop import (
    LoopState,
    NonFiniteLossError,
    Reporter,
    load_state,
    make_state,
    run_loop,
)
from spd_ray.train.worker import Worker


class RunReporter(Reporter, Protocol):
    """Where a living run's metrics, figures and checkpoints go, and its progress."""

    def on_step(self, step: int, seconds: float) -> None: ...

    def close(self, summary: dict[str, Any] | None) -> None: ...


@dataclass
class Outcome:
    """How one run ended: `status` is finished, resumed (finished after resuming), already
    finished, or failed (with `error`)."""

    name: str
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    already_finished: bool = False
    error: str | None = None
    wall_s: float = 0.0

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self.already_finished:
            return "already finished"
        return f"resumed at {self.resumed_from}" if self.resumed_from else "finished"


# -- opening (the driver) ------------------------------------------------------------------------


def check_workers(config: Config, workers: int) -> None:
    if workers < 1:
        raise InputError(f"--workers must be >= 1 (got {workers})")
    if config.batch_size % workers:
        raise InputError(f"batch_size {config.batch_size} is not divisible by --workers {workers}")


def check_launch(config: Config, workers: int, max_failures: int) -> None:
    check_workers(config, workers)
    if not 0 <= max_failures <= MAX_FAILURES_LIMIT:
        raise InputError(f"--max-failures must be between 0 and {MAX_FAILURES_LIMIT}")


@contextmanager
def claim(run_dir: RunDir) -> Iterator[None]:
    """Hold the run's lock for the block (a second command on the run fails at once, naming this
    one). A folder made only to hold the lock is removed again when the block fails before the
    run was initialised, so bad input leaves nothing behind."""
    made = not run_dir.path.exists()
    lock = run_dir.lock().acquire()
    try:
        yield
    except BaseException:
        if made and not run_dir.exists():
            run_dir.clear()
            lock.path.unlink(missing_ok=True)
            run_dir.path.rmdir()
        raise
    finally:
        lock.release()


def open_run(config: Config, run_dir: RunDir, root: Path, fingerprint: str, fresh: bool) -> None:
    """With the run's lock held and the config validated: `--fresh` clears the old run, then
    config.yaml, the target's fingerprint and a copy of a toy target's file are recorded (or,
    on a rerun, checked against the run's own)."""
    if fresh:
        run_dir.clear()
    else:  # before init, which may rewrite config.yaml's schedule (RESCHEDULABLE)
        run_dir.check_target(fingerprint, describe_target(config), record=False)
    run_dir.init(config)
    run_dir.check_target(fingerprint, describe_target(config))
    copy_target_file(config, root, run_dir)


def copy_target_file(config: Config, root: Path, run_dir: RunDir) -> None:
    """Keep the toy target's file beside the run so the run directory loads on its own."""
    match config.target:
        case FileTarget(path=path):
            run_dir.copy_target(Path(path))
        case ToyTarget(model=TMSTargetConfig() | ResidMLPTargetConfig() as toy):
            run_dir.copy_target(cached_target_path(toy, root))


def prepare_ray_run(config: Config, run_dir: RunDir, root: Path, fresh: bool) -> Outcome:
    """Driver-side work before the workers start, with the run's lock held and `preflight`
    passed: train (or find) the target, validate the modules on it, open the run directory; says
    whether the run already finished."""
    target = load_target(config, root)  # trained once here and cached; the workers load the file
    fingerprint = target_fingerprint(target)
    build_component_model(config, target)  # any target: bad module patterns fail before --fresh
    open_run(config, run_dir, root, fingerprint, fresh)
    outcome = Outcome(run_dir.path.name, run_dir.path)
    saved = run_dir.newest_state()
    if saved is not None:
        outcome.resumed_from = int(saved["step"])
        if run_dir.finished() and outcome.resumed_from >= config.steps:
            outcome.metrics = run_dir.read_summary()["final_eval"]
            outcome.already_finished = True
    return outcome


# -- living (each worker) ------------------------------------------------------------------------


def rank0_decides(decision: bool) -> bool:
    """Rank 0's decision on every rank (a broadcast when several workers run together)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decision
    flag = torch.tensor([1 if decision else 0], dtype=torch.int32)
    if dist.get_backend() == "nccl":
        flag = flag.cuda()
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def resume_state(config: Config, worker: Worker, run_dir: RunDir, device: Any) -> LoopState:
    """The loop state a run starts from - its newest readable checkpoint, else a fresh state - with
    `metrics.jsonl` cut back to that step on the writing rank."""
    state = make_state(config, worker.ctx)
    saved = run_dir.newest_state(device)
    if saved is not None:
        load_state(state, worker.model, worker.ctx.train_batches, saved)
    if worker.ctx.rank == 0:
        run_dir.start_at(state.step)
    return state


def summarize(
    run_dir: RunDir, final_eval: dict[str, float], wall_s: float, workers: int
) -> dict[str, Any]:
    metrics = run_dir.read_metrics()
    train = [m for m in metrics if "train/loss/total" in m]
    return {
        "final_step": metrics[-1]["step"] if metrics else 0,
        "final_eval": final_eval,
        "final_train": {k: v for k, v in train[-1].items() if k != "step"} if train else {},
        "initial_eval": next(
            (m for m in metrics if m["step"] == 0 and any(k.startswith("eval/") for k in m)), {}
        ),
        "checkpoint": str(run_dir.checkpoint_path),
        "wall_seconds": wall_s,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
    }


@dataclass
class Lived:
    """What `live_run` did: the final eval (rank 0's; {} on the other ranks of a run that had
    already finished), where it started and whether it had finished before."""

    metrics: dict[str, float]
    resumed_from: int
    already_finished: bool
    wall_s: float = 0.0


def live_run(
    config: Config,
    worker: Worker,
    run_dir: RunDir,
    open_reporter: Callable[[int], RunReporter],
    *,
    remote_run: str | None = None,
    on_start: Callable[[LoopState], None] | None = None,
) -> Lived:
    """Resume, train to `config.steps` and write the summary. `open_reporter(start_step)` makes the
    reporter (rank 0's writes the run directory); `on_start` runs once the start step is known and
    before the reporter opens. Rank 0 sends the run to `remote_run` when it ends or fails. A
    non-finite loss is recorded in error.txt and raised."""
    device, rank = worker.ctx.device, worker.ctx.rank
    state = resume_state(config, worker, run_dir, device)
    start = state.step
    if rank0_decides(rank == 0 and run_dir.finished() and start >= config.steps):
        final = run_dir.read_summary()["final_eval"] if rank == 0 else {}
        return Lived(final, start, already_finished=True)
    if rank == 0:
        (run_dir.path / ERROR_FILE).unlink(missing_ok=True)  # from an earlier start
    if on_start is not None:
        on_start(state)
    reporter = open_reporter(start)
    worker.ctx.on_step = reporter.on_step
    t0 = time.perf_counter()
    summary: dict[str, Any] | None = None
    try:
        final = run_loop(config, worker.ctx, state, reporter)
        wall_s = time.perf_counter() - t0
        if rank == 0:
            summary = summarize(run_dir, final, wall_s, worker.ctx.world_size)
            run_dir.write_summary(summary)
        return Lived(final, start, already_finished=False, wall_s=wall_s)
    except NonFiniteLossError as err:
        if rank == 0:
            write_text(run_dir.path / ERROR_FILE, str(err) + "\n")
        raise
    finally:
        reporter.close(summary)
        if remote_run is not None and rank == 0:
            from spd_ray.sync import sync_up

            sync_up(run_dir.path, remote_run)
