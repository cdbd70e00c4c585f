"""Target models and how to get them: toy models with their trainers (cached), saved files."""

from spd_ray.targets.loading import (
    cached_target_path,
    load_target,
    load_target_file,
    save_target,
)

__all__ = ["cached_target_path", "load_target", "load_target_file", "save_target"]
