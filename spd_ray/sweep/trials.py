"""Trial configs and names: a trial's flat `{dotted key: value}` params applied to a base
`Config`, validated with errors that name the swept key, and checked for a whole space before any
trial runs.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import ValidationError

from spd_ray.config import Config, ConfigError, set_by_key
from spd_ray.sweep.space import LIST_KEYS, SearchSpace

# ---------------------------------------------------------------------------------------------
# Trial configs
# ---------------------------------------------------------------------------------------------


def apply_params(base: dict[str, Any], params: dict[str, Any]) -> dict[str, Any]:
    """A copy of the plain config dict `base` with each dotted key of `params` set."""
    data = base
    for key, value in params.items():
        try:
            data = set_by_key(data, key, value)
        except ConfigError as err:
            raise ConfigError(f"sweep parameter {key}={value!r}: {err}") from None
    return data


def _dotted_loc(loc: tuple[int | str, ...], data: dict[str, Any]) -> str:
    """A pydantic error location in `set_by_key` notation (list items by classname)."""
    parts = [str(p) for p in loc]
    if len(loc) >= 2 and loc[0] in LIST_KEYS and isinstance(loc[1], int):
        items = data.get(str(loc[0])) or []
        item = items[loc[1]] if loc[1] < len(items) else None
        cls = item.get("classname") if isinstance(item, dict) else None
        rest = parts[2:]
        if cls is not None and rest and rest[0] == cls:
            rest = rest[1:]
        parts = [parts[0], str(cls if cls is not None else loc[1]), *rest]
    return ".".join(parts)


Problem = tuple[str | None, str]  # (the swept key at fault, or None; message)


def _related(a: str, b: str) -> bool:
    return a == b or a.startswith(b + ".") or b.startswith(a + ".")


def _explain(err: ValidationError, data: dict[str, Any], params: dict[str, Any]) -> list[Problem]:
    """Each validation error, attributed to the swept keys it concerns (None: to none)."""
    out: list[Problem] = []
    for e in err.errors():
        loc = _dotted_loc(e["loc"], data)
        msg = "not a config key" if e["type"] == "extra_forbidden" else e["msg"]
        keys = [k for k in params if loc and _related(k, loc)]
        if not keys:  # model validators report at the model; their messages name the field
            keys = [k for k in params if re.search(rf"(?<![\w.]){re.escape(k)}(?!\w)", e["msg"])]
        if not keys:
            swept = ", ".join(f"{k}={v!r}" for k, v in params.items())
            out.append((None, f"{loc or '(config)'}: {msg} (with {swept})"))
        out.extend((k, f"{k}={params[k]!r}: {msg}") for k in keys)
    return out


def _problems(base: dict[str, Any], params: dict[str, Any]) -> list[Problem]:
    """Everything wrong with the config of `params`; an empty list when it is valid."""
    data = base
    for key, value in params.items():
        try:
            data = set_by_key(data, key, value)
        except ConfigError as err:
            return [(key, f"{key}={value!r}: {err}")]
    try:
        Config.model_validate(data)
    except ValidationError as err:
        return _explain(err, data, params)
    return []


def trial_config(base_config: Config, params: dict[str, Any], source: str = "") -> Config:
    """`base_config` with the trial's params applied, validated; errors name the swept keys."""
    data = apply_params(base_config.model_dump(mode="json"), params)
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        where = f"{source}: " if source else ""
        problems = "; ".join(msg for _, msg in _explain(err, data, params))
        raise ConfigError(f"{where}invalid trial config: {problems}") from None


def validate_space(base_config: Config, space: SearchSpace) -> None:
    """Fail before any trial when a key of the space is not a valid config key or one of its
    values/bounds makes an invalid config; every bad key is reported at once.

    Each parameter is probed at each value of values/choice and at lo, an interior point and hi
    of a range, with the other parameters at their representative values.
    """
    base = base_config.model_dump(mode="json")
    reps = space.representative()
    found: dict[str, str] = {}
    for key, param in space.params.items():
        for value in param.probes:
            for k, msg in _problems(base, {**reps, key: value}):
                found.setdefault(k or "(combination)", msg)
    if found:
        lines = "\n".join(f"  {msg}" for msg in found.values())
        where = f"{space.source}: " if space.source else ""
        raise ConfigError(f"{where}invalid search space:\n{lines}")


# ---------------------------------------------------------------------------------------------
# Trial names
# ---------------------------------------------------------------------------------------------

_CLASS_WORDS = (
    ("Importance", "Imp"),
    ("Minimality", "Min"),
    ("Stochastic", "Stoch"),
    ("Layerwise", "Layer"),
    ("Subset", "Sub"),
    ("Unmasked", "Unmask"),
    ("Masked", "Mask"),
    ("Faithfulness", "Faith"),
    ("HiddenActs", "Hidden"),
)


def short_class(classname: str) -> str:
    """ImportanceMinimalityLoss -> ImpMin, StochasticReconLayerwiseLoss -> StochReconLayer."""
    name = classname.removesuffix("Loss") or classname
    for word, short in _CLASS_WORDS:
        name = name.replace(word, short)
    return name


def short_key(key: str) -> str:
    """`loss_metric_configs.ImportanceMinimalityLoss.coeff` -> `ImpMin.coeff`."""
    parts = key.split(".")
    if parts[0] in LIST_KEYS and len(parts) >= 2:
        parts = [short_class(parts[1]), *parts[2:]]
    return ".".join(parts)


def _short_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    if isinstance(value, list | dict):
        return json.dumps(value, separators=(",", ":"))
    return str(value)


def short_name(params: dict[str, Any], max_len: int = 80) -> str:
    """A readable, filesystem-safe `<key>-<val>_<key>-<val>` fragment (floats to 3 significant
    digits, so not unique: prefix a trial id); past `max_len` it is cut and ends in a hash of the
    params."""
    raw = "_".join(f"{short_key(k)}-{_short_value(v)}" for k, v in params.items())
    text = re.sub(r"[^A-Za-z0-9._+-]+", "~", raw)
    if len(text) <= max_len:
        return text
    digest = hashlib.sha1(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return f"{text[: max_len - 9]}_{digest}"
