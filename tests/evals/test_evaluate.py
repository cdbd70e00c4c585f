"""What `evaluate` admits: every eval-only metric class has a kind, and a metric the task cannot
compute is refused before any work, naming it."""

from __future__ import annotations

import math
import typing
from pathlib import Path

import pytest
import torch

from spd_ray import config as schema
from spd_ray.config import load_config
from spd_ray.evals.evaluate import check_eval_metrics, eval_only_kind
from spd_ray.registry import load_experiment


def test_every_eval_only_metric_class_has_a_kind() -> None:
    classes = typing.get_args(schema.EvalOnlyConfig)
    assert len(classes) == 12
    kinds = {cls.__name__: eval_only_kind(cls()) for cls in classes if _default_ok(cls)}
    assert kinds["CEandKLLosses"] == "lm"
    assert kinds["IdentityCIError"] == "toy"
    assert kinds["CI_L0"] == "any"
    multibatch = {"init": "ones", "step_size": 0.1, "n_steps": 1, "gradient_accumulation_steps": 2}
    assert eval_only_kind(schema.PGDMultiBatchReconLoss(**multibatch)) == "any"


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


def test_multibatch_pgd_reaches_the_eval_and_from_ones_is_the_unmasked_loss(
    tmp_path: Path,
) -> None:
    """Sources 1 with no steps and no delta: every mask is 1, so the multi-batch PGD value over
    the eval batches equals the unmasked recon averaged over the same (equal-sized) batches; from
    zeroes with steps it is a different, finite number; both are logged at every eval."""
    import spd_ray

    torch.set_num_threads(1)
    tiny = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_resid_mlp.yaml"
    metrics = [
        "{classname: UnmaskedReconLoss}",
        "{classname: PGDMultiBatchReconLoss, init: ones, step_size: 0.1, n_steps: 0, "
        "gradient_accumulation_steps: 2}",
        "{classname: PGDMultiBatchReconSubsetLoss, init: zeroes, step_size: 0.1, n_steps: 2, "
        "gradient_accumulation_steps: 2, routing: {type: uniform_k_subset}}",
    ]
    config = load_config(
        tiny,
        ["steps=20", "use_delta_component=false", f"eval_metric_configs=[{', '.join(metrics)}]"],
    )
    result = spd_ray.decompose(config, out=tmp_path, name="mb", progress=False)
    m = result.metrics
    assert m["eval/loss/PGDMultiBatchReconLoss"] == pytest.approx(
        m["eval/loss/UnmaskedReconLoss"], rel=1e-6
    )
    subset = m["eval/loss/PGDMultiBatchReconSubsetLoss"]
    assert math.isfinite(subset) and subset != m["eval/loss/UnmaskedReconLoss"]
