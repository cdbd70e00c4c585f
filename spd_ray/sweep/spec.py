"""What defines a sweep (`SweepSpec`, stored in sweep.json and checked on resume): the driver
writes it, every trial reads it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spd_ray.sweep.results import Objective


@dataclass
class SweepSpec:
    """Everything that defines a sweep; stored in sweep.json and checked on resume."""

    experiment: str
    target: str
    space_file: str
    space: dict[str, Any]  # the parsed leaves, {dotted key: description}
    overrides: list[str]
    objectives: list[tuple[str, str]]
    trials: int
    concurrent: int
    workers_per_trial: int
    gpu: bool
    scheduler: str
    seed: int
    base_config: dict[str, Any] = field(default_factory=dict)

    # Fields a rerun may not change (they define which trials exist and what they mean).
    FIXED = ("experiment", "space", "overrides", "objectives", "trials", "scheduler", "seed")

    def objective_list(self) -> list[Objective]:
        return [(m, d) for m, d in self.objectives]  # type: ignore[misc]
