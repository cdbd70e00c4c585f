"""`spd-ray sweep`: a Ray Tune experiment over a search space, resumable by rerunning it.

Layout of `<out>/<sweep name>/`:
- `sweep.json`: what was asked (experiment, space, objectives, ...); a rerun must match it.
- `.lock`: held by the live `spd-ray sweep` (pid, host, command), so a second one stops at once.
- `trials/<trial id>/`: each trial's run directory (the run contract: config.yaml, metrics.jsonl,
  summary.json, workers.json, tb/ events, checkpoint.pt), so `load_run` and TensorBoard work on it.
- `tune/`: Ray Tune's experiment state (`Tuner.restore` continues from it).
- `study.db`: the Optuna study (SQLite; `optuna-dashboard sqlite:///.../study.db`).
- `results.csv` (+ parquet), `best.yaml` or `pareto_<i>.yaml`, `objectives.png`: replaced
  atomically as trials finish and at the end (`sweep-status` never reads a partial table).

Search: a space made only of `values` leaves runs as a grid (Tune's variant generator, every
combination once). Otherwise Optuna's TPE sampler picks `--trials` configs - multi-objective when
several objectives are given - optionally with ASHA early stopping (one objective only) on the
training step. A trial with one worker runs the training loop inside the Tune trial; a trial with
several workers drives its own `TorchTrainer` and forwards its reports with `TuneReportCallback`.
Trials hold fractional CPUs so that trials x workers fit the cluster (ray-notes: a Tune trial that
reserves a CPU and then asks for Train workers deadlocks on 2 CPUs).

On a multi-node cluster trials land on any node, so the output root must be one every node sees
(checked before the first trial). Each trial records where it runs in its `workers.json`, which
the table's `node_id` and `hostname` columns show. A node that dies takes only its running trials
with it: Tune restarts each once (`FailureConfig`) on a node that is left, and the restarted trial
resumes from the newest checkpoint in its run directory.
"""

from __future__ import annotations

import json
import math
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from spd_ray.config import Config, ConfigError, config_from_dict
from spd_ray.io import Lock, child, write_json, write_text
from spd_ray.ray_session import DEFAULT_WAIT_TIMEOUT_S
from spd_ray.sweep.results import (
    Objective,
    TrialRow,
    format_table,
    make_row,
    plot_objectives,
    read_table,
    write_best_configs,
    write_table,
)
from spd_ray.sweep.space import SearchSpace, load_space
from spd_ray.sweep.trials import trial_config, validate_space
from spd_ray.train.rundir import RunDir, output_root

SPEC_FILE = "sweep.json"
LOCK_FILE = ".lock"
TABLE = "results.csv"
TUNE_SUBDIR = "tune"
DEFAULT_OBJECTIVES: list[Objective] = [
    ("eval/loss/StochasticReconLoss", "min"),
    ("eval/l0/total", "min"),
]


@dataclass
class SweepSpec:
    """Everything that defines a sweep; stored in sweep.json and checked on resume."""

    experiment: str
    target: str
    space_file: str
    space: dict[str, Any]  # the parsed leaves, {dotted key: description}
    overrides: list[str]
    objectives: list[tuple[str, str]]
    trials: int
    concurrent: int
    workers_per_trial: int
    gpu: bool
    scheduler: str
    seed: int
    base_config: dict[str, Any] = field(default_factory=dict)

    # Fields a rerun may not change (they define which trials exist and what they mean).
    FIXED = ("experiment", "space", "overrides", "objectives", "trials", "scheduler", "seed")

    def objective_list(self) -> list[Objective]:
        return [(m, d) for m, d in self.objectives]  # type: ignore[misc]


def _describe_space(space: SearchSpace) -> dict[str, Any]:
    return {k: repr(p) for k, p in space.params.items()}


def _check_resume(old: dict[str, Any], new: SweepSpec, path: Path) -> None:
    for key in SweepSpec.FIXED:
        a, b = old.get(key), json.loads(json.dumps(getattr(new, key)))
        if a != b:
            raise ConfigError(
                f"{path} is a sweep with a different {key} ({a!r}, now {b!r}); "
                "rerun it with the same settings to resume, or use another --name"
            )


# ---------------------------------------------------------------------------------------------
# The trial
# ---------------------------------------------------------------------------------------------


def _trial_run_dir(sweep_dir: Path, trial_id: str) -> RunDir:
    return RunDir(sweep_dir / "trials" / trial_id)


