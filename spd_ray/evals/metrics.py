"""Eval-only metrics of causal importances and subcomponent weights: functions of tensors.

CI arguments are dicts {module path: Tensor[..., C]} with values in [0, 1]; every leading dim is a
position (batch, sequence, ...). Tensor results stay on the CI's device so the caller decides when
to sync.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor

from spd_ray.config import IdentityCIError
from spd_ray.errors import InputError
from spd_ray.evals.target_solutions import dense_distance, identity_distance, match_patterns


def _group_paths(paths: list[str], groups: dict[str, list[str]]) -> dict[str, list[str]]:
    """{group: paths matching any of its fnmatch patterns, in `paths` order}."""
    members: dict[str, list[str]] = {}
    for group, patterns in groups.items():
        for pattern in patterns:
            if not any(fnmatch.fnmatch(p, pattern) for p in paths):
                raise InputError(
                    f"CI_L0 group {group!r}: pattern {pattern!r} matches none of {paths}"
                )
        members[group] = [p for p in paths if any(fnmatch.fnmatch(p, pat) for pat in patterns)]
    return members


def _l0_dict(
    per_layer: dict[str, Tensor], groups: dict[str, list[str]] | None
) -> dict[str, Tensor]:
    out = {f"l0/{path}": v for path, v in per_layer.items()}
    for group, paths in _group_paths(list(per_layer), groups or {}).items():
        key = f"l0/{group}"
        if key in out:
            raise InputError(f"CI_L0 group name {group!r} collides with a module path")
        out[key] = torch.stack([per_layer[p] for p in paths]).sum()
    assert "l0/total" not in out, "a module or group is named 'total'"
    out["l0/total"] = torch.stack(list(per_layer.values())).sum()
    return out


def ci_l0(
    ci: dict[str, Float[Tensor, "... C"]],
    threshold: float,
    groups: dict[str, list[str]] | None = None,
) -> dict[str, Tensor]:
    """Mean number of subcomponents with CI > threshold per position.

    Keys `l0/<path>`, `l0/<group>` (sum over the group's layers) and `l0/total` (sum over all
    layers); values are 0-dim float tensors.
    """
    per_layer = {path: (v > threshold).sum(-1).float().mean() for path, v in ci.items()}
    return _l0_dict(per_layer, groups)


def activation_density(
    ci: dict[str, Float[Tensor, "... C"]], threshold: float
) -> dict[str, Float[Tensor, " C"]]:
    """Per subcomponent, the fraction of positions with CI > threshold."""
    return {path: (v > threshold).flatten(0, -2).float().mean(0) for path, v in ci.items()}


def ci_mean_per_component(ci: dict[str, Float[Tensor, "... C"]]) -> dict[str, Float[Tensor, " C"]]:
    """Per subcomponent, the mean CI over positions."""
    return {path: v.flatten(0, -2).float().mean(0) for path, v in ci.items()}


@dataclass(frozen=True)
class CIStatsResult:
    l0: dict[str, Tensor]  # ci_l0's keys and 0-dim values
    density: dict[str, Float[Tensor, " C"]]  # fraction of positions with CI > threshold
    mean: dict[str, Float[Tensor, " C"]]  # mean CI


class CIStats:
    """Sums over eval batches for L0, activation density and mean CI, weighted by positions.

    Feed each batch's CI to `update`; `compute` gives the same numbers as `ci_l0`,
    `activation_density` and `ci_mean_per_component` on all batches concatenated. Sums stay on the
    CI's device; `merge` adds another accumulator's sums (e.g. from another worker).
    """

    def __init__(self, threshold: float, groups: dict[str, list[str]] | None = None):
        self.threshold = threshold
        self.groups = groups
        self.n_positions: dict[str, int] = {}
        self.n_active: dict[str, Tensor] = {}  # [C] int64
        self.ci_sum: dict[str, Tensor] = {}  # [C] float64

    def update(self, ci: dict[str, Float[Tensor, "... C"]]) -> None:
        if self.n_positions and list(ci) != list(self.n_positions):
            raise ValueError(f"CIStats: got modules {list(ci)}, expected {list(self.n_positions)}")
        for path, v in ci.items():
            v = v.detach().flatten(0, -2)
            active = (v > self.threshold).sum(0, dtype=torch.int64)
            total = v.sum(0, dtype=torch.float64)
            if path in self.n_positions:
                self.n_positions[path] += v.shape[0]
                self.n_active[path] += active
                self.ci_sum[path] += total
            else:
                self.n_positions[path] = v.shape[0]
                self.n_active[path] = active
                self.ci_sum[path] = total

    def merge(self, other: CIStats) -> None:
        assert (self.threshold, self.groups) == (other.threshold, other.groups), "settings differ"
        if not self.n_positions:
            self.n_positions = dict(other.n_positions)
            self.n_active = {p: t.clone() for p, t in other.n_active.items()}
            self.ci_sum = {p: t.clone() for p, t in other.ci_sum.items()}
            return
        if list(other.n_positions) != list(self.n_positions):
            raise ValueError(f"CIStats.merge: modules {list(other.n_positions)} differ")
        for path in self.n_positions:
            self.n_positions[path] += other.n_positions[path]
            self.n_active[path] += other.n_active[path].to(self.n_active[path].device)
            self.ci_sum[path] += other.ci_sum[path].to(self.ci_sum[path].device)

    def compute(self) -> CIStatsResult:
        assert self.n_positions, "CIStats.compute before any update"
        density = {p: (a.double() / self.n_positions[p]).float() for p, a in self.n_active.items()}
        mean = {p: (s / self.n_positions[p]).float() for p, s in self.ci_sum.items()}
        l0 = _l0_dict({p: d.sum() for p, d in density.items()}, self.groups)
        return CIStatsResult(l0=l0, density=density, mean=mean)


def identity_ci_errors(
    single_feature_ci: dict[str, Float[Tensor, "n_features C"]], cfg: IdentityCIError
) -> dict[str, float]:
    """Distances of single-feature CI matrices from their target patterns.

    `target_solution_error/<path>` (tol 0.1) per matched module, and totals over matched modules
    `target_solution_error/total` (tol 0.1) and `target_solution_error/total_0p2` (tol 0.2).
    Modules matching no pattern are skipped; a pattern matching no module is a ValueError.
    """
    paths = list(single_feature_ci)
    identity = {p.layer_pattern: p for p in cfg.identity_ci or []}
    dense = {p.layer_pattern: p for p in cfg.dense_ci or []}
    matched = match_patterns(paths, [*identity, *dense], "IdentityCIError")

    def distance(path: str, tol: float) -> int:
        ci = single_feature_ci[path]
        pattern = matched[path]
        if pattern in identity:
            n_features = identity[pattern].n_features
            if ci.shape[0] != n_features or ci.shape[1] < n_features:
                raise InputError(
                    f"IdentityCIError: {path!r} has CI shape {tuple(ci.shape)}, pattern "
                    f"{pattern!r} expects [{n_features}, C >= {n_features}]"
                )
            return identity_distance(ci, tol)
        return dense_distance(ci, dense[pattern].k, tol)

    out: dict[str, float] = {}
    per_module = {path: distance(path, 0.1) for path in paths if path in matched}
    out["target_solution_error/total"] = float(sum(per_module.values()))
    out["target_solution_error/total_0p2"] = float(sum(distance(path, 0.2) for path in per_module))
    out.update({f"target_solution_error/{path}": float(d) for path, d in per_module.items()})
    return out


def mmcs_ml2r(
    target_weight: Float[Tensor, "d_out d_in"],
    component_weights: Float[Tensor, "C d_out d_in"],
    min_norm_frac: float,
) -> tuple[float, float]:
    """Mean max cosine similarity and mean L2 ratio (paper Table 1).

    For each input feature j, among the subcomponents whose column j has at least min_norm_frac
    times the norm of the target's column j, pick the one whose column j is most cosine-similar to
    the target's column j. MMCS = mean_j of that cosine; ML2R = mean_j of
    ||best column j|| / ||target column j||.
    The filter keeps near-zero subcomponents (e.g. spares left over next to an identity layer's
    components) from winning a feature on direction alone with a negligible norm. min_norm_frac 0
    lets every subcomponent compete: the reference's (and the paper's) definition.
    """
    _, d_out, d_in = component_weights.shape
    assert target_weight.shape == (d_out, d_in), (
        f"target weight {tuple(target_weight.shape)} vs component weights [C, {d_out}, {d_in}]"
    )
    target = target_weight.detach().double()
    comps = component_weights.detach().double()
    target_norm = target.norm(dim=0)  # [d_in]
    dead = (target_norm == 0).nonzero().flatten().tolist()
    if dead:
        raise InputError(f"target weight has zero columns {dead}: MMCS/ML2R undefined")

    col_norm = comps.norm(dim=1)  # [C, d_in]
    # Per feature, only subcomponents whose column carries a non-negligible share of the target
    # column's norm compete; a global norm filter would drop the true match of a feature whose
    # target column is much shorter than another feature's.
    keep = col_norm >= min_norm_frac * target_norm
    keep |= ~keep.any(dim=0, keepdim=True)  # no candidate at all: let every subcomponent compete
    dots = torch.einsum("coi,oi->ci", comps, target)
    cos = dots / (col_norm * target_norm).clamp_min(torch.finfo(torch.float64).tiny)
    cos = torch.where(keep, cos, torch.full_like(cos, -2.0))
    best_cos, best = cos.max(dim=0)  # [d_in]
    best_norm = col_norm.gather(0, best[None]).squeeze(0)
    mmcs = best_cos.mean().item()
    ml2r = (best_norm / target_norm).mean().item()
    assert math.isfinite(mmcs) and math.isfinite(ml2r)
    return mmcs, ml2r
