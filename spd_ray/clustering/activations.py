"""What a clustering member merges: the causal importances of a run's subcomponents over one batch
of its own data (upper-leaky CI, continuous; language-model positions flattened into samples),
restricted to the modules asked for, with the dead subcomponents dropped."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import Tensor

from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError


@dataclass
class Activations:
    ci: Tensor  # [samples, n] CI of the alive subcomponents (CPU, float32)
    labels: list[str]  # "<module path>:<index>" of each column
    dead: list[str]  # subcomponents dropped: largest CI below the dead threshold


def select_modules(model: ComponentModel, pattern: str | None) -> list[str]:
    """The module paths matching a glob (comma-separated globs allowed); all when None."""
    paths = list(model.module_paths)
    if pattern is None:
        return paths
    globs = [g.strip() for g in pattern.split(",") if g.strip()]
    chosen = [p for p in paths if any(fnmatch.fnmatchcase(p, g) for g in globs)]
    if not chosen:
        raise InputError(f"--modules {pattern!r} matches none of the run's modules: {paths}")
    return chosen


@torch.no_grad()
def component_ci(
    model: ComponentModel, batch: Tensor, modules: list[str], dead_threshold: float
) -> Activations:
    _, cache = model.clean_forward(batch)
    upper = model.ci_from_cache(cache).upper
    columns, labels = [], []
    for path in modules:
        ci = upper[path].float()
        columns.append(ci.reshape(-1, ci.shape[-1]))
        labels += [f"{path}:{c}" for c in range(ci.shape[-1])]
    ci_all = torch.cat(columns, dim=1).cpu()
    keep = ci_all.max(dim=0).values >= dead_threshold
    dead = [lab for lab, k in zip(labels, keep.tolist(), strict=True) if not k]
    alive = [lab for lab, k in zip(labels, keep.tolist(), strict=True) if k]
    return Activations(ci_all[:, keep].contiguous(), alive, dead)
