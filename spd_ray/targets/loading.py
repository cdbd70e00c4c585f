"""Getting the target model of a decomposition: a saved target file, or a toy target trained once
and cached under `<out_root>/targets/<model_type>-<config hash>/`.

A target file is a torch file holding `{"target_config": <target config dump>, "state_dict": ...}`;
the model class is rebuilt from `target_config.model_type`.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, assert_never

import torch
import yaml
from pydantic import TypeAdapter
from torch import nn

from spd_ray.config import (
    Config,
    FileTarget,
    HubTarget,
    IHTargetConfig,
    ResidMLPTargetConfig,
    TargetModelConfig,
    TMSTargetConfig,
    ToyTarget,
    config_hash,
)
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import atomic_write
from spd_ray.targets.hf import load_hf_model
from spd_ray.targets.ih import InductionTransformer, train_ih
from spd_ray.targets.resid_mlp import ResidMLP, train_resid_mlp
from spd_ray.targets.tms import TMSModel, train_tms

ToyTargetConfig = TMSTargetConfig | ResidMLPTargetConfig | IHTargetConfig
ToyModel = TMSModel | ResidMLP | InductionTransformer

TARGET_FILE = "target.pt"
TARGET_CONFIG_FILE = "target_config.yaml"

_TARGET_CONFIG_ADAPTER: TypeAdapter[ToyTargetConfig] = TypeAdapter(TargetModelConfig)


def build_toy(cfg: ToyTargetConfig) -> ToyModel:
    """An untrained toy target of this config (the deterministic init of its class)."""
    match cfg:
        case TMSTargetConfig():
            return TMSModel(cfg)
        case ResidMLPTargetConfig():
            return ResidMLP(cfg)
        case IHTargetConfig():
            return InductionTransformer(cfg)


def train_toy(cfg: ToyTargetConfig, progress: bool = False) -> ToyModel:
    match cfg:
        case TMSTargetConfig():
            return train_tms(cfg, progress=progress)
        case ResidMLPTargetConfig():
            return train_resid_mlp(cfg, progress=progress)
        case IHTargetConfig():
            return train_ih(cfg, progress=progress)


def save_target(model: nn.Module, target_cfg: ToyTargetConfig, path: Path) -> None:
    """Save a toy target file (atomically) that `load_target_file` reads back."""
    payload = {
        "target_config": target_cfg.model_dump(mode="json"),
        "state_dict": model.state_dict(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_target_file(path: str | Path) -> nn.Module:
    """The toy target saved at `path` (relative paths resolve against the current directory), on
    the CPU, frozen (eval mode, no parameter requires grad)."""
    path = Path(path)
    if not path.is_file():
        raise NotFoundError(f"target file not found: {path.resolve()}")
    payload: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or {"target_config", "state_dict"} - payload.keys():
        raise InputError(f"{path}: not a target file (expected keys target_config, state_dict)")
    cfg = _TARGET_CONFIG_ADAPTER.validate_python(payload["target_config"])
    model = build_toy(cfg)
    model.load_state_dict(payload["state_dict"])
    return _frozen(model)


def target_fingerprint(target: nn.Module) -> str:
    """A 16-hex-digit fingerprint (sha256) of a target's architecture and weights.

    Covers the class (module and qualified name) and every parameter and buffer - persistent or
    not, so derived buffers such as rotary frequencies count too - by name, shape, dtype and raw
    bytes, in sorted name order. A tensor shared under several names (tied embeddings) is hashed
    once and referenced by its first name afterwards. Not covered: `requires_grad`, train/eval
    mode, the device, hooks and plain Python attributes (a Hugging Face config counts only
    through the tensors it shapes).

    The promises: the same string in every process and on every device for equal modules; equal
    for a module and a copy saved and reloaded (`save_pretrained`/`from_pretrained`,
    `save_target`/`load_target_file`); different when any weight changes by any amount, when a
    dtype or shape changes, or for another class. Costs one pass of sha256 over the weights (a
    copy to the CPU first for tensors elsewhere).
    """
    digest = hashlib.sha256()
    cls = type(target)
    digest.update(f"class {cls.__module__}.{cls.__qualname__}\n".encode())
    tensors = {
        **{f"param {n}": p for n, p in target.named_parameters(remove_duplicate=False)},
        **{f"buffer {n}": b for n, b in target.named_buffers(remove_duplicate=False)},
    }
    first_name: dict[tuple[object, ...], str] = {}
    for name in sorted(tensors):
        t = tensors[name].detach()
        digest.update(f"{name} {tuple(t.shape)} {t.dtype}".encode())
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), t.shape, t.stride(), t.dtype)
        if t.numel() > 0 and key in first_name:
            digest.update(f" = {first_name[key]}\n".encode())
            continue
        first_name[key] = name
        digest.update(b"\n")
        digest.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:16]


def _frozen(model: nn.Module) -> nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def cached_target_path(target_cfg: ToyTargetConfig, out_root: Path) -> Path:
    """Where the toy target of this config is cached: the folder name carries its config hash."""
    name = f"{target_cfg.model_type}-{config_hash(target_cfg)}"
    return Path(out_root) / "targets" / name / TARGET_FILE


@contextmanager
def _exclusive_lock(lock_path: Path) -> Iterator[None]:
    """An fcntl lock, so concurrent processes (e.g. data-parallel workers) train a target once."""
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def load_or_train_toy(
    target_cfg: ToyTargetConfig, out_root: Path, progress: bool = True
) -> nn.Module:
    """The cached toy target of `target_cfg`, trained and cached first when missing (announced on
    stderr with a progress bar when `progress`)."""
    path = cached_target_path(target_cfg, out_root)
    if path.is_file():
        return load_target_file(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(path.parent / ".lock"):
        if path.is_file():  # another process trained it while we waited for the lock
            return load_target_file(path)
        if progress:
            print(f"training target {path.parent.name} (cached afterwards)", file=sys.stderr)
        model = train_toy(target_cfg, progress=progress)
        config_text = yaml.safe_dump(target_cfg.model_dump(mode="json"), sort_keys=False)
        atomic_write(path.parent / TARGET_CONFIG_FILE, lambda tmp: tmp.write_text(config_text))
        save_target(model, target_cfg, path)
    # Load the file rather than returning the trained module, so the first and later runs see
    # exactly the same target.
    return load_target_file(path)


def describe_target(config: Config) -> str:
    """The target in a few words: its hub name or file, else the toy config's kind and hash."""
    match config.target:
        case HubTarget(name=name):
            return name
        case FileTarget(path=path):
            return path
        case ToyTarget(model=toy):
            return f"{type(toy).__name__} {config_hash(toy)}"
        case _:
            assert_never(config.target)


