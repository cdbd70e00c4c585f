"""Search spaces for `spd-ray sweep`: the reference sweep-file format plus distributions.

A search-space file has a `global` block and blocks keyed by experiment name; an experiment's
block merges recursively over `global` (a list replaces the global list wholesale). Every leaf
is one of `{values: [...]}` (a grid axis, the reference format), `{choice: [...]}`,
`{loguniform: [lo, hi]}`, `{uniform: [lo, hi]}` or `{int: [lo, hi]}` (inclusive). Nested
mappings give dotted keys (`lr_schedule.start_val`); `loss_metric_configs` /
`eval_metric_configs` lists address their items by `classname`, giving keys
`loss_metric_configs.<ClassName>.<field>` - the same keys `set_by_key` and `--set` take.

A trial's parameters are a flat `{dotted key: value}` dict (see `spd_ray.sweep.trials`).
"""

from __future__ import annotations

import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from spd_ray.config import ConfigError
from spd_ray.registry import registry

if TYPE_CHECKING:
    import optuna

DISTRIBUTIONS = ("values", "choice", "loguniform", "uniform", "int")
LIST_KEYS = ("loss_metric_configs", "eval_metric_configs")
_PRIMITIVE = (type(None), bool, int, float, str)
_LEAF_HELP = (
    "expected {values: [...]}, {choice: [...]}, {loguniform: [lo, hi]}, {uniform: [lo, hi]} "
    "or {int: [lo, hi]}"
)


# ---------------------------------------------------------------------------------------------
# Parameters: one small dataclass per kind of leaf
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Categorical:
    options: tuple[Any, ...]

    @property
    def representative(self) -> Any:
        return self.options[0]

    @property
    def probes(self) -> tuple[Any, ...]:
        return self.options

    @property
    def json_encoded(self) -> bool:
        """Optuna stores only None/bool/int/float/str choices; others travel as JSON text."""
        return not all(isinstance(o, _PRIMITIVE) for o in self.options)

    def to_optuna(self) -> BaseDistribution:
        opts = [json.dumps(o) for o in self.options] if self.json_encoded else self.options
        return CategoricalDistribution(tuple(opts))


@dataclass(frozen=True)
class Values(_Categorical):
    """`{values: [...]}`: a grid axis (categorical for samplers)."""

    def to_tune(self) -> Any:
        from ray import tune

        return tune.grid_search(list(self.options))


@dataclass(frozen=True)
class Choice(_Categorical):
    """`{choice: [...]}`: sampled uniformly from the options."""

    def to_tune(self) -> Any:
        from ray import tune

        return tune.choice(list(self.options))


# An interior point that is never a round fraction, so a float range over an int field fails.
_INTERIOR = (3.0 - math.sqrt(5.0)) / 2.0


@dataclass(frozen=True)
class LogUniform:
    """`{loguniform: [lo, hi]}`: log-uniform on [lo, hi], lo > 0."""

    lo: float
    hi: float

    @property
    def representative(self) -> float:
        return self.lo

    @property
    def probes(self) -> tuple[float, ...]:
        return (self.lo, self.lo * (self.hi / self.lo) ** _INTERIOR, self.hi)

    def to_optuna(self) -> BaseDistribution:
        return FloatDistribution(self.lo, self.hi, log=True)

    def to_tune(self) -> Any:
        from ray import tune

        return tune.loguniform(self.lo, self.hi)


@dataclass(frozen=True)
class Uniform:
    """`{uniform: [lo, hi]}`: uniform on [lo, hi]."""

    lo: float
    hi: float

    @property
    def representative(self) -> float:
        return self.lo

    @property
    def probes(self) -> tuple[float, ...]:
        return (self.lo, self.lo + (self.hi - self.lo) * _INTERIOR, self.hi)

    def to_optuna(self) -> BaseDistribution:
        return FloatDistribution(self.lo, self.hi)

    def to_tune(self) -> Any:
        from ray import tune

        return tune.uniform(self.lo, self.hi)


@dataclass(frozen=True)
class IntRange:
    """`{int: [lo, hi]}`: uniform integer in [lo, hi], both inclusive."""

    lo: int
    hi: int

    @property
    def representative(self) -> int:
        return self.lo

    @property
    def probes(self) -> tuple[int, ...]:
        return (self.lo, self.hi)

    def to_optuna(self) -> BaseDistribution:
        return IntDistribution(self.lo, self.hi)

    def to_tune(self) -> Any:
        from ray import tune

        return tune.randint(self.lo, self.hi + 1)  # tune's upper bound is exclusive


