"""The run directory contract: config.yaml, metrics.jsonl, summary.json, figures/, checkpoint.pt.

Only this module (and the CLI) writes files for a run, and it keeps these promises:
- every replaced file (config, checkpoint, summary, target copy) is replaced atomically and durably;
- `metrics.jsonl` is append-only; a torn last line (kill, full disk) is skipped by readers and cut
  by the next start, and every start cuts it back to the step it starts from, so each (step,
  metric) appears once however often a run is interrupted or restarted;
- metrics are fsynced before each checkpoint, so a checkpoint never holds a step whose metrics are
  lost;
- a new checkpoint keeps the previous one (`checkpoint.prev.pt`); loading takes the newest readable
  one of those and Ray's copies under `ray/`, with a warning for each unreadable one, and loads
  tensors and plain containers only (`weights_only=True`: no code runs from a checkpoint file);
- one command at a time holds a run (`lock()`).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import sys
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import yaml
from matplotlib.figure import Figure

from spd_ray.config import Config, ConfigError, config_from_dict, save_config
from spd_ray.errors import NotFoundError, UserError
from spd_ray.io import (
    Lock,
    append_jsonl,
    copy_file,
    fsync_path,
    read_jsonl,
    rewrite_jsonl,
    write_json,
)

CHECKPOINT = "checkpoint.pt"
SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
PREV_CHECKPOINT = "checkpoint.prev.pt"
TARGET_COPY = "target.pt"
TARGET_INFO = "target.json"
LOCK = ".lock"
RAY_SUBDIR = "ray"
ERROR_FILE = "error.txt"  # why a run stopped for good (a non-finite loss)
WORKERS_FILE = "workers.json"  # where each rank of the latest worker-group start ran


class CheckpointError(UserError, ValueError):
    """No checkpoint of a run could be read."""


def load_state_file(
    path: Path, map_location: str | torch.device = "cpu", mmap: bool = False
) -> dict[str, Any]:
    """A checkpoint file's state: tensors and plain containers only (`weights_only=True`), so a
    crafted file cannot run code. With `mmap`, tensors stay on disk until read (a cheap check
    that the file loads)."""
    state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{path} is not a spd-ray checkpoint (no step)")
    return state  # type: ignore[no-any-return]


def warn(line: str) -> None:
    sys.stderr.write(f"warning: {line}\n")
    sys.stderr.flush()


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def output_root(out: str | Path | None = None) -> Path:
    """--out, else $SPD_RAY_OUT, else ~/spd_ray_out."""
    if out is not None:
        return Path(out).expanduser().resolve()
    env = os.environ.get("SPD_RAY_OUT")
    return Path(env).expanduser().resolve() if env else Path.home() / "spd_ray_out"


def resolve_run_dir(run: str | Path, out: str | Path | None = None) -> Path:
    """A run directory, or a run name under the output root. A run in object storage
    (`s3://bucket/runs/r`, or a name under an object-store `out`) is its local staging folder,
    brought up to date from the bucket first."""
    from spd_ray.sync import open_run_root, run_uri

    uri = run_uri(run, out)
    if uri is not None:
        local = open_run_root(uri)
        if not (local / CONFIG).exists():
            raise NotFoundError(f"no run at '{uri}' (it holds no {CONFIG})")
        return local
    path = Path(run).expanduser()
    if (path / CONFIG).exists():
        return path.resolve()
    candidate = output_root(out) / str(run)
    if (candidate / CONFIG).exists():
        return candidate
    raise NotFoundError(f"no run at '{run}' (looked for {CONFIG} there and in {candidate})")


def assets_root(run_path: Path, out: str | Path | None) -> Path:
    """The output root a run's `@tiny-lm/` names resolve against: `out`, else the nearest folder
    above the run holding `assets/` (runs and sweep trials live under their output root), else
    the default root."""
    if out is not None:
        return output_root(out)
    for parent in run_path.parents:
        if (parent / "assets").is_dir():
            return parent
    return output_root(None)


def tune_malloc() -> None:
    """Keep glibc from mapping and unmapping large buffers every step (costs ~40% on small
    models)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 16 * 1024 * 1024)
    libc.mallopt(m_trim_threshold, 128 * 1024 * 1024)


