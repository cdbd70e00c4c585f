from collections import OrderedDict

import pytest
import torch

from spd_ray.config import DenseCIPattern, IdentityCIError, IdentityCIPattern
from spd_ray.evals.metrics import (
    CIStats,
    activation_density,
    ci_l0,
    ci_mean_per_component,
    identity_ci_errors,
    mmcs_ml2r,
)


def _ci() -> dict[str, torch.Tensor]:
    # layer "a.in": [batch 2, pos 2, C 3]; layer "b.out": [batch 2, pos 2, C 2]
    a = torch.tensor([[[1.0, 0.0, 0.5], [0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0], [0.2, 0.0, 0.0]]])
    b = torch.tensor([[[1.0, 0.0], [1.0, 1.0]], [[0.0, 0.0], [0.0, 0.3]]])
    return {"a.in": a, "b.out": b}


def test_ci_l0_counts_and_groups():
    out = ci_l0(_ci(), threshold=0.1, groups={"ins": ["*.in"], "all": ["a.*", "b.*"]})
    # a: counts per position 2, 0, 3, 1 -> 1.5 ; b: 1, 2, 0, 1 -> 1.0
    assert out["l0/a.in"].item() == pytest.approx(1.5)
    assert out["l0/b.out"].item() == pytest.approx(1.0)
    assert out["l0/ins"].item() == pytest.approx(1.5)
    assert out["l0/all"].item() == pytest.approx(2.5)
    assert out["l0/total"].item() == pytest.approx(2.5)
    assert all(v.ndim == 0 for v in out.values())
    # The threshold is strict: b's 0.3 is not active at 0.3.
    assert ci_l0(_ci(), threshold=0.3)["l0/b.out"].item() == pytest.approx(0.75)


def test_ci_l0_group_pattern_must_match():
    with pytest.raises(ValueError, match="'c.\\*'"):
        ci_l0(_ci(), threshold=0.1, groups={"g": ["c.*"]})


def test_density_and_mean():
    density = activation_density(_ci(), threshold=0.1)
    assert density["a.in"].tolist() == pytest.approx([0.75, 0.25, 0.5])
    assert density["b.out"].tolist() == pytest.approx([0.5, 0.5])
    mean = ci_mean_per_component(_ci())
    assert mean["a.in"].tolist() == pytest.approx([2.2 / 4, 0.25, 1.5 / 4])


def test_ci_stats_over_batches_equals_concatenated():
    g = torch.Generator().manual_seed(0)
    batches = [
        {"x": torch.rand(n, 3, 5, generator=g), "y": torch.rand(n, 3, 2, generator=g)}
        for n in (4, 7, 1)
    ]
    groups = {"both": ["*"]}
    stats = CIStats(threshold=0.5, groups=groups)
    for b in batches:
        stats.update(b)
    result = stats.compute()
    full = {k: torch.cat([b[k] for b in batches]) for k in ("x", "y")}
    expected_l0 = ci_l0(full, 0.5, groups)
    assert result.l0.keys() == expected_l0.keys()
    for k, v in expected_l0.items():
        torch.testing.assert_close(result.l0[k], v)
    for k, v in activation_density(full, 0.5).items():
        torch.testing.assert_close(result.density[k], v)
    for k, v in ci_mean_per_component(full).items():
        torch.testing.assert_close(result.mean[k], v)

    merged = CIStats(threshold=0.5, groups=groups)
    for b in batches:
        part = CIStats(threshold=0.5, groups=groups)
        part.update(b)
        merged.merge(part)
    for k, v in merged.compute().l0.items():
        torch.testing.assert_close(v, result.l0[k])


def test_ci_stats_rejects_changing_modules():
    stats = CIStats(threshold=0.0)
    stats.update({"x": torch.rand(2, 3)})
    with pytest.raises(ValueError, match="expected"):
        stats.update({"z": torch.rand(2, 3)})


def test_identity_ci_errors():
    in_ci = torch.eye(3)[:, [1, 2, 0]]
    in_ci = torch.cat([in_ci, torch.zeros(3, 2)], dim=1)
    in_ci[0, 3] = 0.15  # error at tol 0.1, not at 0.2
    out_ci = torch.zeros(3, 4)
    out_ci[:, 2] = 1.0
    out_ci[1, 0] = 0.5  # spurious at both tolerances
    cfg = IdentityCIError(
        identity_ci=[IdentityCIPattern(layer_pattern="*.mlp_in", n_features=3)],
        dense_ci=[DenseCIPattern(layer_pattern="*.mlp_out", k=1)],
    )
    ci = {"layers.0.mlp_in": in_ci, "layers.0.mlp_out": out_ci, "other": torch.ones(3, 3)}
    out = identity_ci_errors(ci, cfg)
    assert out == {
        "target_solution_error/total": 2.0,
        "target_solution_error/total_0p2": 1.0,
        "target_solution_error/layers.0.mlp_in": 1.0,
        "target_solution_error/layers.0.mlp_out": 1.0,
    }


def test_identity_ci_errors_bad_patterns():
    ci = {"layers.0.mlp_in": torch.eye(3)}
    missing = IdentityCIError(dense_ci=[DenseCIPattern(layer_pattern="*.mlp_out", k=1)])
    with pytest.raises(ValueError, match="mlp_out"):
        identity_ci_errors(ci, missing)
    wrong_n = IdentityCIError(identity_ci=[IdentityCIPattern(layer_pattern="*", n_features=4)])
    with pytest.raises(ValueError, match="layers.0.mlp_in"):
        identity_ci_errors(ci, wrong_n)