Param = Values | Choice | LogUniform | Uniform | IntRange


# ---------------------------------------------------------------------------------------------
# The search space
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchSpace:
    """The merged parameters of one experiment, in file order (global first)."""

    params: dict[str, Param]
    source: str = ""

    @property
    def is_grid(self) -> bool:
        return all(isinstance(p, Values) for p in self.params.values())

    @property
    def grid_size(self) -> int:
        """Combinations of the `values` axes (1 when there are none); with distributions too,
        each sample is drawn once per combination."""
        return math.prod(len(p.options) for p in self.params.values() if isinstance(p, Values))

    def grid(self) -> list[dict[str, Any]]:
        """The Cartesian product of the `values` axes; the last key varies fastest."""
        if not self.is_grid:
            others = [k for k, p in self.params.items() if not isinstance(p, Values)]
            raise ConfigError(f"{self.source}: not a grid; sampled keys: {', '.join(others)}")
        keys = list(self.params)
        axes = [p.options for p in self.params.values() if isinstance(p, Values)]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*axes)]

    def representative(self) -> dict[str, Any]:
        """One point: the first of each values/choice list, lo of each range."""
        return {k: p.representative for k, p in self.params.items()}

    def to_optuna(self) -> dict[str, BaseDistribution]:
        """Optuna distributions by dotted key; see `decode_optuna` for non-scalar choices."""
        return {k: p.to_optuna() for k, p in self.params.items()}

    def decode_optuna(self, params: dict[str, Any]) -> dict[str, Any]:
        """Values drawn from `to_optuna()` distributions -> trial params (JSON choices decoded)."""
        out = dict(params)
        for k, p in self.params.items():
            if isinstance(p, _Categorical) and p.json_encoded:
                out[k] = json.loads(out[k])
        return out

    def sample_optuna(self, trial: optuna.Trial) -> dict[str, Any]:
        """Suggest every parameter under its dotted key (define-by-run); returns trial params."""
        drawn: dict[str, Any] = {}
        for k, p in self.params.items():
            match p:
                case Values() | Choice():
                    dist = p.to_optuna()
                    assert isinstance(dist, CategoricalDistribution)
                    drawn[k] = trial.suggest_categorical(k, dist.choices)
                case LogUniform():
                    drawn[k] = trial.suggest_float(k, p.lo, p.hi, log=True)
                case Uniform():
                    drawn[k] = trial.suggest_float(k, p.lo, p.hi)
                case IntRange():
                    drawn[k] = trial.suggest_int(k, p.lo, p.hi)
        return self.decode_optuna(drawn)

    def to_tune(self) -> dict[str, Any]:
        """A flat Ray Tune `param_space` keyed by dotted key (grid_search / loguniform / ...)."""
        return {k: p.to_tune() for k, p in self.params.items()}


