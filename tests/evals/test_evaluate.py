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


def test_eval_importance_minimality_pools_every_batch_before_the_log_term() -> None:
    """The reference's eval definition: S_c and N summed over all eval batches, then
    sum_c [S_c/N + beta (S_c/N) log2(1 + S_c)]; with beta > 0 that differs from the mean of the
    per-batch losses, with beta = 0 it equals it."""
    import math

    import torch

    from spd_ray.core.losses import importance_minimality_loss
    from spd_ray.evals.evaluate import PooledImportanceMinimality

    g = torch.Generator().manual_seed(0)
    batches = [
        {"a": torch.rand(4, 3, generator=g), "b": torch.rand(4, 2, generator=g)} for _ in "xy"
    ]
    cfg = schema.ImportanceMinimalityLoss(coeff=1.0, pnorm=2.0, beta=0.5, eps=1e-12)
    pooled = PooledImportanceMinimality(cfg, step_frac=0.0)
    for ci in batches:
        pooled.update(ci)
    expected = 0.0
    for path in ("a", "b"):
        both = torch.cat([ci[path] for ci in batches]).double()
        for c in range(both.shape[1]):
            S = float(((both[:, c] + 1e-12) ** 2).sum())
            m = S / 8
            expected += m + 0.5 * m * math.log2(1 + S)
    assert pooled.compute(world_size=1).item() == pytest.approx(expected, rel=1e-6)
    per_batch = [importance_minimality_loss(ci, 2.0, 0.5, 1e-12).item() for ci in batches]
    assert abs(sum(per_batch) / 2 - expected) > 1e-3 * expected

    flat = PooledImportanceMinimality(cfg.model_copy(update={"beta": 0.0}), step_frac=0.0)
    for ci in batches:
        flat.update(ci)
    per_batch = [importance_minimality_loss(ci, 2.0, 0.0, 1e-12).item() for ci in batches]
    assert flat.compute(world_size=1).item() == pytest.approx(sum(per_batch) / 2, rel=1e-6)
