"""Run a decomposition on Ray Train: `TorchTrainer` over N workers, checkpoints through Ray, resume.

The driver validates the config, prepares the run directory and the (cached) target, then hands
every worker the same loop the in-process path runs (`spd_ray.train.loop.run_loop`). Rank 0 writes
the run directory; every rank reports to Ray at checkpoints (rank 0 with the checkpoint) and,
throttled, at log points. Rerunning with the same run directory resumes from the newest checkpoint -
Ray's, or the run directory's `checkpoint.pt` - on any number of workers.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure

from spd_ray.capacity import capacity_for
from spd_ray.config import USER_ERRORS, Config, config_from_dict
from spd_ray.io import child, write_json, write_text
from spd_ray.ray_session import (
    DEFAULT_WAIT_TIMEOUT_S,
    connect_ray,
    driver_secrets,
    here,
    is_local_cluster,
    require_gpus,
    say,
    started_local_ray,
    warn_missing_secrets,
    worker_threads,
)
from spd_ray.storage import check_shared_root
from spd_ray.sync import fetch, staging_dir, sync_down, sync_up
from spd_ray.train.rundir import RAY_SUBDIR, TARGET_COPY, RunDir, tune_malloc
from spd_ray.train.tracking import RunWriter

if TYPE_CHECKING:
    from spd_ray.train.run import Outcome  # noqa: F401

ERROR_FILE = "error.txt"
WORKERS_FILE = "workers.json"
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

    @staticmethod
    def _agree(decision: bool) -> bool:
        """Rank 0's decision on every rank: Train pairs the ranks' reports by their order, so all
        ranks must report at the same log points."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return decision
        flag = torch.tensor([1 if decision else 0], dtype=torch.int32)
        if dist.get_backend() == "nccl":
            flag = flag.cuda()
        dist.broadcast(flag, src=0)
        return bool(flag.item())

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
        if self._agree(ready and now - self.last_report >= self.min_interval_s):
            self._report(self._with_steps(step, self.last))
            self.last_report = time.monotonic()

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        if self.writer is not None:
            self.writer.figures(step, figures)

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

    from spd_ray.train.loop import NonFiniteLossError, run_loop
    from spd_ray.train.run import build_worker, resume_state, summarize

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
    state = resume_state(config, worker, run_dir, device)
    record_placement(run_dir, args.launch, rank, world, device, state.step)
    if rank == 0:
        if state.step:
            say(f"[{name}] resumed from step {state.step}")
        warn_missing_secrets(args.driver_secrets)
        say(
            f"[{name}] {world} worker(s) on {device}, {torch.get_num_threads()} torch thread(s) "
            f"each; rank 0 pid {os.getpid()}"
        )
    writer = RunWriter(run_dir, config, state.step) if rank == 0 else None
    reporter = RayReporter(
        writer,
        name,
        rank,
        config.steps,
        min_interval_s=float(os.environ.get("SPD_RAY_REPORT_INTERVAL_S", args.report_interval_s)),
        require=tuple(args.require),
        remote_run=remote,
    )
    t0 = time.perf_counter()
    summary: dict[str, Any] | None = None
    try:
        final_eval = run_loop(config, worker.ctx, state, reporter)
        if rank == 0:
            summary = summarize(run_dir, final_eval, time.perf_counter() - t0, world)
            run_dir.write_summary(summary)
    except NonFiniteLossError as err:
        # Retrying would only repeat it: record why and end the run; the last good checkpoint stays.
        if rank == 0:
            write_text(run_dir.path / ERROR_FILE, str(err) + "\n")
    finally:
        if writer is not None:
            writer.close(summary)
            if remote is not None:  # at the end, and when it failed
                sync_up(run_dir.path, remote)


