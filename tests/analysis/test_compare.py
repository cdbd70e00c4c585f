"""`spd-ray compare`: best |cos| of each firing subcomponent of run A against run B's."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_args import spd_ray_cmd
from torch import nn

from spd_ray.analysis.batches import run_batches
from spd_ray.analysis.compare import (
    COMPARISON_FILE,
    best_abs_cosine,
    compare_loaded,
    compare_models,
    compare_runs,
    format_table,
    rank_one_abs_cosines,
)
from spd_ray.core.ci import MLPCiFn
from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError
from spd_ray.loaded_run import LoadedRun, load_run

SETTINGS = {"density_threshold": 0.001, "n_batches": 5, "batch_size": 32, "seed": 0}


@pytest.fixture(scope="module")
def tms_run(short_tms: Path) -> Path:
    """A short tms_5-2 decomposition (a checkpoint, not a good one), shared by the session."""
    return short_tms


# -- the pure functions ---------------------------------------------------------------------------


def test_best_abs_cosine_finds_permuted_negated_rows() -> None:
    g = torch.Generator().manual_seed(0)
    wa = torch.randn(7, 12, generator=g)
    perm = torch.randperm(7, generator=g)
    scale = torch.rand(7, 1, generator=g) + 0.5
    wb = -wa[perm] * scale  # B's row j is A's row perm[j], negated and rescaled
    scores, idx = best_abs_cosine(wa, wb)
    torch.testing.assert_close(scores, torch.ones(7, dtype=torch.float64), atol=1e-12, rtol=0)
    assert perm[idx].tolist() == list(range(7))  # A's row c matched B's row holding it


def test_best_abs_cosine_of_orthogonal_rows_is_zero() -> None:
    g = torch.Generator().manual_seed(1)
    wa = torch.zeros(4, 10)
    wb = torch.zeros(6, 10)
    wa[:, :5] = torch.randn(4, 5, generator=g)
    wb[:, 5:] = torch.randn(6, 5, generator=g)
    scores, _ = best_abs_cosine(wa, wb)
    assert scores.max().item() < 1e-12
    # One shared direction: exactly the rows holding it match.
    wb[2] = wa[1] * 3
    scores, idx = best_abs_cosine(wa, wb)
    assert scores[1].item() == pytest.approx(1.0, abs=1e-12) and idx[1].item() == 2
    assert scores[[0, 2, 3]].max().item() < 1.0


def test_factored_cosine_equals_cosine_of_flattened_rank_one_matrices() -> None:
    g = torch.Generator().manual_seed(2)
    va, ua = torch.randn(6, 5, generator=g).double(), torch.randn(5, 3, generator=g).double()
    vb, ub = torch.randn(6, 8, generator=g).double(), torch.randn(8, 3, generator=g).double()
    flat_a = torch.einsum("ic,co->coi", va, ua).flatten(1)
    flat_b = torch.einsum("ic,co->coi", vb, ub).flatten(1)
    cos = rank_one_abs_cosines(va, ua, vb, ub)
    unit_a, unit_b = (nn.functional.normalize(f, dim=1) for f in (flat_a, flat_b))
    expect = (unit_a @ unit_b.T).abs()
    torch.testing.assert_close(cos, expect, atol=1e-12, rtol=0)
    scores, idx = best_abs_cosine(flat_a, flat_b)
    torch.testing.assert_close(scores, expect.max(1).values, atol=1e-12, rtol=0)
    assert idx.tolist() == expect.argmax(1).tolist()


def _linear_model(d_in: int, d_out: int, paths_C: list[tuple[str, int]]) -> ComponentModel:
    target = nn.Sequential(nn.Linear(d_in, d_out), nn.Linear(d_out, d_out))
    target.requires_grad_(False)
    return ComponentModel(target, paths_C, ci_fn_type="mlp")


def test_hand_built_models_orthogonal_and_filtered() -> None:
    a = _linear_model(6, 4, [("0", 3)])
    b = _linear_model(6, 4, [("0", 5)])  # C may differ
    with torch.no_grad():
        a.comps("0").V.zero_()
        a.comps("0").V[:3] = torch.eye(3)  # A reads inputs 0-2
        b.comps("0").V.zero_()
        b.comps("0").V[3:, :3] = torch.eye(3)  # B reads inputs 3-5 (and two dead-zero columns)
    density = {"0": torch.tensor([0.5, 0.0005, 0.2], dtype=torch.float64)}
    res = compare_models(a, b, density, 0.001)
    m = res["modules"]["0"]
    assert [r["index"] for r in m["subcomponents"]] == [0, 2]  # the rare one is dropped
    assert m["n_kept"] == 2 and res["overall"]["n_kept"] == 2
    assert m["max"] < 1e-12 and (m["C_a"], m["C_b"]) == (3, 5)
    with torch.no_grad():
        b.comps("0").V[:, 4] = a.comps("0").V[:, 2] * -2
        b.comps("0").U[4] = a.comps("0").U[2] * 0.5
    m = compare_models(a, b, density, 0.001)["modules"]["0"]
    assert m["subcomponents"][1]["match"] == 4
    assert m["subcomponents"][1]["best"] == pytest.approx(1.0, abs=1e-12)
    assert m["max"] == pytest.approx(1.0, abs=1e-12) and m["min"] < 1e-12
    assert m["mean"] == pytest.approx(0.5, abs=1e-12) and m["std"] == pytest.approx(0.5, abs=1e-12)


def test_mismatched_modules_are_errors_naming_them() -> None:
    a = _linear_model(6, 4, [("0", 3)])
    with pytest.raises(InputError, match=r"share no decomposed module.*'0'.*'1'"):
        compare_models(a, _linear_model(6, 4, [("1", 3)]), {"0": torch.ones(3)}, 0.0)
    with pytest.raises(InputError, match=r"module '0' has weight shape .*\(4, 6\).*\(4, 7\)"):
        compare_models(a, _linear_model(7, 4, [("0", 3)]), {"0": torch.ones(3)}, 0.0)


# -- runs -----------------------------------------------------------------------------------------


def _check_ones(res: dict) -> None:
    for path, m in res["modules"].items():
        assert m["n_kept"] > 0, path
        for key in ("mean", "min", "max"):
            assert m[key] == pytest.approx(1.0, abs=1e-6), (path, key)
    assert res["overall"]["n_kept"] == sum(m["n_kept"] for m in res["modules"].values())
    assert res["overall"]["min"] == pytest.approx(1.0, abs=1e-6)


def test_run_against_itself_is_one_everywhere(tms_run: Path) -> None:
    res = compare_runs(tms_run, tms_run, **SETTINGS)
    assert set(res["modules"]) == {"linear1", "linear2"}
    _check_ones(res)
    for m in res["modules"].values():
        assert all(r["match"] == r["index"] for r in m["subcomponents"])
    written = json.loads((tms_run / COMPARISON_FILE).read_text())
    assert written == json.loads(json.dumps(res))
    assert written["settings"] == {**SETTINGS, "ci_threshold": 0.0}
    assert not [p for p in tms_run.iterdir() if p.name.endswith(".tmp")]
    table = format_table(res)
    assert "linear1" in table and "overall" in table and "1.0000" in table


def _permute_negate(run: LoadedRun, perm: torch.Tensor) -> None:
    """B's linear1 subcomponent j := -(A's perm[j]); linear2 is tied to it, so it follows."""
    comps = run.model.comps("linear1")
    with torch.no_grad():
        comps.V.copy_(-comps.V[:, perm])
        comps.U.copy_(comps.U[perm])


def test_permuted_negated_run_matches_with_the_right_indices(tms_run: Path) -> None:
    a, b = load_run(tms_run), load_run(tms_run)
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(3))
    _permute_negate(b, perm)
    w_a = a.model.component_weights("linear2")
    torch.testing.assert_close(b.model.component_weights("linear2"), -w_a[perm])
    res = compare_loaded(a, b, **SETTINGS)
    _check_ones(res)
    inverse = torch.argsort(perm)
    for path in ("linear1", "linear2"):
        rows = res["modules"][path]["subcomponents"]
        assert [r["match"] for r in rows] == [inverse[r["index"]].item() for r in rows], path


def _hand_density(run: LoadedRun, path: str) -> torch.Tensor:
    fired, n = torch.zeros(run.model.C(path), dtype=torch.float64), 0
    batches = run_batches(run, SETTINGS["batch_size"], SETTINGS["seed"])
    with torch.no_grad():
        for _ in range(SETTINGS["n_batches"]):
            ci = run.model.causal_importances(next(batches))[path]
            fired += (ci > 0).sum(0)
            n += ci.shape[0]
    return fired / n


def test_density_filter_drops_a_dead_subcomponent(tms_run: Path) -> None:
    a = load_run(tms_run)
    before = compare_loaded(a, a, **SETTINGS)["modules"]["linear1"]
    kept_before = [r["index"] for r in before["subcomponents"]]
    dead = kept_before[0]
    ci_fn = a.model.ci_fn("linear1")
    assert isinstance(ci_fn, MLPCiFn)
    with torch.no_grad():
        ci_fn.W_out[dead] = 0.0
        ci_fn.b_out[dead] = -10.0  # lower-leaky CI of -10 is <= 0: never fires
    after = compare_loaded(a, a, **SETTINGS)["modules"]["linear1"]
    kept = [r["index"] for r in after["subcomponents"]]
    hand = _hand_density(a, "linear1")
    assert hand[dead].item() == 0.0
    assert kept == [c for c in range(20) if hand[c] > SETTINGS["density_threshold"]]
    assert kept == [c for c in kept_before if c != dead]
    assert after["n_kept"] == before["n_kept"] - 1
    densities = [r["density"] for r in after["subcomponents"]]
    assert densities == pytest.approx(hand[kept].tolist(), abs=1e-12)
    nothing = compare_loaded(a, a, **{**SETTINGS, "density_threshold": 1.0})
    assert nothing["overall"] == {"n_kept": 0, "mean": None, "std": None, "min": None, "max": None}


def test_cli_prints_the_table_and_the_file(tms_run: Path) -> None:
    (tms_run / COMPARISON_FILE).unlink(missing_ok=True)
    argv = spd_ray_cmd("compare", str(tms_run), "tms", "--out", str(tms_run.parent))
    res = subprocess.run([*argv, "--batches", "2"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    assert lines[-1] == str(tms_run / COMPARISON_FILE)
    overall = next(line for line in lines if line.startswith("overall")).split()
    assert overall[2:] == ["1.0000", "0.0000", "1.0000", "1.0000"]
    assert json.loads((tms_run / COMPARISON_FILE).read_text())["settings"]["n_batches"] == 2
    bad = subprocess.run(
        [*argv, "--density-threshold", "2"], capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 2 and "--density-threshold" in bad.stderr