def sweep_trial(
    params: dict[str, Any], spec: dict[str, Any], sweep_dir: str, cpus: float, launch: str = ""
) -> None:
    """One Tune trial: the base config with `params`, trained in its own run directory; `cpus`
    is what the trial (one worker) or each of its Train workers holds. The sweep's lock covers
    its trials; a restarted trial resumes like any run (`resume_state`). `launch` names the
    sweep driver's start, so `workers.json` counts the restarts of a trial within it."""
    from ray import tune

    from spd_ray.targets import load_target, target_fingerprint
    from spd_ray.train.loop import NonFiniteLossError, run_loop
    from spd_ray.train.ray_driver import ERROR_FILE, RayReporter, record_placement
    from spd_ray.train.run import build_worker, copy_target_file, open_run, resume_state, summarize
    from spd_ray.train.rundir import tune_malloc
    from spd_ray.train.tracking import RunWriter

    s = SweepSpec(**spec)
    config = trial_config(config_from_dict(s.base_config), params)
    trial_id = tune.get_context().get_trial_id()
    run_dir = _trial_run_dir(Path(sweep_dir), trial_id)
    root = Path(sweep_dir).parent
    if s.workers_per_trial > 1:
        run_dir.init(config)
        copy_target_file(config, root, run_dir)
        _trial_on_train(config, run_dir, root, s, cpus, launch)
        return

    tune_malloc()
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if s.gpu and torch.cuda.is_available() else "cpu")
    target = load_target(config, root, progress=False)
    fingerprint = target_fingerprint(target)
    worker = build_worker(config, target, root, device)
    open_run(config, run_dir, root, fingerprint, fresh=False)
    state = resume_state(config, worker, run_dir, device)
    if run_dir.finished() and state.step >= config.steps:
        done = run_dir.read_summary()
        tune.report({"step": state.step, **done["final_eval"]})
        return
    record_placement(run_dir, launch, 0, 1, device, state.step)
    writer = RunWriter(run_dir, config, state.step)
    objectives = tuple(m for m, _ in s.objectives)
    # Every log point reports (a function trial's report is cheap), so ASHA sees every rung.
    reporter = RayReporter(
        writer, trial_id, 0, config.steps, 0.0, tune.report, quiet=True, require=objectives
    )
    t0 = time.perf_counter()
    summary: dict[str, Any] | None = None
    try:
        final = run_loop(config, worker.ctx, state, reporter)
        summary = summarize(run_dir, final, time.perf_counter() - t0, 1)
        run_dir.write_summary(summary)
    except NonFiniteLossError as err:
        write_text(run_dir.path / ERROR_FILE, str(err) + "\n")
        raise
    finally:
        writer.close(summary)