def default_cpus_per_worker(workers: int, concurrent_runs: int = 1) -> float:
    """On a one-machine Ray the workers of all concurrent runs share its CPUs evenly; on a
    multi-node cluster each worker takes 1 CPU unless told otherwise."""
    import ray

    if not is_local_cluster():
        return 1.0
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1.0, float(int(cpus // (workers * concurrent_runs))))


def _fixed_policy_without_coordinator() -> type | None:
    """Ray Train's fixed-size scaling policy minus its autoscaling-coordinator client: on a Ray
    that lives and dies with this process there is no autoscaler to tell about a run's
    resources, yet the client starts Ray Data's `_AutoscalingCoordinatorActor` (one more process:
    ~1 s of CPU while the worker starts, ~0.3% of the machine while it trains). None when Ray's
    private classes moved."""
    try:
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    except ImportError:  # pragma: no cover - another Ray version
        return None
    hooks = ("after_controller_start", "_maybe_send_resource_request", "_send_resource_request")
    if not all(hasattr(FixedScalingPolicy, h) for h in hooks):  # pragma: no cover
        return None

    class LocalFixedScalingPolicy(FixedScalingPolicy):  # type: ignore[misc, valid-type]
        def after_controller_start(self, train_run_context: Any) -> None:
            pass  # no coordinator client; cancelling a request then does nothing

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

    return LocalFixedScalingPolicy


def lean_trainer_class(own_ray: bool) -> type:
    """`TorchTrainer` without the helper actors a run of ours never uses: Ray Train V2 starts a
    dataset manager even when no dataset is given; on a Ray this process started (`own_ray`),
    also no placement-group cleaner and no autoscaling coordinator (there is no autoscaler). Each
    is a Python process that imports Ray as it starts and takes ~0.3-0.5% of a core while idle -
    on a 2-core machine, time taken from the workers. Built on Ray's private callback and policy
    classes; when they move, the plain TorchTrainer (or its policy) is used."""
    from ray.train.torch import TorchTrainer

    try:
        from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
        from ray.train.v2._internal.callbacks.placement_group_callback import (
            PlacementGroupCleanerCallback,
        )
        from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy
    except ImportError:  # pragma: no cover - another Ray version
        return TorchTrainer
    if not hasattr(TorchTrainer, "_create_default_callbacks"):  # pragma: no cover
        return TorchTrainer
    unused: tuple[type, ...] = (DatasetsCallback,)
    local_policy = None
    if own_ray:
        unused += (PlacementGroupCleanerCallback,)
        local_policy = _fixed_policy_without_coordinator()

    class LeanTorchTrainer(TorchTrainer):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]
            if self.datasets:
                return callbacks
            return [cb for cb in callbacks if not isinstance(cb, unused)]

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            policy = kwargs.get("scaling_policy")
            if local_policy is not None and type(policy) is FixedScalingPolicy:
                kwargs["scaling_policy"] = local_policy(policy.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)  # type: ignore[misc]

    return LeanTorchTrainer


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


def _fit_remote(
    config_dict: dict[str, Any],
    run_dir: str,
    out_root: str,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    placement: str | None,
    remote_run: str | None,
) -> tuple[dict[str, float], float]:
    """One run of `run_many`, as a Ray task (holding no CPU itself) that drives a TorchTrainer;
    a run kept in a bucket is read back from there (the task may run on any node)."""
    t0 = time.perf_counter()
    rd = RunDir(Path(run_dir))
    config = config_from_dict(config_dict)
    run_on_ray(
        config,
        rd,
        Path(out_root),
        workers,
        use_gpu,
        cpus_per_worker,
        max_failures,
        placement,
        remote_run=remote_run,
    )
    if remote_run is not None:
        rd = RunDir(fetch(remote_run))
    return rd.read_summary()["final_eval"], time.perf_counter() - t0


def run_many(
    jobs: list[tuple[str, Config]],
    *,
    out: str | Path | None = None,
    fresh: bool = False,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    max_failures: int = 3,
    placement: str | None = None,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
) -> list[Outcome]:
    """Several runs (name, config), one TorchTrainer each, as many at once as the cluster's CPUs
    (or GPUs) allow. A run that fails - bad config, non-finite loss, too many worker failures -
    is reported as failed; the others go on."""

    from spd_ray.objstore import check_reachable
    from spd_ray.sync import remote_root
    from spd_ray.train.run import Outcome, check_launch, claim, preflight, prepare_ray_run
    from spd_ray.train.rundir import output_root
    from spd_ray.train.staged import staged_run

    uri = remote_root(out)
    if uri is not None:
        check_reachable(uri, "--out", write=True)
    root = output_root(out) if uri is None else staging_dir(uri)
    outcomes: dict[str, Outcome] = {}
    pending: list[tuple[Config, Outcome, str | None]] = []
    connect_ray()
    if use_gpu:
        require_gpus(workers, f"--workers {workers}")
    bundles = [worker_bundle(cpus_per_worker or default_cpus_per_worker(workers), use_gpu)]
    with ExitStack() as held:  # every run's lock, until all runs end
        # One run's workers must fit; the others queue behind it.
        held.enter_context(capacity_for(bundles * workers, f"--workers {workers}", wait_timeout_s))
        if uri is None:
            check_shared_root(root)
        for name, config in jobs:
            run_uri = None
            try:
                run_dir = RunDir(child(root, name, "--name"))
                check_launch(config, workers, max_failures)
                preflight(config)
                with ExitStack() as one:
                    if uri is not None:
                        run_uri = one.enter_context(staged_run(uri, name)).run_uri
                    one.enter_context(claim(run_dir))
                    outcome = prepare_ray_run(config, run_dir, root, fresh)
                    if run_uri is not None:
                        sync_up(run_dir.path, run_uri, delete=fresh)
                    held.enter_context(one.pop_all())
            except USER_ERRORS as e:
                outcomes[name] = Outcome(name, root / name, error=" ".join(str(e).split()))
                continue
            outcomes[name] = outcome
            if not outcome.already_finished:
                pending.append((config, outcome, run_uri))
        _run_pending(pending, root, workers, use_gpu, cpus_per_worker, max_failures, placement)
    return [outcomes[name] for name, _ in jobs]


def _run_pending(
    pending: list[tuple[Config, Outcome, str | None]],
    root: Path,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float | None,
    max_failures: int,
    placement: str | None,
) -> None:
    """The prepared runs of `run_many`, as many at once as the cluster allows."""
    import ray

    if not pending:
        return
    connect_ray()
    per_worker = cpus_per_worker or default_cpus_per_worker(workers, len(pending))
    resources = ray.cluster_resources()
    if use_gpu:
        slots = int(resources.get("GPU", 0) // workers)
    else:
        slots = int(resources.get("CPU", 1) // (workers * per_worker))
    slots = max(1, slots)
    fit = ray.remote(num_cpus=0, max_retries=0)(_fit_remote)
    running: dict[Any, tuple[Outcome, str | None]] = {}
    queue = list(pending)
    while queue or running:
        while queue and len(running) < slots:
            config, outcome, run_uri = queue.pop(0)
            ref = fit.remote(
                config.model_dump(mode="json"),
                str(outcome.run_dir),
                str(root),
                workers,
                use_gpu,
                per_worker,
                max_failures,
                placement,
                run_uri,
            )
            running[ref] = (outcome, run_uri)
        done, _ = ray.wait(list(running), num_returns=1)
        outcome, run_uri = running.pop(done[0])
        try:
            outcome.metrics, outcome.wall_s = ray.get(done[0])
        except Exception as err:  # noqa: BLE001 - recorded in the outcome table
            cause = getattr(err, "cause", None) or err
            outcome.error = " ".join(str(cause).split())[:300] or type(cause).__name__
        if run_uri is not None:  # this machine's staging copy, as the bucket has it now
            sync_down(run_uri, outcome.run_dir)


def format_outcomes(outcomes: list[Outcome]) -> str:
    """The table `spd-ray run a,b,...` prints: one line per run."""
    rows = [("run", "outcome", "wall s", "run directory")]
    for o in outcomes:
        status = o.status if o.error is None else f"failed: {o.error}"
        rows.append((o.name, status, f"{o.wall_s:.0f}", str(o.run_dir)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}" for r in rows
    )