def _one_per_feature(target: torch.Tensor, n_spare: int, noise: float) -> torch.Tensor:
    """Subcomponent j holds target column j; spares and all other entries are tiny noise."""
    d_out, d_in = target.shape
    g = torch.Generator().manual_seed(1)
    comps = noise * torch.randn(d_in + n_spare, d_out, d_in, generator=g)
    for j in range(d_in):
        comps[j, :, j] = target[:, j]
    return comps


def test_mmcs_ml2r_exact_decomposition():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, generator=g)
    comps = _one_per_feature(target, n_spare=3, noise=1e-9)
    mmcs, ml2r = mmcs_ml2r(target, comps, min_norm_frac=0.1)
    assert mmcs == pytest.approx(1.0, abs=1e-6)
    assert ml2r == pytest.approx(1.0, abs=1e-6)


def test_mmcs_ml2r_scaled_subcomponent():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(2, 5, generator=g)
    comps = _one_per_feature(target, n_spare=0, noise=0.0)
    comps[3] *= 0.5
    mmcs, ml2r = mmcs_ml2r(target, comps, min_norm_frac=0.1)
    assert mmcs == pytest.approx(1.0, abs=1e-6)
    assert ml2r == pytest.approx((4 + 0.5) / 5, abs=1e-6)


def test_mmcs_ml2r_filters_near_zero_subcomponents():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(3, 4, generator=g)
    comps = _one_per_feature(target, n_spare=1, noise=0.0)
    # Feature 0's own subcomponent points slightly off; a near-zero spare points exactly along it.
    comps[0, :, 0] = target[:, 0] + 0.3 * torch.tensor([1.0, -1.0, 0.5])
    comps[4, :, 0] = 1e-4 * target[:, 0]
    unfiltered = mmcs_ml2r(target, comps, min_norm_frac=0.0)
    filtered = mmcs_ml2r(target, comps, min_norm_frac=0.1)
    without_spare = mmcs_ml2r(target, comps[:4], min_norm_frac=0.1)
    assert filtered == pytest.approx(without_spare)
    assert unfiltered[0] == pytest.approx(1.0)
    assert unfiltered[1] < 0.8  # the spare wins feature 0 with ratio 1e-4
    assert filtered[0] < 1.0


def test_mmcs_ml2r_shape_and_dead_column_checks():
    with pytest.raises(AssertionError, match="target weight"):
        mmcs_ml2r(torch.ones(2, 3), torch.ones(4, 3, 2), 0.1)
    target = torch.ones(2, 3)
    target[:, 1] = 0.0
    with pytest.raises(ValueError, match="zero columns \\[1\\]"):
        mmcs_ml2r(target, torch.ones(4, 2, 3), 0.1)


def test_eval_reports_the_reference_and_the_filtered_mmcs_ml2r():
    """Through the eval: `mmcs`/`ml2r` let every subcomponent compete (the reference), so a
    near-zero spare aligned with feature 0 wins it; `*_filtered` ignores the spare. Expected values
    by hand: features 1-3 are exact; feature 0 is the spare (cos 1, ratio 1e-4) or subcomponent 0
    (cos and ratio of t0 + 0.3 v against t0)."""
    from spd_ray import config as C
    from spd_ray.core.model import ComponentModel
    from spd_ray.evals.evaluate import _single_feature_metrics

    lin = torch.nn.Linear(4, 3, bias=False).requires_grad_(False)
    t = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    lin.weight.copy_(t)
    model = ComponentModel(torch.nn.Sequential(OrderedDict(lin=lin)), [("lin", 5)])
    v = torch.tensor([1.0, -1.0, 0.5])
    V, U = torch.zeros(4, 5), torch.zeros(5, 3)
    for j in range(4):
        V[j, j], U[j] = 1.0, t[:, j]
    U[0] = t[:, 0] + 0.3 * v  # feature 0's own subcomponent points slightly off
    V[0, 4], U[4] = 1e-4, t[:, 0]  # a near-zero spare exactly along feature 0
    comps = model.comps("lin")
    with torch.no_grad():
        comps.V.copy_(V)
        comps.U.copy_(U)
    cfg = C.MMCSAndML2R(module_patterns=["lin"], min_norm_frac=0.1)
    out, _ = _single_feature_metrics(model, {C.MMCSAndML2R: cfg}, None, slow=False)
    t0, own = t[:, 0].double(), (t[:, 0] + 0.3 * v).double()
    cos0 = float(own @ t0 / (own.norm() * t0.norm()))
    ratio0 = float(own.norm() / t0.norm())
    assert out["mmcs/lin"] == pytest.approx(1.0, abs=1e-6)
    assert out["ml2r/lin"] == pytest.approx((1e-4 + 3) / 4, abs=1e-6)
    assert out["mmcs_filtered/lin"] == pytest.approx((cos0 + 3) / 4, abs=1e-6)
    assert out["ml2r_filtered/lin"] == pytest.approx((ratio0 + 3) / 4, abs=1e-6)
    assert out["mmcs_filtered/lin"] < out["mmcs/lin"] - 1e-3, "the two variants must differ here"