# Config fields a resumed run may change: when it logs, evaluates and checkpoints. Training reads
# none of them (evals draw fresh eval batches and noise each time), so its numbers stay those of an
# uninterrupted run; config.yaml is rewritten to the new values.
RESCHEDULABLE = ("train_log_freq", "eval_freq", "slow_eval_freq", "save_freq")


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f"{prefix}{key}.")
            if diff:
                return diff
        return None
    return None if a == b else prefix.rstrip(".")


class RunDir:
    def __init__(self, path: Path):
        self.path = path

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def figures_dir(self) -> Path:
        return self.path / "figures"

    def lock(self) -> Lock:
        """The advisory lock that one command holds while it writes this run."""
        return Lock(self.path / LOCK, f"run {self.path}")

    def clear(self) -> None:
        """Remove everything in the run but its lock (`--fresh`, with the lock held). The locks
        of analyses inside it (a harvest, an autointerp store) are taken first: a live one makes
        this fail naming its holder, before anything is deleted."""
        with ExitStack() as held:
            for path in sorted(self.path.rglob("*.lock")):
                if path != self.path / LOCK:
                    held.enter_context(Lock(path, f"{path.parent} ({path.name})"))
            for entry in self.path.iterdir():
                if entry.name == LOCK:
                    continue
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()

    def exists(self) -> bool:
        return (self.path / CONFIG).exists()

    def finished(self) -> bool:
        return (self.path / SUMMARY).exists()

    def _stored_config(self) -> Any:
        """config.yaml as written, with the defaults of runs made before a field existed where
        today's default would change their numbers."""
        data = yaml.safe_load((self.path / CONFIG).read_text())
        if isinstance(data, dict) and "mask_rng" not in data:
            data = {**data, "mask_rng": "generator"}  # mask noise from torch.Generators back then
        return data

    def read_config(self) -> Config:
        return config_from_dict(self._stored_config(), str(self.path / CONFIG))

    def init(self, config: Config) -> None:
        """Create the folder and config.yaml, or check that an existing run has the same config."""
        if self.exists():
            old = self._stored_config()
            # Read through today's schema, so a field added since takes its default; a config the
            # schema refuses is compared as written (the first difference names what changed).
            with contextlib.suppress(ConfigError):
                old = config_from_dict(old).model_dump(mode="json")
            new = config.model_dump(mode="json")
            # How often the run logs, evaluates and checkpoints never changes what it trains.
            key = _first_difference({**old, **{k: new[k] for k in RESCHEDULABLE}}, new)
            if key is not None:
                hint = ""
                if key.rstrip(".") == "mask_rng" and old.get("mask_rng") == "generator":
                    hint = (
                        " (its mask noise comes from torch.Generators: add --set "
                        "mask_rng=generator to resume it)"
                    )
                raise ConfigError(
                    f"{self.path} holds a run with a different config (first difference: "
                    f"{key}){hint}; use --fresh to start over or another --name (of the "
                    f"settings only {', '.join(RESCHEDULABLE)} may change on resume)"
                )
            if _first_difference(old, new) is not None:
                save_config(config, self.path / CONFIG)  # the schedule it now runs under
            return
        self.path.mkdir(parents=True, exist_ok=True)
        save_config(config, self.path / CONFIG)

    def start_at(self, step: int) -> None:
        """Cut `metrics.jsonl` back to what a run starting at `step` keeps: nothing for a start at
        step 0 (its warmup and first eval are logged again), else every row up to and including
        `step` (the checkpoint's step was fully logged before it was saved). Also drops a torn
        last line. Called on every start, with or without a checkpoint."""
        path = self.path / METRICS
        if not path.exists():
            return
        rows = read_jsonl(path)
        kept = [r for r in rows if step > 0 and r["step"] <= step]
        if len(kept) != len(rows) or not path.read_bytes().endswith(b"\n"):
            rewrite_jsonl(path, kept)

    def append_metrics(self, step: int, metrics: dict[str, float]) -> None:
        append_jsonl(self.path / METRICS, {"step": step, **metrics})

    def sync_metrics(self) -> None:
        path = self.path / METRICS
        if path.exists():
            fsync_path(path)

    def read_metrics(self) -> list[dict[str, Any]]:
        return read_jsonl(self.path / METRICS)

    def save_figures(self, step: int, figures: dict[str, Figure]) -> None:
        from spd_ray.evals.figures import save_figures

        save_figures(figures, self.figures_dir, step)

    def save_checkpoint(self, state: dict[str, Any]) -> None:
        """Metrics first, then the checkpoint through a synced temp file; the one it replaces is
        kept as `checkpoint.prev.pt` (a fallback should the new one ever be unreadable)."""
        self.sync_metrics()
        tmp = self.path / f".{CHECKPOINT}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
        try:
            torch.save(state, tmp)
            fsync_path(tmp)
            if self.checkpoint_path.exists():
                os.replace(self.checkpoint_path, self.path / PREV_CHECKPOINT)
            os.replace(tmp, self.checkpoint_path)
            fsync_path(self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def checkpoint_files(self) -> list[Path]:
        """Every checkpoint of the run on disk, newest first: checkpoint.pt (always written before
        Ray's copy of the same step), Ray's copies (their folder names carry the time they were
        saved), then the previous checkpoint.pt. By name, not file times: a run fetched from a
        bucket gets the times of the download."""
        ray_copies = sorted(
            self.path.glob(f"{RAY_SUBDIR}/checkpoint_*/{CHECKPOINT}"),
            key=lambda p: p.parent.name,
            reverse=True,
        )
        found = [self.checkpoint_path, *ray_copies, self.path / PREV_CHECKPOINT]
        return [p for p in found if p.is_file()]

    def has_checkpoint(self) -> bool:
        return bool(self.checkpoint_files())

    def newest_state(
        self, map_location: str | torch.device = "cpu", mmap: bool = False
    ) -> dict[str, Any] | None:
        """The newest readable checkpoint's state, None when the run has none. An unreadable file
        (truncated, corrupt, not a checkpoint) is skipped with a one-line warning; when every file
        is unreadable, a CheckpointError names them."""
        failures = []
        for path in self.checkpoint_files():
            try:
                state = load_state_file(path, map_location, mmap=mmap)
            except Exception as err:  # noqa: BLE001 - any unreadable file: try the next one
                failures.append(f"{path}: {_one_line(err)}")
                warn(f"skipping unreadable checkpoint {path} ({_one_line(err)})")
                continue
            return state
        if failures:
            raise CheckpointError(f"no readable checkpoint in {self.path}: {'; '.join(failures)}")
        return None

    def load_checkpoint(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        state = self.newest_state(map_location)
        if state is None:
            raise NotFoundError(f"no checkpoint in {self.path} ({CHECKPOINT} missing)")
        return state

    def copy_target(self, source: Path) -> None:
        """Keep the target's file beside the run (atomically: never a torn copy)."""
        dest = self.path / TARGET_COPY
        if not dest.exists():
            copy_file(source, dest)

    def check_target(self, fingerprint: str, describe: str, record: bool = True) -> None:
        """Refuse a target whose fingerprint differs from the one this run recorded; with
        `record`, record it when the run has none yet (readers pass False)."""
        path = self.path / TARGET_INFO
        if path.exists():
            old = json.loads(path.read_text())
            if old["fingerprint"] != fingerprint:
                raise ConfigError(
                    f"{self.path} decomposed a target with fingerprint {old['fingerprint']} "
                    f"({old.get('source', '?')}), but the target now loaded ({describe}) has "
                    f"fingerprint {fingerprint}: it was rebuilt or changed; restore it, or start "
                    "a new run (--fresh or another --name)"
                )
            return
        if record:
            write_json(path, {"fingerprint": fingerprint, "source": describe})

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.path / SUMMARY, summary)

    def read_summary(self) -> dict[str, Any]:
        return json.loads((self.path / SUMMARY).read_text())  # type: ignore[no-any-return]
