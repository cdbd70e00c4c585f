"""A run loaded back from its directory (finished or still running): config, target and the
ComponentModel at its newest checkpoint. Harvest, autointerp and the API load runs through here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from torch import nn

from spd_ray.config import Config
from spd_ray.core.model import ComponentModel
from spd_ray.core.step import build_component_model
from spd_ray.runs import TARGET_COPY, RunDir, assets_root, resolve_run_dir
from spd_ray.targets import describe_target, load_target, load_target_file, target_fingerprint


@dataclass
class LoadedRun:
    config: Config
    model: ComponentModel  # eval mode, target loaded, components from the latest checkpoint
    target: nn.Module  # the target (its decomposed modules wrapped; they act as the originals)
    run_dir: Path
    step: int


def load_run(path: str | Path, out: str | Path | None = None, device: str = "cpu") -> LoadedRun:
    """The run at `path` (a directory, a name under `out`, or an object-store URI); its target must
    be the one it was trained on (fingerprint check)."""
    run_dir = RunDir(resolve_run_dir(path, out))
    config = run_dir.read_config()
    target_copy = run_dir.path / TARGET_COPY
    if target_copy.exists():
        target = load_target_file(target_copy)
        source = str(target_copy)
    else:
        target = load_target(config, assets_root(run_dir.path, out))
        source = describe_target(config)
    run_dir.check_target(target_fingerprint(target), source, record=False)
    model = build_component_model(config, target)
    saved = run_dir.load_checkpoint(device)  # tensors and plain containers only
    model.load_state_dict(saved["model"], strict=False)
    model.to(device).eval()
    return LoadedRun(config, model, model.target, run_dir.path, int(saved["step"]))
