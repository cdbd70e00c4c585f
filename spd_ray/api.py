"""The Python API: `decompose` (one run in-process, no Ray) and `load_run` (a finished or running
run)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from spd_ray.config import Config
from spd_ray.core.model import ComponentModel
from spd_ray.core.step import build_component_model
from spd_ray.targets import load_target, load_target_file, target_fingerprint
from spd_ray.train.run import RunResult, decompose, describe_target
from spd_ray.train.rundir import TARGET_COPY, RunDir, output_root

__all__ = ["LoadedRun", "RunResult", "decompose", "load_run", "resolve_run_dir"]


@dataclass
class LoadedRun:
    config: Config
    model: ComponentModel  # eval mode, target loaded, components from the latest checkpoint
    target: nn.Module  # the target (its decomposed modules wrapped; they act as the originals)
    run_dir: Path
    step: int


def resolve_run_dir(run: str | Path, out: str | Path | None = None) -> Path:
    """A run directory, or a run name under the output root. A run in object storage
    (`s3://bucket/runs/r`, or a name under an object-store `out`) is its local staging folder,
    brought up to date from the bucket first."""
    from spd_ray.sync import open_run_root, run_uri

    uri = run_uri(run, out)
    if uri is not None:
        local = open_run_root(uri)
        if not (local / "config.yaml").exists():
            raise FileNotFoundError(f"no run at '{uri}' (it holds no config.yaml)")
        return local
    path = Path(run).expanduser()
    if (path / "config.yaml").exists():
        return path.resolve()
    candidate = output_root(out) / str(run)
    if (candidate / "config.yaml").exists():
        return candidate
    raise FileNotFoundError(f"no run at '{run}' (looked for config.yaml there and in {candidate})")


def _root_for(run_path: Path, out: str | Path | None) -> Path:
    """The output root a run's `@tiny-lm/` names resolve against: `out`, else the nearest folder
    above the run holding `assets/` (runs and sweep trials live under their output root), else
    the default root."""
    if out is not None:
        return output_root(out)
    for parent in run_path.parents:
        if (parent / "assets").is_dir():
            return parent
    return output_root(None)


def load_run(path: str | Path, out: str | Path | None = None, device: str = "cpu") -> LoadedRun:
    run_dir = RunDir(resolve_run_dir(path, out))
    config = run_dir.read_config()
    target_copy = run_dir.path / TARGET_COPY
    if target_copy.exists():
        target = load_target_file(target_copy)
        source = str(target_copy)
    else:
        target = load_target(config, _root_for(run_dir.path, out))
        source = describe_target(config)
    run_dir.check_target(target_fingerprint(target), source, record=False)
    model = build_component_model(config, target)
    saved = run_dir.load_checkpoint(device)  # tensors and plain containers only
    model.load_state_dict(saved["model"], strict=False)
    model.to(device).eval()
    return LoadedRun(config, model, model.target, run_dir.path, int(saved["step"]))