# ---------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _bounds(name: str, arg: Any, where: str) -> tuple[Any, Any]:
    if not (isinstance(arg, list) and len(arg) == 2):
        raise ConfigError(f"{where}: {name} takes [lo, hi], got {arg!r}")
    for x in arg:
        if isinstance(x, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?[eE][-+]?\d+", x):
            raise ConfigError(
                f"{where}: {name} bound {x!r} is a string to YAML, whose floats need a dot and a "
                f"signed exponent: write {float(x):e}"
            )
        if not _is_number(x) or (name == "int" and not isinstance(x, int)):
            kind = "integer" if name == "int" else "numeric"
            raise ConfigError(f"{where}: {name} bounds must be {kind}, got {arg!r}")
    lo, hi = arg
    if lo >= hi:
        raise ConfigError(f"{where}: {name} needs lo < hi, got [{lo}, {hi}]")
    if name == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: loguniform needs lo > 0, got [{lo}, {hi}]")
    return lo, hi


def _parse_leaf(spec: dict[str, Any], where: str) -> Param:
    if len(spec) != 1:
        raise ConfigError(f"{where}: a leaf has exactly one key; got {sorted(spec)}. {_LEAF_HELP}")
    ((name, arg),) = spec.items()
    match name:
        case "values" | "choice":
            if not isinstance(arg, list) or not arg:
                raise ConfigError(f"{where}: {name} must be a non-empty list, got {arg!r}")
            return Values(tuple(arg)) if name == "values" else Choice(tuple(arg))
        case "loguniform":
            return LogUniform(*(float(b) for b in _bounds(name, arg, where)))
        case "uniform":
            return Uniform(*(float(b) for b in _bounds(name, arg, where)))
        case "int":
            return IntRange(*_bounds(name, arg, where))
    raise AssertionError(name)


Flat = dict[str, tuple[Param, str | None]]  # key -> (param, the list it came from, if any)


def _add(out: Flat, key: str, param: Param, from_list: str | None, source: str) -> None:
    if key in out:
        raise ConfigError(f"{source}: {key} is given twice")
    out[key] = (param, from_list)


def _flatten(
    node: dict[str, Any], prefix: str, source: str, out: Flat, from_list: str | None
) -> None:
    """Walk a mapping of the space, adding its leaves under `prefix`."""
    for k, v in node.items():
        if not isinstance(k, str) or any(not part for part in k.split(".")):
            raise ConfigError(f"{source}: bad key {k!r} under {prefix or 'the top level'}")
        key = f"{prefix}.{k}" if prefix else k
        where = f"{source}: {key}"
        if key in LIST_KEYS and isinstance(v, list):
            _flatten_items(v, key, source, out)
        elif isinstance(v, dict):
            if not v:
                raise ConfigError(f"{where}: empty mapping; {_LEAF_HELP}")
            if any(name in DISTRIBUTIONS for name in v):
                _add(out, key, _parse_leaf(v, where), from_list, source)
            elif len(v) == 1 and isinstance(next(iter(v.values())), list):
                raise ConfigError(
                    f"{where}: unknown distribution {next(iter(v))!r}; "
                    f"expected one of {', '.join(DISTRIBUTIONS)}"
                )
            else:
                _flatten(v, key, source, out, from_list)
        else:
            raise ConfigError(f"{where}: {v!r} is not a search-space leaf; {_LEAF_HELP}")


def _flatten_items(items: list[Any], key: str, source: str, out: Flat) -> None:
    seen: set[str] = set()
    for i, item in enumerate(items):
        where = f"{source}: {key}[{i}]"
        if not isinstance(item, dict) or not isinstance(item.get("classname"), str):
            raise ConfigError(f"{where}: each item needs a `classname`, got {item!r}")
        cls = item["classname"]
        if cls in seen:
            raise ConfigError(f"{where}: classname {cls} appears twice")
        seen.add(cls)
        rest = {k: v for k, v in item.items() if k != "classname"}
        if not rest:
            raise ConfigError(f"{where}: item {cls} has nothing to sweep")
        _flatten(rest, f"{key}.{cls}", source, out, key)


def _block(data: dict[str, Any], name: str, source: str) -> tuple[Flat, set[str]]:
    """Flat leaves of one top-level block and the lists it writes in list form."""
    block = data.get(name)
    if block is None:
        return {}, set()
    if not isinstance(block, dict):
        raise ConfigError(f"{source}: {name} must be a mapping, got {block!r}")
    out: Flat = {}
    _flatten(block, "", source, out, None)
    return out, {k for k in LIST_KEYS if isinstance(block.get(k), list)}


def space_from_dict(data: dict[str, Any], experiment: str, source: str = "") -> SearchSpace:
    """The space of `experiment`: its block merged over `global` (a list replaces wholesale)."""
    known = set(registry()) | {"global", experiment}
    unknown = [k for k in data if k not in known]
    if unknown:
        raise ConfigError(
            f"{source}: unknown block(s) {', '.join(map(str, unknown))}: neither `global` nor an "
            f"experiment name ({', '.join(sorted(known - {'global'}))})"
        )
    glob, _ = _block(data, "global", source)
    exp, exp_lists = _block(data, experiment, source)
    merged = {k: v for k, v in glob.items() if v[1] not in exp_lists}
    merged.update(exp)
    if not merged:
        raise ConfigError(f"{source}: no parameters to sweep for {experiment}")
    return SearchSpace({k: p for k, (p, _) in merged.items()}, source=source)


def load_space(path: str | Path, experiment: str) -> SearchSpace:
    """Read a search-space file and merge the block of `experiment` over `global`."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"search-space file not found: {path}")
    data = yaml.safe_load(path.read_text())
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping with `global` and experiment blocks")
    return space_from_dict(data, experiment, str(path))
