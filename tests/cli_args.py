"""The `spd-ray` command lines the end-to-end tests run: the command itself, and the `--set`
overrides that make a registry run short and deterministic (fp32, no compile, few eval batches)."""

from __future__ import annotations

import sys
from typing import Any

# Short, deterministic (fp32) versions of the registry runs; a test adds or changes keys.
FAST_SETTINGS: dict[str, Any] = {
    "autocast_bf16": "false",
    "compile_ci_fns": "false",
    "compile": "false",
    "n_eval_steps": 2,
    "faithfulness_warmup_steps": 20,
}


def spd_ray_cmd(*args: str) -> list[str]:
    """`spd-ray ARGS` as a command line for this interpreter."""
    return [sys.executable, "-m", "spd_ray.cli", *args]


def sets(settings: dict[str, Any]) -> list[str]:
    """`--set key=value` for each item, in order."""
    return [arg for key, value in settings.items() for arg in ("--set", f"{key}={value}")]


def fast(**changes: Any) -> list[str]:
    """The FAST_SETTINGS overrides with `changes` applied (a value of None drops the key)."""
    merged = {**FAST_SETTINGS, **changes}
    return sets({k: v for k, v in merged.items() if v is not None})
