"""Where a sweep's files live: `<root>/<name>/` under an output root every node mounts, or under an
object-store root (`s3://bucket/prefix`) that local staging folders mirror (`spd_ray.sync`).

In a bucket every file has one writer. The driver keeps its own files - sweep.json, study.db,
the results table, best/pareto configs, objectives.png - in its staging folder and sends the
changed ones after each trial ends, when the Optuna study changes, at the end and when it fails.
Each trial writes its run directory (`trials/<id>/`) in the staging folder of the node it runs
on and sends it at its checkpoints and when it ends, as a run does. Tune writes `tune/` itself
(its storage is the bucket). So the driver never sends `trials/` or `tune/`, and reads what it
needs of a trial (summary.json, workers.json) straight from the bucket. A toy target the driver
trained goes to `<root>/targets/`, where a local root caches it, for trials on other nodes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

from spd_ray.config import Config, ToyTarget
from spd_ray.objstore import exists, is_uri, join, read_bytes
from spd_ray.sync import staging_dir, sync_down, sync_up

SPEC_FILE = "sweep.json"
STUDY_FILE = "study.db"
TRIALS = "trials"
TUNE_SUBDIR = "tune"
OTHER_WRITERS = (TRIALS, TUNE_SUBDIR)  # what the trials and Tune send themselves


@dataclass(frozen=True)
class SweepPlace:
    """The sweep `name` under `root` (a local folder, or an object-store URI as a str). Paths are
    worked out where they are used: a staging folder is per machine ($SPD_RAY_STAGING)."""

    root: str
    name: str

    @property
    def uri(self) -> str | None:
        """The sweep's URI, or None for a sweep on a filesystem."""
        return join(self.root, self.name) if is_uri(self.root) else None

    @property
    def local_root(self) -> Path:
        """The output root on this machine: the folder itself, or the bucket's staging mirror."""
        return staging_dir(self.root) if is_uri(self.root) else Path(self.root)

    @property
    def dir(self) -> Path:
        return self.local_root / self.name

    @property
    def shown(self) -> str:
        """Where the sweep is, for messages: its URI or its folder."""
        return self.uri or str(self.dir)

    def trial_dir(self, trial_id: str) -> Path:
        return self.dir / TRIALS / trial_id

    def trial_uri(self, trial_id: str) -> str | None:
        return None if self.uri is None else join(self.uri, TRIALS, trial_id)

    def trial_location(self, trial_id: str) -> str:
        """A trial's run directory as the results table names it: its URI or its folder."""
        return self.trial_uri(trial_id) or str(self.trial_dir(trial_id))

    def trial_file(self, trial_id: str, name: str) -> bytes | None:
        """One file of a trial's run directory (from the bucket for a sweep kept there), or None
        when the trial has not written it."""
        uri = self.trial_uri(trial_id)
        if uri is None:
            path = self.trial_dir(trial_id) / name
            return path.read_bytes() if path.is_file() else None
        try:
            return read_bytes(join(uri, name))
        except FileNotFoundError:
            return None

    def fetch(self) -> None:
        """Bring the driver's files from the bucket into the staging folder (nothing to do on a
        filesystem). With no sweep in the bucket, whatever the staging folder still holds of an
        earlier sweep of this name is stale, and goes."""
        if self.uri is None:
            return
        if exists(join(self.uri, SPEC_FILE)):
            sync_down(self.uri, self.dir, exclude=OTHER_WRITERS)
        elif self.dir.exists():
            shutil.rmtree(self.dir)

    def send(self) -> None:
        """Send the driver's changed files to the bucket, and delete the driver's objects it no
        longer has (a Pareto file of a front that shrank); nothing to do on a filesystem."""
        if self.uri is not None and self.dir.is_dir():
            sync_up(self.dir, self.uri, delete=True, exclude=OTHER_WRITERS)

    def _target(self, config: Config) -> tuple[Path, str] | None:
        """(the cached toy target's file on this machine, the URI of its folder) in a bucket's
        root; None for a sweep on a filesystem or a target that is not a cached toy."""
        from spd_ray.targets import cached_target_path

        if not is_uri(self.root) or not isinstance(config.target, ToyTarget):
            return None
        path = cached_target_path(config.target.model, self.local_root)
        return path, join(self.root, *path.parent.relative_to(self.local_root).parts)

    def fetch_target(self, config: Config) -> None:
        """The toy target from the bucket into this machine's cache, when the bucket has it and
        the cache does not (a node that never trained it loads the driver's, not its own)."""
        target = self._target(config)
        if target is not None and not target[0].is_file() and exists(target[1]):
            sync_down(target[1], target[0].parent)

    def publish_target(self, config: Config) -> None:
        """Send the toy target this machine cached to the bucket (when it changed)."""
        target = self._target(config)
        if target is not None and target[0].is_file():
            sync_up(target[0].parent, target[1])
