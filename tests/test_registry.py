"""The experiment registry: every shipped `experiments/*.yaml` resolves by name, validates, starts
with its header comment and states only what differs from the config schema's defaults."""

from __future__ import annotations

import itertools
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from spd_ray.config import Config, ConfigError, config_from_dict
from spd_ray.registry import describe, experiments_dir, load_experiment, registry, resolve

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
SHIPPED = sorted(EXPERIMENTS.glob("*.yaml"))


def _is_tag(model: BaseModel, key: str) -> bool:
    """A discriminator field (`classname`, `task_name`, `model_type`): a one-value Literal that
    must be written even though it has a default."""
    annotation = type(model).model_fields[key].annotation
    args = typing.get_args(annotation)
    return typing.get_origin(annotation) is typing.Literal and len(args) == 1


def _restates_default(model: BaseModel, key: str) -> bool:
    field = type(model).model_fields[key]
    if field.is_required() or _is_tag(model, key):
        return False
    return getattr(model, key) == field.get_default(call_default_factory=True, validated_data={})


def restated_defaults(raw: dict[str, Any], model: BaseModel, where: str = "") -> list[str]:
    """Dotted keys written in `raw` whose validated value in `model` equals the field's default
    (list items as `key[i]`); nested models and lists of models are walked."""
    found: list[str] = []
    for key, value in raw.items():
        loc = f"{where}.{key}" if where else key
        obj = getattr(model, key)
        if _restates_default(model, key):
            found.append(loc)
            continue
        if isinstance(obj, BaseModel) and isinstance(value, dict):
            found += restated_defaults(value, obj, loc)
        elif isinstance(obj, list) and isinstance(value, list):
            for i, (item, raw_item) in enumerate(zip(obj, value, strict=True)):
                if isinstance(item, BaseModel) and isinstance(raw_item, dict):
                    found += restated_defaults(raw_item, item, f"{loc}[{i}]")
    return found


def test_registry_lists_every_shipped_yaml():
    assert SHIPPED, f"no YAML under {EXPERIMENTS}"
    assert experiments_dir() == EXPERIMENTS
    assert registry() == {p.stem: p for p in SHIPPED}
    # The experiments the docs and tests name, the toys and the language models alike.
    expected = {
        "tms_5-2",
        "tms_5-2-id",
        "tms_40-10",
        "tms_40-10-id",
        "resid_mlp1",
        "resid_mlp2",
        "resid_mlp3",
        "ih",
        "tiny_llama",
        "tiny_llama_1L",
        "tiny_gpt2",
        "ss_llama_simple_mlp-1L",
        "ss_gpt2",
        "gpt2",
        "ts",
    }
    assert expected <= set(registry())


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_loads_by_name(path: Path):
    name, config = load_experiment(path.stem)
    assert name == path.stem and isinstance(config, Config)
    assert resolve(str(path)) == (path.stem, path)  # the file path names the same experiment
    assert load_experiment(str(path))[1] == config


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_header(path: Path):
    """STYLE rule 11: what it decomposes, the command, and the expected cost."""
    text = path.read_text()
    assert text.startswith("# "), f"{path} should start with a header comment"
    assert describe(path), path
    header = "\n".join(itertools.takewhile(lambda ln: ln.startswith("#"), text.splitlines()))
    assert f"spd-ray run {path.stem}" in header, f"{path}: no launch command in the header"
    assert "Cost:" in header, f"{path}: no expected cost in the header"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_experiment_states_no_default(path: Path):
    raw = yaml.safe_load(path.read_text())
    assert restated_defaults(raw, config_from_dict(raw, str(path))) == []


def test_restated_defaults_finds_nested_defaults_and_keeps_tags():
    raw = yaml.safe_load((EXPERIMENTS / "tms_5-2.yaml").read_text())
    raw["seed"] = 0
    raw["sigmoid_type"] = "leaky_hard"
    raw["ci_fn_hidden_dims"] = [8]
    raw["lr_schedule"]["warmup_pct"] = 0.0
    raw["loss_metric_configs"][0]["eps"] = 1e-12
    raw["loss_metric_configs"][1]["coeff"] = 2.0  # not a default: kept
    raw["target_model"]["steps"] = 10_000
    raw["task_config"]["data_generation_type"] = "at_least_zero_active"
    raw["eval_metric_configs"].append({"classname": "CEandKLLosses", "rounding_threshold": 0.0})
    last = len(raw["eval_metric_configs"]) - 1
    assert sorted(restated_defaults(raw, config_from_dict(raw))) == sorted(
        [
            "seed",
            "sigmoid_type",
            "ci_fn_hidden_dims",
            "lr_schedule.warmup_pct",
            "loss_metric_configs[0].eps",
            f"eval_metric_configs[{last}].rounding_threshold",
            "target_model.steps",
            "task_config.data_generation_type",
        ]
    )


def test_unknown_experiment_names_the_known_ones():
    with pytest.raises(ConfigError, match="unknown experiment 'tms_5_2'.*tms_5-2"):
        resolve("tms_5_2")
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        resolve("nope.yaml")