def import_class(dotted: str) -> type:
    """The class that `pretrained_model_class` names, e.g. 'spd_ray.targets.tms.TMSModel'."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise InputError(f"pretrained_model_class {dotted!r} is not a dotted path module.Class")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise InputError(f"pretrained_model_class {dotted!r}: cannot import {err.name!r}") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise InputError(f"pretrained_model_class {dotted!r}: {module_name} has no class {attr!r}")
    return cls


def load_target(config: Config, out_root: Path, progress: bool = True) -> nn.Module:
    """The target of `config` (see `Config.target`), frozen (eval mode, no parameter requires
    grad): a saved file, a toy trained once and cached under `out_root`, or a Hugging Face
    `from_pretrained` (`spd_ray.targets.hf`). A saved or toy target must be an instance of its
    model class; for a Hugging Face Auto class, whatever it builds."""
    match config.target:
        case HubTarget(name=name, model_class=cls_path):
            return load_hf_model(import_class(cls_path), cls_path, name, out_root, progress)
        case FileTarget(path=path, model_class=cls_path):
            return _checked(load_target_file(path), cls_path)
        case ToyTarget(model=toy, model_class=cls_path):
            return _checked(load_or_train_toy(toy, out_root, progress), cls_path)
        case _:
            assert_never(config.target)


def _checked(model: nn.Module, cls_path: str | None) -> nn.Module:
    if cls_path is not None and not isinstance(model, import_class(cls_path)):
        raise TypeError(
            f"pretrained_model_class is {cls_path!r}, but the target is a "
            f"{type(model).__module__}.{type(model).__qualname__}"
        )
    return model  # frozen by load_target_file
