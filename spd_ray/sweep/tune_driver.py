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
(checked before the first trial) or an object store: `--out s3://bucket/prefix` keeps the same
layout under `<prefix>/<sweep name>/`, with Tune's storage in the bucket and a lease object beside
the local `.lock` (who sends what, and when: `spd_ray.sweep.place`). Each trial records where it
runs in its `workers.json`, which the table's `node_id` and `hostname` columns show. A node that
dies takes only its running trials with it: Tune restarts each once (`FailureConfig`) on a node
that is left, and the restarted trial resumes from the newest checkpoint in its run directory.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
import uuid
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from spd_ray.config import ConfigError, config_from_dict
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import Lock, check_name, child, write_json
from spd_ray.objstore import join
from spd_ray.ray_session import DEFAULT_WAIT_TIMEOUT_S
from spd_ray.runs import output_root
from spd_ray.sweep.place import SPEC_FILE, STUDY_FILE, TUNE_SUBDIR, SweepPlace
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
from spd_ray.sweep.spec import SweepSpec
from spd_ray.sweep.trial_run import sweep_trial
from spd_ray.sweep.trials import validate_space

LOCK_FILE = ".lock"
TABLE = "results.csv"
STUDY_SYNC_S = 2.0  # a bucket gets the Optuna study at most this often while trials report
DEFAULT_OBJECTIVES: list[Objective] = [
    ("eval/loss/StochasticReconLoss", "min"),
    ("eval/l0/total", "min"),
]


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
# Results
# ---------------------------------------------------------------------------------------------


def _row(
    place: SweepPlace,
    trial_id: str,
    params: dict[str, Any],
    last: dict[str, Any],
    failed: bool,
) -> TrialRow:
    """A table row: the final eval metrics when the trial finished, else its last report."""
    from spd_ray.runs import SUMMARY, WORKERS_FILE

    node_id, hostname = _placement(place.trial_file(trial_id, WORKERS_FILE))
    where = place.trial_location(trial_id)
    done = place.trial_file(trial_id, SUMMARY)
    if done is not None:
        summary = json.loads(done)
        return make_row(
            trial_id,
            "finished",
            params,
            summary["final_eval"],
            summary["final_step"],
            where,
            node_id,
            hostname,
        )
    status = "error" if failed else "stopped early"
    metrics = {k: v for k, v in last.items() if "/" in k}
    step = int(last.get("step", 0))
    return make_row(trial_id, status, params, metrics, step, where, node_id, hostname)


def _placement(workers_json: bytes | None) -> tuple[str | None, str | None]:
    """(node ids, host names) of the trial's latest start, from its `workers.json`: each
    distinct one in rank order, comma-separated; (None, None) before the trial started."""
    if workers_json is None:
        return None, None
    workers = json.loads(workers_json)["workers"]
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


