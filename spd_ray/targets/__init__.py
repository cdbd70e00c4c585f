"""Target models to decompose: toy models (TMS, ResidMLP), their trainers, cached loading, and
the fingerprint that identifies a target."""

from spd_ray.targets.loading import (
    build_toy,
    cached_target_path,
    describe_target,
    load_target,
    load_target_file,
    save_target,
    target_fingerprint,
    train_toy,
)
from spd_ray.targets.resid_mlp import ResidMLP, train_resid_mlp
from spd_ray.targets.tms import TMSModel, tms_features_represented, train_tms

__all__ = [
    "ResidMLP",
    "TMSModel",
    "build_toy",
    "cached_target_path",
    "describe_target",
    "load_target",
    "load_target_file",
    "save_target",
    "target_fingerprint",
    "tms_features_represented",
    "train_resid_mlp",
    "train_tms",
    "train_toy",
]
