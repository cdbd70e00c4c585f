"""What an attribution matrix indexes: which run kind, the source and target layers, the alive
subcomponents (from the run's harvest, else all of them), and the connectivity between layers.

Sources: the inputs (language models: one per vocabulary id, `wte:<id>`; toy models: one per input
feature, `input:<i>`), then the alive subcomponents (`<module path>:<c>`) in module order.
Targets: the alive subcomponents, then the output (`output:<i>`: for language models the
pre-unembedding residual dims, from which a token's attribution is computed through W_U at query
time; for toy models the output features).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from spd_ray.config import Config, LMTaskConfig
from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError

Kind = Literal["lm", "toy"]
INPUT_LM = "wte"  # the token-embedding source layer: "wte:<token id>"
INPUT_TOY = "input"  # the toy input-feature source layer: "input:<feature>"
OUTPUT = "output"  # the output target layer: "output:<token id>" / "output:<feature>"


def model_kind(config: Config) -> Kind:
    """The run's kind: language model ("lm") or tms / resid_mlp ("toy")."""
    task = config.task_config
    if isinstance(task, LMTaskConfig):
        return "lm"
    if task.task_name in ("tms", "resid_mlp"):
        return "toy"
    raise InputError(
        f"attributions support language-model and tms/resid_mlp runs, not {task.task_name!r}"
    )


# -- which subcomponents take part -----------------------------------------------------------------


@dataclass(frozen=True)
class Alive:
    """The alive subcomponents (sources and targets alike) and where that came from."""

    indices: dict[str, list[int]]  # module path -> alive component indices, ascending
    source: Literal["harvest", "all"]
    message: str  # one line for the user


def alive_components(model: ComponentModel, run_dir: Path, ci_threshold: float) -> Alive:
    """Subcomponents whose harvest mean CI exceeds `ci_threshold`; every subcomponent (saying so)
    when the run has no harvest."""
    from spd_ray.harvest.store import Harvest, harvest_dir

    N = sum(model.C(p) for p in model.module_paths)
    if not (harvest_dir(run_dir) / "meta.json").exists():
        return Alive(
            {p: list(range(model.C(p))) for p in model.module_paths},
            "all",
            f"no harvest in {run_dir}: using all {N} subcomponents (run `spd-ray harvest` first "
            "to leave out dead ones)",
        )
    table = Harvest(run_dir).components
    keys, values = table.column("key").to_pylist(), table.column("mean_ci").to_pylist()
    mean_ci = dict(zip(keys, values, strict=True))
    indices: dict[str, list[int]] = {}
    for p in model.module_paths:
        missing = [f"{p}:{c}" for c in range(model.C(p)) if f"{p}:{c}" not in mean_ci]
        if missing:
            raise InputError(
                f"the harvest of {run_dir} has no {missing[0]} (it is of another decomposition): "
                "rerun `spd-ray harvest`"
            )
        indices[p] = [c for c in range(model.C(p)) if mean_ci[f"{p}:{c}"] > ci_threshold]
    n = sum(len(v) for v in indices.values())
    return Alive(
        indices, "harvest", f"{n}/{N} subcomponents alive (harvest mean CI > {ci_threshold})"
    )


# -- the index layout ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Index spaces of an attribution matrix [n_targets, n_sources].

    Sources: the inputs [0, n_inputs), then the alive subcomponents in module order.
    Targets: the alive subcomponents in module order [0, n_components), then the output
    [n_components, n_components + n_outputs) (residual dims for language models, features for toys).
    """

    kind: Kind
    n_inputs: int  # vocabulary size / input features
    n_outputs: int  # d_model of the pre-unembedding residual / output features
    alive: dict[str, list[int]]  # every module path, in module order -> alive indices
    sources_by_target: dict[str, list[str]]
    _offsets: dict[str, int] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        at = 0
        for path, idx in self.alive.items():
            self._offsets[path] = at
            at += len(idx)

    @property
    def input_layer(self) -> str:
        return INPUT_LM if self.kind == "lm" else INPUT_TOY

    @property
    def n_components(self) -> int:
        return sum(len(v) for v in self.alive.values())

    @property
    def n_sources(self) -> int:
        return self.n_inputs + self.n_components

    @property
    def n_targets(self) -> int:
        return self.n_components + self.n_outputs

    def component_keys(self) -> list[str]:
        return [f"{p}:{c}" for p, idx in self.alive.items() for c in idx]

    def target_span(self, layer: str) -> tuple[int, int]:
        """[start, stop) of a target layer's rows."""
        if layer == OUTPUT:
            return self.n_components, self.n_targets
        start = self._offsets[layer]
        return start, start + len(self.alive[layer])

    def source_span(self, layer: str) -> tuple[int, int]:
        """[start, stop) of a source layer's columns."""
        if layer == self.input_layer:
            return 0, self.n_inputs
        start = self.n_inputs + self._offsets[layer]
        return start, start + len(self.alive[layer])

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "n_inputs": self.n_inputs,
            "n_outputs": self.n_outputs,
            "alive": self.alive,
            "sources_by_target": self.sources_by_target,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Layout:
        return cls(d["kind"], d["n_inputs"], d["n_outputs"], d["alive"], d["sources_by_target"])
