"""Several runs at once (`spd-ray run a,b,c`, `spd-ray run --all`): one TorchTrainer each, as
many at a time as the cluster holds, each driven by a Ray task; a run that fails is reported in
the outcome table while the others go on."""

from __future__ import annotations

import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from spd_ray.capacity import capacity_for, require_gpus
from spd_ray.config import Config, config_from_dict
from spd_ray.errors import user_errors
from spd_ray.io import child
from spd_ray.objstore import check_reachable
from spd_ray.ray_session import DEFAULT_WAIT_TIMEOUT_S, connect_ray
from spd_ray.runs import RunDir, output_root
from spd_ray.storage import check_shared_root
from spd_ray.sync import fetch, remote_root, staging_dir, sync_down, sync_up
from spd_ray.train.lifecycle import Outcome, check_launch, claim, prepare_ray_run
from spd_ray.train.ray_driver import default_cpus_per_worker, run_on_ray, worker_bundle
from spd_ray.train.staged import staged_run
from spd_ray.train.worker import preflight


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
            except user_errors() as e:
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
