"""Getting the target model of a run: a saved file, a toy target trained once and cached, or (with the
language-model issue) a Hugging Face model."""

from __future__ import annotations

import importlib
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import TypeAdapter
from torch import nn

from spd_ray.config import (
    Config,
    ResidMLPTargetConfig,
    TargetModelConfig,
    TMSTargetConfig,
    config_hash,
)
from spd_ray.targets.resid_mlp import ResidMLP, train_resid_mlp
from spd_ray.targets.tms import TMSModel, train_tms

ToyTarget = TMSModel | ResidMLP
_TARGET_ADAPTER: TypeAdapter[Any] = TypeAdapter(TargetModelConfig)


def build_toy(cfg: TMSTargetConfig | ResidMLPTargetConfig) -> ToyTarget:
    match cfg:
        case TMSTargetConfig():
            return TMSModel(cfg)
        case ResidMLPTargetConfig():
            return ResidMLP(cfg)
    raise ValueError(f"target_model.model_type '{cfg.model_type}' has no toy model yet")


def train_toy(cfg: TMSTargetConfig | ResidMLPTargetConfig, progress: bool = False) -> ToyTarget:
    match cfg:
        case TMSTargetConfig():
            return train_tms(cfg, progress=progress)
        case ResidMLPTargetConfig():
            return train_resid_mlp(cfg, progress=progress)
    raise ValueError(f"target_model.model_type '{cfg.model_type}' has no trainer yet")


def save_target(model: nn.Module, cfg: TMSTargetConfig | ResidMLPTargetConfig, path: Path) -> None:
    """Write {target_config, state_dict} atomically (temp file in the same folder, then rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"target_config": cfg.model_dump(mode="json"), "state_dict": model.state_dict()}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    os.close(fd)
    torch.save(payload, tmp)
    os.replace(tmp, path)


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def load_target_file(path: str | Path) -> nn.Module:
    """A target saved by `save_target`, rebuilt from its config, frozen and in eval mode."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"target file not found: {path}")
    payload = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(payload, dict) or "target_config" not in payload:
        raise ValueError(f"{path} is not a target saved by spd-ray (no target_config)")
    cfg = _TARGET_ADAPTER.validate_python(payload["target_config"])
    model = build_toy(cfg)
    model.load_state_dict(payload["state_dict"])
    return _frozen(model)


def cached_target_path(cfg: TMSTargetConfig | ResidMLPTargetConfig, out_root: Path) -> Path:
    return out_root / "targets" / f"{cfg.model_type}-{config_hash(cfg)}" / "target.pt"


def _check_class(model: nn.Module, class_path: str) -> None:
    module_name, _, cls_name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"pretrained_model_class '{class_path}' cannot be imported") from None
    if not isinstance(model, cls):
        raise ValueError(
            f"pretrained_model_class is '{class_path}' but the target is {type(model).__name__}"
        )


def load_target(config: Config, out_root: Path, progress: bool = True) -> nn.Module:
    """The run's target, frozen and in eval mode.

    `pretrained_model_path` names a saved file; otherwise `target_model` is trained once and cached
    under `<out_root>/targets/<model_type>-<config hash>/target.pt`, so later runs start at once.
    """
    if config.pretrained_model_path is not None:
        model = load_target_file(config.pretrained_model_path)
    elif config.target_model is not None:
        cfg = config.target_model
        if not isinstance(cfg, TMSTargetConfig | ResidMLPTargetConfig):
            raise NotImplementedError(f"target_model '{cfg.model_type}' has no trainer yet")
        path = cached_target_path(cfg, out_root)
        if path.exists():
            model = load_target_file(path)
        else:
            if progress:
                print(f"training target {path.parent.name} (cached afterwards)", file=sys.stderr)
            model = train_toy(cfg, progress=progress)
            save_target(model, cfg, path)
            (path.parent / "target_config.yaml").write_text(
                yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
            )
            model = _frozen(model)
    else:
        raise NotImplementedError("Hugging Face targets arrive with the language-model issue")
    _check_class(model, config.pretrained_model_class)
    return model
