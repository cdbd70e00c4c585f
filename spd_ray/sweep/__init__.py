"""`spd-ray sweep`: search spaces over the config tree, trial configs, and sweep results.

`space` parses search-space files (the reference grid format plus distributions) into a
`SearchSpace` with grid, Optuna and Ray Tune forms; `trials` turns sampled params into validated
`Config`s and names; `results` (pandas/matplotlib, imported on its own) writes tables, Pareto
fronts, best configs and plots.
"""

from spd_ray.sweep.space import (
    Choice,
    IntRange,
    LogUniform,
    Param,
    SearchSpace,
    Uniform,
    Values,
    load_space,
    space_from_dict,
)
from spd_ray.sweep.trials import (
    apply_params,
    short_class,
    short_key,
    short_name,
    trial_config,
    validate_space,
)

__all__ = [
    "Choice",
    "IntRange",
    "LogUniform",
    "Param",
    "SearchSpace",
    "Uniform",
    "Values",
    "apply_params",
    "load_space",
    "short_class",
    "short_key",
    "short_name",
    "space_from_dict",
    "trial_config",
    "validate_space",
]
