"""What `evaluate` admits: every eval-only metric class has a kind, and a metric the task cannot
compute is refused before any work, naming it."""

from __future__ import annotations

import typing

import pytest

from spd_ray import config as schema
from spd_ray.evals.evaluate import check_eval_metrics, eval_only_kind
from spd_ray.registry import load_experiment


def test_every_eval_only_metric_class_has_a_kind() -> None:
    classes = typing.get_args(schema.EvalOnlyConfig)
    assert len(classes) == 10
    kinds = {cls.__name__: eval_only_kind(cls()) for cls in classes if _default_ok(cls)}
    assert kinds["CEandKLLosses"] == "lm"
    assert kinds["IdentityCIError"] == "toy"
    assert kinds["CI_L0"] == "any"


def _default_ok(cls: type) -> bool:
    try:
        cls()
    except Exception:  # noqa: BLE001 - classes with required fields are skipped
        return False
    return True


def _with_metric(experiment: str, metric: dict[str, object]) -> schema.Config:
    _, config = load_experiment(experiment)
    data = config.model_dump(mode="json")
    data["eval_metric_configs"] = [*data["eval_metric_configs"], metric]
    return schema.config_from_dict(data)


def test_a_toy_metric_on_induction_heads_is_refused_up_front() -> None:
    config = _with_metric("ih", {"classname": "IdentityCIError", "identity_ci": [], "dense_ci": []})
    with pytest.raises(ValueError, match=r"eval_metric_configs\.IdentityCIError needs a toy task"):
        check_eval_metrics(config)


def test_a_language_model_metric_on_a_toy_is_refused_up_front() -> None:
    config = _with_metric("tms_5-2", {"classname": "CEandKLLosses"})
    with pytest.raises(ValueError, match=r"CEandKLLosses needs a language-model task .*'tms'"):
        check_eval_metrics(config)


def test_the_shipped_toys_pass() -> None:
    for name in ("tms_5-2", "resid_mlp1", "ih"):
        check_eval_metrics(load_experiment(name)[1])