def _trial_on_train(
    config: Config, run_dir: RunDir, root: Path, s: SweepSpec, cpus: float, launch: str
) -> None:
    """A several-worker trial: its own TorchTrainer, reports forwarded to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from spd_ray.train.ray_driver import make_trainer

    trainer = make_trainer(
        config,
        run_dir,
        root,
        s.workers_per_trial,
        s.gpu,
        cpus,
        max_failures=1,
        callbacks=[TuneReportCallback()],
        require=tuple(m for m, _ in s.objectives),
        report_interval_s=1.0,
        launch=launch,
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# Results
# ---------------------------------------------------------------------------------------------


def _row(
    sweep_dir: Path,
    trial_id: str,
    params: dict[str, Any],
    last: dict[str, Any],
    failed: bool,
) -> TrialRow:
    """A table row: the final eval metrics when the trial finished, else its last report."""
    run_dir = _trial_run_dir(sweep_dir, trial_id)
    node_id, hostname = _placement(run_dir)
    if run_dir.finished():
        summary = run_dir.read_summary()
        return make_row(
            trial_id,
            "finished",
            params,
            summary["final_eval"],
            summary["final_step"],
            str(run_dir.path),
            node_id,
            hostname,
        )
    status = "error" if failed else "stopped early"
    metrics = {k: v for k, v in last.items() if "/" in k}
    step = int(last.get("step", 0))
    return make_row(trial_id, status, params, metrics, step, str(run_dir.path), node_id, hostname)


def _placement(run_dir: RunDir) -> tuple[str | None, str | None]:
    """(node ids, host names) of the trial's latest start, from its `workers.json`: each
    distinct one in rank order, comma-separated; (None, None) before the trial started."""
    from spd_ray.train.ray_driver import WORKERS_FILE

    path = run_dir.path / WORKERS_FILE
    if not path.exists():
        return None, None
    workers = json.loads(path.read_text())["workers"]
    nodes = ",".join(dict.fromkeys(str(w["node_id"]) for w in workers))
    hosts = ",".join(dict.fromkeys(str(w["hostname"]) for w in workers))
    return nodes, hosts


def write_results(sweep_dir: Path, rows: list[TrialRow], spec: SweepSpec) -> None:
    """The table, the best config(s) and the objective plot, from the rows so far."""
    objectives = spec.objective_list()
    write_table(rows, sweep_dir / TABLE)
    scored = [
        r for r in rows if all(math.isfinite(r["metrics"].get(m, math.nan)) for m, _ in objectives)
    ]
    if scored:
        base = config_from_dict(spec.base_config)
        write_best_configs(rows, objectives, base, sweep_dir)
        plot_objectives(rows, objectives, sweep_dir / "objectives.png")


def _table_callback(sweep_dir: Path, spec: SweepSpec) -> Any:
    from ray import tune

    class TableCallback(tune.Callback):  # type: ignore[misc]
        """Rewrites the results as each trial ends, so `sweep-status` shows them mid-sweep."""

        def _write(self, trials: list[Any], ended: Any, failed: bool) -> None:
            rows = [
                _row(
                    sweep_dir,
                    t.trial_id,
                    dict(t.config or {}),
                    dict(t.last_result or {}),
                    failed if t is ended else t.status == "ERROR",
                )
                for t in trials
                if t is ended or t.status in ("TERMINATED", "ERROR")
            ]
            write_results(sweep_dir, rows, spec)

        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **_: Any
        ) -> None:
            self._write(trials, trial, failed=False)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **_: Any) -> None:
            self._write(trials, trial, failed=True)

    return TableCallback()


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


@dataclass
class SweepOutcome:
    sweep_dir: Path
    rows: list[TrialRow]
    complete: bool


def _check_args(
    trials: int,
    concurrent: int | None,
    workers_per_trial: int,
    steps: int | None,
    objectives: list[Objective],
    scheduler: str,
) -> None:
    """Every argument, before anything is written: a bad one must not leave a half-made sweep."""
    for flag, value in (("--trials", trials), ("--workers-per-trial", workers_per_trial)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{flag} must be an integer >= 1, not {value!r}")
    for flag, maybe in (("--concurrent", concurrent), ("--steps", steps)):
        if maybe is not None and (
            isinstance(maybe, bool) or not isinstance(maybe, int) or maybe < 1
        ):
            raise ValueError(f"{flag} must be an integer >= 1 (or left out), not {maybe!r}")
    if scheduler not in ("asha", "none"):
        raise ValueError(f"--scheduler must be asha or none, not {scheduler!r}")
    if not objectives:
        raise ValueError("--objective: at least one objective is needed")
    for metric, direction in objectives:
        if not metric or direction not in ("min", "max"):
            raise ValueError(f"--objective {metric}:{direction}: expected <metric>:min or :max")
    metrics = [m for m, _ in objectives]
    if len(set(metrics)) != len(metrics):
        raise ValueError(f"--objective: a metric is given twice ({', '.join(metrics)})")
    if scheduler == "asha" and len(objectives) > 1:
        raise ValueError(
            "--scheduler asha needs exactly one --objective (ASHA ranks on one metric)"
        )


def _save_spec(path: Path, spec: SweepSpec) -> bool:
    """Check a rerun against the stored spec, and (re)write it only when it is new or changed, so
    a plain rerun leaves sweep.json as it was. Returns True when it wrote."""
    data = json.loads(json.dumps(asdict(spec)))
    if path.exists():
        old = json.loads(path.read_text())
        _check_resume(old, spec, path)
        if old == data:
            return False
    write_json(path, data)
    return True


def run_sweep(
    target: str,
    space_file: str | Path,
    *,
    name: str | None = None,
    out: str | Path | None = None,
    trials: int = 8,
    concurrent: int | None = None,
    workers_per_trial: int = 1,
    gpu: bool = False,
    steps: int | None = None,
    overrides: list[str] | None = None,
    objectives: list[Objective] | None = None,
    scheduler: str = "none",
    seed: int = 0,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
) -> SweepOutcome:
    """A sweep of `target` over the space in `space_file`, resumable by name. The cluster must
    be able to hold one trial's workers (an autoscaler gets `wait_timeout_s` to add nodes)."""
    from spd_ray.capacity import capacity_for
    from spd_ray.ray_session import cluster_address, connect_ray, require_gpus
    from spd_ray.registry import load_experiment
    from spd_ray.storage import check_shared_root
    from spd_ray.sync import remote_root
    from spd_ray.targets import load_target
    from spd_ray.train.run import default_run_name, preflight

    if remote_root(out) is not None:
        raise NotImplementedError(
            f"--out {out or os.environ.get('SPD_RAY_OUT')}: sweeps keep their trials on a "
            "filesystem every node mounts; object storage is for runs (spd-ray run --out s3://...)"
        )
    root = output_root(out)
    if name is not None:
        child(root, name, "--name")
    objectives = list(objectives or DEFAULT_OBJECTIVES)
    _check_args(trials, concurrent, workers_per_trial, steps, objectives, scheduler)
    extra = [*(overrides or []), *([f"steps={steps}"] if steps is not None else [])]
    experiment, base = load_experiment(target, extra)
    if base.batch_size % workers_per_trial:
        raise ValueError(
            f"batch_size {base.batch_size} is not divisible by --workers-per-trial "
            f"{workers_per_trial}"
        )
    space = load_space(space_file, experiment)
    validate_space(base, space)
    preflight(base)
    sweep_name = name or f"sweep-{default_run_name(experiment)}"
    sweep_dir = child(root, sweep_name, "--name")
    spec = SweepSpec(
        experiment=experiment,
        target=str(target),
        space_file=str(space_file),
        space=_describe_space(space),
        overrides=extra,
        objectives=[list(o) for o in objectives],  # type: ignore[misc]
        trials=space.grid_size if space.is_grid else trials,
        concurrent=concurrent or 0,
        workers_per_trial=workers_per_trial,
        gpu=gpu,
        scheduler=scheduler,
        seed=seed,
        base_config=base.model_dump(mode="json"),
    )
    if gpu:
        # Before any file: without GPUs the trials would wait in Tune's queue forever.
        connect_ray()
        require_gpus(_gpus_needed(spec), "the sweep")
    bundles = []
    if cluster_address() is not None:  # a private local Ray splits its CPUs to fit the trials
        connect_ray()
        bundles = _trial_bundles(spec)
    what = f"--workers-per-trial {workers_per_trial}"
    with (
        capacity_for(bundles, what, wait_timeout_s),
        Lock(sweep_dir / LOCK_FILE, f"sweep {sweep_name}"),
    ):
        _save_spec(sweep_dir / SPEC_FILE, spec)
        # Trials write their run directories on whichever node they land: before the target
        # and any trial, the root must be one every node sees.
        connect_ray()
        check_shared_root(root)
        load_target(base, root)  # train (or find) the target once, before the trials
        return _fit(spec, space, sweep_dir, sweep_name)


