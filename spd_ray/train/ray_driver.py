"""Run a decomposition on Ray Train: `TorchTrainer` over N workers, checkpoints through Ray, resume.

The driver validates the config, prepares the run directory and the (cached) target, then hands
every worker the same loop the in-process path runs (`spd_ray.train.loop.run_loop`). Rank 0 writes
the run directory; every rank reports to Ray at checkpoints (rank 0 with the checkpoint) and,
throttled, at log points. Rerunning with the same run directory resumes from the newest checkpoint -
Ray's, or the run directory's `checkpoint.pt` - on any number of workers.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from spd_ray.config import Config, config_from_dict
from spd_ray.io import write_json
from spd_ray.ray_session import (
    connect_ray,
    driver_secrets,
    here,
    is_local_cluster,
    say,
    started_local_ray,
    warn_missing_secrets,
    worker_threads,
)
from spd_ray.runs import (
    ERROR_FILE,
    RAY_SUBDIR,
    TARGET_COPY,
    WORKERS_FILE,
    RunDir,
    tune_malloc,
)
from spd_ray.sync import fetch, staging_dir, sync_up
from spd_ray.train.lean import lean_trainer_class
from spd_ray.train.lifecycle import live_run, rank0_decides
from spd_ray.train.loop import LoopState, NonFiniteLossError
from spd_ray.train.tracking import RunWriter
from spd_ray.train.worker import build_worker

# --placement -> Ray's placement-group strategy (Ray Train's default is PACK)
PLACEMENTS = {"pack": "PACK", "spread": "SPREAD"}


@dataclass
class WorkerArgs:
    config: dict[str, Any]
    run_dir: str
    out_root: str
    threads: int  # torch threads per worker; 0: the whole CPUs the worker holds
    use_gpu: bool
    launch: str = ""  # one id per driver start: restarts of its worker group count up
    remote_run: str = ""  # the run's object-store URI: run_dir is then this node's staging folder
    require: tuple[str, ...] = ()
    driver_secrets: tuple[str, ...] = ()  # names only: warn when a worker lacks one
    # ray.train.report blocks until the controller polls (up to its health-check interval), so a
    # plain run reports rarely (checkpoints always report); sweep trials report often for ASHA.
    report_interval_s: float = 30.0


class RayReporter:
    """Rank 0 writes the run directory and the trackers; every rank reports to Ray (they must
    report together), at checkpoints and, throttled, at log points."""

    def __init__(
        self,
        writer: RunWriter | None,
        name: str,
        rank: int,
        total_steps: int,
        min_interval_s: float,
        report: Callable[..., None] | None = None,
        quiet: bool = False,
        require: tuple[str, ...] = (),
        remote_run: str | None = None,
    ):
        """`report` is `ray.train.report` (default) or, in a Tune trial, the sweep's
        `TuneReport` (metrics every log point, one marker checkpoint per trial);
        `quiet` drops the progress lines (Tune shows its own table); log points report only
        once every `require`d metric has a value (a Tune searcher reads its objectives from
        every report)."""
        self.report = report
        self.require = require
        self.remote_run = remote_run  # rank 0 sends the run there after each checkpoint
        self.quiet = quiet
        self.writer = writer
        self.name = name
        self.rank = rank
        self.total_steps = total_steps
        self.min_interval_s = min_interval_s
        self.last_report = 0.0
        self.last: dict[str, float] = {}

    def _with_steps(self, step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """`step`, and `rung_step` until the last step: an early-stopping scheduler keyed on
        `rung_step` can stop a trial at any step but never in its final eval and save."""
        steps: dict[str, Any] = {"step": step}
        if step < self.total_steps:
            steps["rung_step"] = step
        return {**steps, **metrics}

    def _report(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        import ray.train

        (self.report or ray.train.report)(metrics, checkpoint=checkpoint)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.last.update(metrics)
        if self.writer is not None:
            self.writer.log(step, metrics)
            if "train/loss/total" in metrics and not self.quiet:
                say(
                    f"[{self.name}] step {step}/{self.total_steps} "
                    f"loss {metrics['train/loss/total']:.4g} "
                    f"{metrics.get('train/steps_per_s', 0.0):.1f} steps/s"
                )
        # report() blocks until the controller polls, so log points report at most this often;
        # each report carries the latest value of every metric (schedulers compare any of them).
        now = time.monotonic()
        ready = all(k in self.last for k in self.require)
        if rank0_decides(ready and now - self.last_report >= self.min_interval_s):
            self._report(self._with_steps(step, self.last))
            self.last_report = time.monotonic()

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        if self.writer is not None:
            self.writer.figures(step, figures)

    def on_step(self, step: int, seconds: float) -> None:
        pass  # progress shows in the log lines

    def close(self, summary: dict[str, Any] | None) -> None:
        if self.writer is not None:
            self.writer.close(summary)

    def checkpoint(self, step: int, state: dict[str, Any], final: bool) -> None:
        import ray.train

        metrics = self._with_steps(step, {k: v for k, v in self.last.items() if "/" in k})
        if self.writer is None:
            self._report(metrics, checkpoint=None)
            return
        self.writer.checkpoint(state)
        if self.remote_run is not None:
            sync_up(self.writer.run_dir.path, self.remote_run)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / "checkpoint.pt")
            self._report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.last_report = time.monotonic()


def load_target_once_per_node(
    config: Config, out_root: Path, local_rank: int, remote_run: str | None, run_dir: RunDir
) -> Any:
    """The target, fetched once per node: the node's first worker loads it (downloading a hub
    model into the node's Hugging Face cache, or training/finding a toy target), the others wait
    and then load from that cache - never N downloads of the same model on one node. A run kept
    in object storage is fetched into the node's staging folder first, and its target copy (a
    toy target trained by the driver) is what every worker loads."""
    import torch.distributed as dist

    from spd_ray.targets import load_target, load_target_file

    together = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if together and local_rank != 0:
        dist.barrier()  # until every node's first worker has its copy
    if remote_run is not None and local_rank == 0:
        fetch(remote_run)
    copy = run_dir.path / TARGET_COPY
    if remote_run is not None and copy.exists():
        target = load_target_file(copy)
    else:
        target = load_target(config, out_root, progress=False)
    if together and local_rank == 0:
        dist.barrier()
    return target


def record_placement(
    run_dir: RunDir, launch: str, rank: int, world: int, device: torch.device, step: int
) -> None:
    """Rank 0 writes `workers.json`: where every rank of this worker-group start runs (Ray node
    id, host, node IP, pid, device) and which start it is - `attempt` counts the restarts of one
    driver launch, `previous` keeps the placements of its earlier attempts."""
    import torch.distributed as dist

    mine = {**here(), "rank": rank, "device": str(device)}
    everyone: list[Any] = [mine]
    if dist.is_available() and dist.is_initialized() and world > 1:
        everyone = [None] * world
        dist.all_gather_object(everyone, mine)
    if rank != 0:
        return
    path = run_dir.path / WORKERS_FILE
    attempt, previous = 0, []
    try:
        old = json.loads(path.read_text())
        if launch and old.get("launch") == launch:
            attempt = int(old["attempt"]) + 1
            previous = [*old.get("previous", []), {k: old[k] for k in ("attempt", "workers")}]
    except (OSError, ValueError, KeyError, TypeError):
        pass  # none yet, or from another launch: this start is attempt 0
    write_json(
        path,
        {
            "launch": launch,
            "attempt": attempt,
            "world_size": world,
            "resumed_from_step": step,
            "started_at": time.time(),
            "workers": sorted(everyone, key=lambda w: w["rank"]),
            "previous": previous,
        },
    )


def train_worker(args_dict: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train

    args = WorkerArgs(**args_dict)
    if not os.environ.get("SPD_RAY_VERBOSE"):
        # Ray Train logs every report and checkpoint at INFO; on the console the progress lines
        # say enough (its log files under the session's logs/train/ keep everything).
        for handler in logging.getLogger("ray.train").handlers:
            if handler.get_name() == "console":
                handler.setLevel(logging.WARNING)
    tune_malloc()
    torch.set_num_threads(worker_threads(args.threads))
    ctx_train = ray.train.get_context()
    rank, world = ctx_train.get_world_rank(), ctx_train.get_world_size()
    device = torch.device("cpu")
    if args.use_gpu:
        device = ray.train.torch.get_device()
    config = config_from_dict(args.config)
    remote = args.remote_run or None
    run_dir = RunDir(staging_dir(remote) if remote else Path(args.run_dir))
    name = run_dir.path.name
    target = load_target_once_per_node(
        config, Path(args.out_root), ctx_train.get_local_rank(), remote, run_dir
    )
    worker = build_worker(config, target, Path(args.out_root), device, rank, world)

    def on_start(state: LoopState) -> None:
        record_placement(run_dir, args.launch, rank, world, device, state.step)
        if rank == 0:
            if state.step:
                say(f"[{name}] resumed from step {state.step}")
            warn_missing_secrets(args.driver_secrets)
            say(
                f"[{name}] {world} worker(s) on {device}, {torch.get_num_threads()} torch "
                f"thread(s) each; rank 0 pid {os.getpid()}"
            )

    def open_reporter(start: int) -> RayReporter:
        return RayReporter(
            RunWriter(run_dir, config, start) if rank == 0 else None,
            name,
            rank,
            config.steps,
            min_interval_s=float(
                os.environ.get("SPD_RAY_REPORT_INTERVAL_S", args.report_interval_s)
            ),
            require=tuple(args.require),
            remote_run=remote,
        )

    # A non-finite loss is recorded in error.txt, which the driver reads; ending the worker
    # normally keeps Ray Train from retrying what would only repeat it.
    with contextlib.suppress(NonFiniteLossError):
        live_run(config, worker, run_dir, open_reporter, remote_run=remote, on_start=on_start)


def default_cpus_per_worker(workers: int, concurrent_runs: int = 1) -> float:
    """On a one-machine Ray the workers of all concurrent runs share its CPUs evenly; on a
    multi-node cluster each worker takes 1 CPU unless told otherwise."""
    import ray

    if not is_local_cluster():
        return 1.0
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1.0, float(int(cpus // (workers * concurrent_runs))))


def make_trainer(
    config: Config,
    run_dir: RunDir,
    out_root: Path,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    *,
    callbacks: list[Any] | None = None,
    require: tuple[str, ...] = (),
    report_interval_s: float = 30.0,
    lean: bool = False,
    placement: str | None = None,
    launch: str = "",
    remote_run: str | None = None,
) -> Any:
    """The TorchTrainer of one run: `workers` x `train_worker`, Ray's state under `<run>/ray/`.
    `lean` drops Ray Train's placement-group cleaner, an actor that only matters when the
    controller can die while its cluster lives on, and its autoscaling coordinator: pass it for
    a Ray this process started. `placement` is `pack` or `spread` (None: Ray Train's default)."""
    import ray.train

    return lean_trainer_class(own_ray=lean)(
        train_worker,
        train_loop_config=WorkerArgs(
            config=config.model_dump(mode="json"),
            run_dir=str(run_dir.path),
            out_root=str(out_root),
            threads=int(os.environ.get("SPD_RAY_THREADS", "0")),
            use_gpu=use_gpu,
            launch=launch,
            remote_run=remote_run or "",
            require=require,
            report_interval_s=report_interval_s,
            driver_secrets=driver_secrets(),
        ).__dict__,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_bundle(cpus_per_worker, use_gpu),
            placement_strategy=PLACEMENTS[placement or "pack"],
        ),
        run_config=ray.train.RunConfig(
            name=RAY_SUBDIR,
            storage_path=remote_run or str(run_dir.path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def worker_bundle(cpus_per_worker: float, use_gpu: bool) -> dict[str, float]:
    return {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}


def run_on_ray(
    config: Config,
    run_dir: RunDir,
    out_root: Path,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float | None,
    max_failures: int,
    placement: str | None = None,
    remote_run: str | None = None,
) -> None:
    """Fit one decomposition with a TorchTrainer; returns when the run finished or failed."""
    connect_ray()
    if cpus_per_worker is None:
        cpus_per_worker = default_cpus_per_worker(workers)
    (run_dir.path / ERROR_FILE).unlink(missing_ok=True)
    trainer = make_trainer(
        config,
        run_dir,
        out_root,
        workers,
        use_gpu,
        cpus_per_worker,
        max_failures,
        lean=started_local_ray(),
        placement=placement,
        launch=uuid.uuid4().hex,
        remote_run=remote_run,
    )
    from spd_ray.train.loop import NonFiniteLossError

    try:
        trainer.fit()
    except Exception as err:  # noqa: BLE001 - Ray's error types vary across versions
        raise RunFailedError(
            f"run {run_dir.path.name} failed (worker group restarted up to {max_failures} "
            f"times; the last checkpoint stays in {run_dir.path}): {_first_line(err)}"
        ) from err
    error = run_dir.path / ERROR_FILE
    if error.exists():
        raise NonFiniteLossError(error.read_text().strip())


class RunFailedError(RuntimeError):
    """A Ray Train run that ended without finishing (workers kept failing)."""


def _first_line(err: BaseException) -> str:
    cause: BaseException = err
    while cause.__cause__ is not None:
        cause = cause.__cause__
    lines = [ln for ln in str(cause).splitlines() if ln.strip()]
    return lines[-1].strip() if lines else type(cause).__name__
