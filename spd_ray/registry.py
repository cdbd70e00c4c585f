"""Experiment registry: a name resolves to `experiments/<name>.yaml`; anything else is a YAML
path."""

from __future__ import annotations

import os
from pathlib import Path

from spd_ray.config import Config, ConfigError, load_config


def experiments_dir() -> Path:
    """The shipped experiments folder (repo checkout), overridable with SPD_RAY_EXPERIMENTS."""
    env = os.environ.get("SPD_RAY_EXPERIMENTS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parent.parent / "experiments"


def registry() -> dict[str, Path]:
    """{name: yaml path} of every shipped experiment, sorted by name."""
    folder = experiments_dir()
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def describe(path: Path) -> str:
    """The first line of the YAML's header comment."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("# ").strip()
        break
    return ""


def resolve(target: str) -> tuple[str, Path]:
    """(experiment name, yaml path) for a registry name or a YAML/JSON file path."""
    entries = registry()
    if target in entries:
        return target, entries[target]
    path = Path(target)
    if path.suffix in (".yaml", ".yml", ".json"):
        if not path.exists():
            raise ConfigError(f"config file not found: {path}")
        return path.stem, path
    known = ", ".join(entries) or "(none)"
    raise ConfigError(
        f"unknown experiment '{target}': not a registry name ({known}) nor a YAML path"
    )


def load_experiment(target: str, overrides: list[str] | None = None) -> tuple[str, Config]:
    name, path = resolve(target)
    return name, load_config(path, overrides)