def _trial_bundles(spec: SweepSpec) -> list[dict[str, float]]:
    """What one trial's workers hold on a multi-node cluster (1 CPU each, and a GPU with --gpu);
    nothing to check on one machine, where trials share its CPUs in fractions that always fit."""
    from spd_ray.ray_session import is_local_cluster
    from spd_ray.train.ray_driver import worker_bundle

    if is_local_cluster():
        return []
    return [worker_bundle(1.0, spec.gpu)] * spec.workers_per_trial


def _gpus_needed(spec: SweepSpec) -> int:
    """GPUs the smallest trial holds: one per Train worker, or one for a single-worker trial."""
    return spec.workers_per_trial if spec.workers_per_trial > 1 else 1


def _fit(spec: SweepSpec, space: SearchSpace, sweep_dir: Path, sweep_name: str) -> SweepOutcome:
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from spd_ray.ray_session import connect_ray, is_local_cluster

    connect_ray()
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    concurrent = spec.concurrent or max(1, int(cluster_cpus // spec.workers_per_trial))
    concurrent = min(concurrent, spec.trials)
    # Fractional CPUs: trials x workers always fit the cluster, so nothing waits on itself.
    local = is_local_cluster()
    per_worker = cluster_cpus / (concurrent * spec.workers_per_trial) if local else 1.0
    trainable: Any = tune.with_parameters(
        sweep_trial,
        spec=asdict(spec),
        sweep_dir=str(sweep_dir),
        cpus=per_worker,
        launch=uuid.uuid4().hex,
    )
    if spec.workers_per_trial > 1:
        # The trial only drives a TorchTrainer; its workers hold the CPUs.
        trainable = tune.with_resources(trainable, {"CPU": 0, "memory": 1e6})
    else:
        resources = {"CPU": per_worker, **({"GPU": 1} if spec.gpu else {})}
        trainable = tune.with_resources(trainable, resources)

    objectives = spec.objective_list()
    metric: str | list[str] = [m for m, _ in objectives]
    mode: str | list[str] = [d for _, d in objectives]
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
    tune_dir = sweep_dir / TUNE_SUBDIR
    run_config = tune.RunConfig(
        name=TUNE_SUBDIR,
        storage_path=str(sweep_dir),
        callbacks=[_table_callback(sweep_dir, spec)],
        failure_config=tune.FailureConfig(max_failures=1),
        checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
        verbose=1,
    )
    if tune.Tuner.can_restore(str(tune_dir)):
        print(f"resuming sweep {sweep_name} from {tune_dir}", flush=True)
        tuner = tune.Tuner.restore(
            str(tune_dir), trainable=trainable, resume_errored=True, resume_unfinished=True
        )
    else:
        search_alg: Any = None
        param_space: dict[str, Any]
        if space.is_grid:
            param_space, num_samples = space.to_tune(), 1
        else:
            sampler = (
                optuna.samplers.TPESampler(seed=spec.seed, multivariate=True)
                if len(objectives) == 1
                else optuna.samplers.TPESampler(seed=spec.seed)
            )
            storage = optuna.storages.RDBStorage(f"sqlite:///{sweep_dir / 'study.db'}")
            search_alg = OptunaSearch(
                space=space.sample_optuna,
                metric=metric,
                mode=mode,
                sampler=sampler,
                study_name=sweep_name,
                storage=storage,
            )
            param_space, num_samples = {}, spec.trials
        scheduler = None
        if spec.scheduler == "asha":
            base = config_from_dict(spec.base_config)
            scheduler = ASHAScheduler(
                time_attr="rung_step",  # absent from the final reports: no stop at the end
                max_t=base.steps,
                grace_period=max(1, base.steps // 4),
                reduction_factor=2,
            )
        tuner = tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=tune.TuneConfig(
                # Only ASHA reads these (one objective); OptunaSearch carries its own.
                metric=metric if isinstance(metric, str) and scheduler is not None else None,
                mode=mode if isinstance(mode, str) and scheduler is not None else None,
                search_alg=search_alg,
                scheduler=scheduler,
                num_samples=num_samples,
                max_concurrent_trials=concurrent,
                trial_name_creator=lambda t: t.trial_id,
                trial_dirname_creator=lambda t: t.trial_id,
            ),
            run_config=run_config,
        )
    grid = tuner.fit()
    rows = []
    for i in range(len(grid)):
        result = grid[i]
        last = dict(result.metrics or {})
        trial_id = str(last.get("trial_id") or Path(result.path).name)
        params = dict(result.config or {})
        rows.append(_row(sweep_dir, trial_id, params, last, failed=result.error is not None))
    rows.sort(key=lambda r: r["trial_id"])
    if rows:
        write_results(sweep_dir, rows, spec)
    ended = sum(r["status"] in ("finished", "stopped early") for r in rows)
    return SweepOutcome(sweep_dir, rows, complete=ended >= spec.trials)


def _rows_from_dir(sweep_dir: Path) -> list[TrialRow]:
    table = sweep_dir / TABLE
    return read_table(table) if table.exists() else []


def sweep_status(name: str, out: str | Path | None = None) -> str:
    from spd_ray.sync import remote_root

    if remote_root(out) is not None:
        raise NotImplementedError(f"--out {out}: sweeps are not kept in object storage")
    sweep_dir = child(output_root(out), name, "name")
    spec_path = sweep_dir / SPEC_FILE
    if not spec_path.exists():
        raise FileNotFoundError(f"no sweep {name!r} under {sweep_dir.parent} ({SPEC_FILE} missing)")
    spec = SweepSpec(**json.loads(spec_path.read_text()))
    rows = _rows_from_dir(sweep_dir)
    head = f"sweep {name}: {len(rows)}/{spec.trials} trials ended ({sweep_dir})"
    if not rows:
        return head
    return head + "\n" + format_table(rows, spec.objective_list())
