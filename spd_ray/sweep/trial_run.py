"""One Tune trial: the sweep's base config with the trial's params, trained in the trial's own run
directory (the run contract: config.yaml, metrics.jsonl, summary.json, workers.json, tb/,
checkpoint.pt) with the same lifecycle as `spd-ray run`.

A sweep kept in a bucket gives each trial the run's object-store path: the trial fetches its run
directory from the bucket into the staging folder of the node it lands on (a restarted trial
resumes from what it sent before, wherever it ran), and sends it back after each checkpoint, when
it ends and when it fails. A trial stopped early by a scheduler is ended by Tune without warning:
the bucket keeps what it sent at its last checkpoint.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from spd_ray.config import Config, config_from_dict
from spd_ray.io import write_json
from spd_ray.runs import RunDir, tune_malloc
from spd_ray.sweep.place import SweepPlace
from spd_ray.sweep.spec import SweepSpec
from spd_ray.sweep.trials import trial_config
from spd_ray.targets import load_target, target_fingerprint
from spd_ray.train.lifecycle import copy_target_file, live_run, open_run
from spd_ray.train.ray_driver import RayReporter, record_placement
from spd_ray.train.tracking import RunWriter
from spd_ray.train.worker import build_worker


def sweep_trial(
    params: dict[str, Any], spec: dict[str, Any], place: SweepPlace, cpus: float, launch: str = ""
) -> None:
    """One Tune trial: the base config with `params`, trained in its own run directory; `cpus`
    is what the trial (one worker) or each of its Train workers holds. The sweep's lock (or
    lease) covers its trials; a restarted trial resumes like any run (`live_run`). `launch`
    names the sweep driver's start, so `workers.json` counts the restarts of a trial within it."""
    from ray import tune

    from spd_ray.sync import sync_down, sync_up

    s = SweepSpec(**spec)
    config = trial_config(config_from_dict(s.base_config), params)
    trial_id = tune.get_context().get_trial_id()
    run_dir = RunDir(place.trial_dir(trial_id))
    root = place.local_root
    remote = place.trial_uri(trial_id)
    if remote is not None:
        sync_down(remote, run_dir.path)
        place.fetch_target(config)
    if s.workers_per_trial > 1:
        run_dir.init(config)
        copy_target_file(config, root, run_dir)
        if remote is not None:  # the Train workers may start on other nodes
            sync_up(run_dir.path, remote)
        _trial_on_train(config, run_dir, root, s, cpus, launch, remote)
        return
    try:
        _trial_here(config, run_dir, root, s, trial_id, cpus, launch, remote)
    finally:
        if remote is not None:  # at the end, and when it failed
            sync_up(run_dir.path, remote)


def _trial_here(
    config: Config,
    run_dir: RunDir,
    root: Path,
    s: SweepSpec,
    trial_id: str,
    cpus: float,
    launch: str,
    remote: str | None,
) -> None:
    """A one-worker trial, in the trial's own process."""
    from ray import tune

    tune_malloc()
    torch.set_num_threads(max(1, int(cpus)))
    device = torch.device("cuda" if s.gpu and torch.cuda.is_available() else "cpu")
    target = load_target(config, root, progress=False)
    fingerprint = target_fingerprint(target)
    worker = build_worker(config, target, root, device)
    open_run(config, run_dir, root, fingerprint, fresh=False)
    objectives = tuple(m for m, _ in s.objectives)

    def open_reporter(start: int) -> RayReporter:
        # Every log point reports (a function trial's report is cheap), so ASHA sees every rung.
        return RayReporter(
            RunWriter(run_dir, config, start),
            trial_id,
            0,
            config.steps,
            0.0,
            TuneReport(trial_id),
            quiet=True,
            require=objectives,
            remote_run=remote,
        )

    lived = live_run(
        config,
        worker,
        run_dir,
        open_reporter,
        on_start=lambda state: record_placement(run_dir, launch, 0, 1, device, state.step),
    )
    if lived.already_finished:
        tune.report({"step": lived.resumed_from, **lived.metrics})


class TuneReport:
    """`tune.report` for a one-worker trial. Tune gets no copy of the run's checkpoints: the run
    directory holds the whole state and a restarted trial resumes from it, while a checkpoint that
    Tune keeps only `num_to_keep` of can still be named by the experiment state it saved last
    after it was deleted (the restored trial then fails). Instead a trial's first report carries
    a small marker, its only checkpoint: Tune saves its experiment state when a trial checkpoints,
    so a sweep killed just after a trial started still knows that trial when it resumes."""

    def __init__(self, trial_id: str) -> None:
        from ray import tune

        self.trial_id = trial_id
        self.marked = tune.get_checkpoint() is not None  # a restored trial has its marker

    def __call__(self, metrics: dict[str, Any], checkpoint: Any = None) -> None:
        from ray import tune

        if self.marked:
            tune.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            write_json(Path(tmp) / "trial.json", {"trial_id": self.trial_id})
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        self.marked = True


def _trial_on_train(
    config: Config,
    run_dir: RunDir,
    root: Path,
    s: SweepSpec,
    cpus: float,
    launch: str,
    remote: str | None,
) -> None:
    """A several-worker trial: its own TorchTrainer, reports forwarded to Tune. With `remote`, the
    run is kept in the bucket as `spd-ray run` keeps it (rank 0 sends it, Train's storage)."""
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
        remote_run=remote,
    )
    trainer.fit()