def _table_callback(place: SweepPlace, spec: SweepSpec) -> Any:
    from ray import tune

    class TableCallback(tune.Callback):  # type: ignore[misc]
        """Rewrites the results as each trial ends, so `sweep-status` shows them mid-sweep. For a
        sweep in a bucket it also sends the driver's files: after each trial ends, and when the
        Optuna study changed (at once for a new trial, so Tune's saved state never names a trial
        the stored study lacks; at most every `STUDY_SYNC_S` for reports). Tune pickles its
        callbacks and a restored sweep gets them back, so this holds only plain data."""

        def __init__(self) -> None:
            self.rows: dict[str, TrialRow] = {}  # ended trials' rows, which no longer change
            self.study: tuple[int, int] | None = None  # (size, mtime) of study.db when sent
            self.sent_at = 0.0
            self.trials = 0

        def _write(self, trials: list[Any], ended: Any, failed: bool) -> None:
            for t in trials:
                if t.trial_id not in self.rows and (
                    t is ended or t.status in ("TERMINATED", "ERROR")
                ):
                    self.rows[t.trial_id] = _row(
                        place,
                        t.trial_id,
                        dict(t.config or {}),
                        dict(t.last_result or {}),
                        failed if t is ended else t.status == "ERROR",
                    )
            ids = {t.trial_id for t in trials}
            write_results(place.dir, [r for i, r in self.rows.items() if i in ids], spec)
            self._send()

        def _send(self) -> None:
            study = place.dir / STUDY_FILE
            self.study = (st.st_size, st.st_mtime_ns) if (st := _stat(study)) else None
            self.sent_at = time.monotonic()
            place.send()

        def on_trial_complete(
            self, iteration: int, trials: list[Any], trial: Any, **_: Any
        ) -> None:
            self._write(trials, trial, failed=False)

        def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **_: Any) -> None:
            self._write(trials, trial, failed=True)

        def on_step_end(self, iteration: int, trials: list[Any], **_: Any) -> None:
            if place.uri is None:
                return
            st = _stat(place.dir / STUDY_FILE)
            if st is None or (st.st_size, st.st_mtime_ns) == self.study:
                return
            new_trial = len(trials) != self.trials
            self.trials = len(trials)
            if new_trial or time.monotonic() - self.sent_at >= STUDY_SYNC_S:
                self._send()

    return TableCallback()


