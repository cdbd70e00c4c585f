"""Eval-only metrics, target-pattern distances and figures (functions of tensors).

The figure functions live in `spd_ray.evals.figures` (`figures.ci_mean_per_component` plots what
`metrics.ci_mean_per_component` computes, so only the module is exported here).
"""

from spd_ray.evals import figures
from spd_ray.evals.figures import save_figures
from spd_ray.evals.metrics import (
    CIStats,
    CIStatsResult,
    activation_density,
    ci_l0,
    ci_mean_per_component,
    identity_ci_errors,
    mmcs_ml2r,
)
from spd_ray.evals.target_solutions import (
    dense_distance,
    identity_distance,
    match_patterns,
    permute_by_pattern,
    permute_to_dense,
    permute_to_identity,
)

__all__ = [
    "CIStats",
    "CIStatsResult",
    "activation_density",
    "ci_l0",
    "ci_mean_per_component",
    "dense_distance",
    "figures",
    "identity_ci_errors",
    "identity_distance",
    "match_patterns",
    "mmcs_ml2r",
    "permute_by_pattern",
    "permute_to_dense",
    "permute_to_identity",
    "save_figures",
]