def _stat(path: Path) -> Any:
    """`path`'s stat, or None when it does not exist."""
    try:
        return path.stat()
    except FileNotFoundError:
        return None


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
            raise InputError(f"{flag} must be an integer >= 1, not {value!r}")
    for flag, maybe in (("--concurrent", concurrent), ("--steps", steps)):
        if maybe is not None and (
            isinstance(maybe, bool) or not isinstance(maybe, int) or maybe < 1
        ):
            raise InputError(f"{flag} must be an integer >= 1 (or left out), not {maybe!r}")
    if scheduler not in ("asha", "none"):
        raise InputError(f"--scheduler must be asha or none, not {scheduler!r}")
    if not objectives:
        raise InputError("--objective: at least one objective is needed")
    for metric, direction in objectives:
        if not metric or direction not in ("min", "max"):
            raise InputError(f"--objective {metric}:{direction}: expected <metric>:min or :max")
    metrics = [m for m, _ in objectives]
    if len(set(metrics)) != len(metrics):
        raise InputError(f"--objective: a metric is given twice ({', '.join(metrics)})")
    if scheduler == "asha" and len(objectives) > 1:
        raise InputError(
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
    be able to hold one trial's workers (an autoscaler gets `wait_timeout_s` to add nodes). An
    object-store `out` keeps the sweep in the bucket (`spd_ray.sweep.place`)."""
    from spd_ray.capacity import capacity_for, require_gpus
    from spd_ray.lease import RemoteLease
    from spd_ray.objstore import check_reachable
    from spd_ray.ray_session import cluster_address, connect_ray
    from spd_ray.registry import load_experiment
    from spd_ray.storage import check_shared_root
    from spd_ray.sync import remote_root
    from spd_ray.targets import load_target
    from spd_ray.train.run import default_run_name
    from spd_ray.train.worker import preflight

    uri = remote_root(out)
    root = output_root(out) if uri is None else None
    if name is not None:
        check_name(name, "--name") if root is None else child(root, name, "--name")
    objectives = list(objectives or DEFAULT_OBJECTIVES)
    _check_args(trials, concurrent, workers_per_trial, steps, objectives, scheduler)
    extra = [*(overrides or []), *([f"steps={steps}"] if steps is not None else [])]
    experiment, base = load_experiment(target, extra)
    if base.batch_size % workers_per_trial:
        raise InputError(
            f"batch_size {base.batch_size} is not divisible by --workers-per-trial "
            f"{workers_per_trial}"
        )
    space = load_space(space_file, experiment)
    validate_space(base, space)
    preflight(base)
    sweep_name = name or f"sweep-{default_run_name(experiment)}"
    if root is not None:
        child(root, sweep_name, "--name")
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
    if uri is not None:  # seconds, one line, before any file
        check_reachable(uri, "--out", write=True)
    place = SweepPlace(uri or str(root), sweep_name)
    if gpu:
        # Before any file: without GPUs the trials would wait in Tune's queue forever.
        connect_ray()
        require_gpus(_gpus_needed(spec), "the sweep")
    bundles = []
    if cluster_address() is not None:  # a private local Ray splits its CPUs to fit the trials
        connect_ray()
        bundles = _trial_bundles(spec)
    what = f"--workers-per-trial {workers_per_trial}"
    with ExitStack() as held:
        held.enter_context(capacity_for(bundles, what, wait_timeout_s))
        if place.uri is not None:  # one driver per sweep in the bucket, before anything moves
            held.enter_context(RemoteLease(place.uri))
            place.fetch()  # a rerun resumes from the bucket, on any machine
        held.enter_context(Lock(place.dir / LOCK_FILE, f"sweep {sweep_name}"))
        try:
            _save_spec(place.dir / SPEC_FILE, spec)
            place.send()
            # Trials write their run directories on whichever node they land: before the target
            # and any trial, the root must be one every node sees (a bucket is).
            connect_ray()
            if place.uri is None:
                check_shared_root(place.local_root)
            place.fetch_target(base)
            load_target(base, place.local_root)  # train (or find) the target once, first
            place.publish_target(base)
            return _fit(spec, space, place)
        finally:
            place.send()  # at the end, and when it failed


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


def _fit(spec: SweepSpec, space: SearchSpace, place: SweepPlace) -> SweepOutcome:
    from ray import tune

    from spd_ray.objstore import remote_fs
    from spd_ray.ray_session import connect_ray

    connect_ray()
    trainable, concurrent = _trainable(spec, place)
    # Tune's state in the sweep's tune/: on a bucket through the same filesystem (endpoint,
    # retries) the rest of spd-ray uses, so `Tuner.restore` reads it back from there.
    storage_fs: Any = None
    storage_path = str(place.dir)
    if place.uri is not None:
        storage_fs, storage_path = remote_fs(place.uri)
    tune_dir = f"{storage_path}/{TUNE_SUBDIR}"
    if tune.Tuner.can_restore(tune_dir, storage_filesystem=storage_fs):
        print(f"resuming sweep {place.name} from {place.shown}/{TUNE_SUBDIR}", flush=True)
        tuner = tune.Tuner.restore(
            tune_dir,
            trainable=trainable,
            resume_errored=True,
            resume_unfinished=True,
            storage_filesystem=storage_fs,
        )
    else:
        run_config = tune.RunConfig(
            name=TUNE_SUBDIR,
            storage_path=storage_path,
            storage_filesystem=storage_fs,
            callbacks=[_table_callback(place, spec)],
            failure_config=tune.FailureConfig(max_failures=1),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=1),
            verbose=1,
        )
        tuner = _new_tuner(spec, space, place, trainable, concurrent, run_config)
    return _outcome(spec, place, tuner.fit())


def _trainable(spec: SweepSpec, place: SweepPlace) -> tuple[Any, int]:
    """`sweep_trial` with its resources, and how many trials run at once."""
    import ray
    from ray import tune

    from spd_ray.ray_session import is_local_cluster

    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    concurrent = spec.concurrent or max(1, int(cluster_cpus // spec.workers_per_trial))
    concurrent = min(concurrent, spec.trials)
    # Fractional CPUs: trials x workers always fit the cluster, so nothing waits on itself.
    local = is_local_cluster()
    per_worker = cluster_cpus / (concurrent * spec.workers_per_trial) if local else 1.0
    trainable: Any = tune.with_parameters(
        sweep_trial,
        spec=asdict(spec),
        place=place,
        cpus=per_worker,
        launch=uuid.uuid4().hex,
    )
    if spec.workers_per_trial > 1:
        # The trial only drives a TorchTrainer; its workers hold the CPUs.
        return tune.with_resources(trainable, {"CPU": 0, "memory": 1e6}), concurrent
    resources = {"CPU": per_worker, **({"GPU": 1} if spec.gpu else {})}
    return tune.with_resources(trainable, resources), concurrent


def _new_tuner(
    spec: SweepSpec,
    space: SearchSpace,
    place: SweepPlace,
    trainable: Any,
    concurrent: int,
    run_config: Any,
) -> Any:
    """A fresh Tuner: a grid, or Optuna's TPE (its study kept with the sweep); ASHA if asked."""
    import optuna
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from spd_ray.sweep.study import SweepStudyStorage

    objectives = spec.objective_list()
    metric: str | list[str] = [m for m, _ in objectives]
    mode: str | list[str] = [d for _, d in objectives]
    if len(objectives) == 1:
        metric, mode = metric[0], mode[0]
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
        search_alg = OptunaSearch(
            space=space.sample_optuna,
            metric=metric,
            mode=mode,
            sampler=sampler,
            study_name=place.name,
            storage=SweepStudyStorage(place),
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
    return tune.Tuner(
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


def _outcome(spec: SweepSpec, place: SweepPlace, grid: Any) -> SweepOutcome:
    """The results table of a finished `Tuner.fit`, written beside the sweep."""
    rows = []
    for i in range(len(grid)):
        result = grid[i]
        last = dict(result.metrics or {})
        trial_id = str(last.get("trial_id") or Path(result.path).name)
        params = dict(result.config or {})
        rows.append(_row(place, trial_id, params, last, failed=result.error is not None))
    rows.sort(key=lambda r: r["trial_id"])
    if rows:
        write_results(place.dir, rows, spec)
    ended = sum(r["status"] in ("finished", "stopped early") for r in rows)
    return SweepOutcome(place.dir, rows, complete=ended >= spec.trials)


def sweep_status(name: str, out: str | Path | None = None) -> str:
    """The results so far of the sweep `name` under `out`, or of the sweep at `name` when it is
    an object-store URI (`s3://bucket/prefix/sweep`). A sweep in a bucket is read from there:
    sweep.json and the table, nothing else of it."""
    from spd_ray.objstore import is_uri
    from spd_ray.sync import remote_root

    root_uri = remote_root(out)
    if is_uri(name) or root_uri is not None:
        return _remote_status(name if is_uri(name) else join(str(root_uri), name))
    sweep_dir = child(output_root(out), name, "name")
    spec_path = sweep_dir / SPEC_FILE
    if not spec_path.exists():
        raise NotFoundError(f"no sweep {name!r} under {sweep_dir.parent} ({SPEC_FILE} missing)")
    table = sweep_dir / TABLE
    rows = read_table(table) if table.exists() else []
    return _status(name, str(sweep_dir), json.loads(spec_path.read_text()), rows)


def _remote_status(uri: str) -> str:
    from spd_ray.objstore import check_reachable, parse_uri, read_bytes

    u = parse_uri(uri, "sweep-status")
    if not u.key:
        raise InputError(f"sweep-status {u}: name the sweep (s3://bucket/prefix/<sweep name>)")
    check_reachable(str(u), "sweep-status")
    try:
        spec = json.loads(read_bytes(join(u, SPEC_FILE)))
    except FileNotFoundError:
        raise NotFoundError(f"no sweep at {u} ({SPEC_FILE} missing)") from None
    rows: list[TrialRow] = []
    try:
        table = read_bytes(join(u, TABLE))
    except FileNotFoundError:
        table = None
    if table is not None:
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / TABLE).write_bytes(table)
            rows = read_table(Path(tmp) / TABLE)
    return _status(u.key.rsplit("/", 1)[-1], str(u), spec, rows)


def _status(name: str, where: str, spec_data: dict[str, Any], rows: list[TrialRow]) -> str:
    spec = SweepSpec(**spec_data)
    head = f"sweep {name}: {len(rows)}/{spec.trials} trials ended ({where})"
    if not rows:
        return head
    return head + "\n" + format_table(rows, spec.objective_list())
