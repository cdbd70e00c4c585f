"""The merge search's objectives on planted members, its argument checks, and one search through
Ray Tune + Optuna (slow)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from harvest_fixtures import short_tms_run, spd_ray_cli
from ray_head import RayHead

from spd_ray.clustering.merge import MergeSettings
from spd_ray.clustering.search import evaluate, parse_params
from spd_ray.errors import InputError


def _planted(seed: int, samples: int = 300) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    owner = np.array([0, 0, 1, 1, 1, 2, 3, 3])
    fires = rng.random((samples, 4)) < 0.2
    return fires[:, owner], [f"m:{c}" for c in range(owner.size)]


def test_members_that_agree_score_zero_instability_and_the_planted_mdl() -> None:
    members = [_planted(s) for s in range(3)]
    scores = evaluate(members, MergeSettings(alpha=1.0), seed=0, k=4)
    assert scores["instability"] == 0.0
    # MDL at the planted grouping: sum over groups of s_g (log2 4 + r_g), averaged over members.
    expected = []
    for active, _ in members:
        owner = np.array([0, 0, 1, 1, 1, 2, 3, 3])
        s = np.array([active[:, owner == g].any(axis=1).mean() for g in range(4)])
        r = np.bincount(owner)
        expected.append(float((s * (2.0 + r)).sum()))
    assert scores["mdl"] == pytest.approx(np.mean(expected), abs=1e-9)
    # Scored past the planted k, members must split a planted group differently or agree.
    assert evaluate(members, MergeSettings(), seed=0, k=6)["instability"] >= 0.0


def test_params_are_checked() -> None:
    assert parse_params("alpha, threshold", MergeSettings()) == ["alpha", "threshold"]
    with pytest.raises(InputError, match="choose from"):
        parse_params("alpha,beta", MergeSettings())
    with pytest.raises(InputError, match="mcmc"):
        parse_params("temperature", MergeSettings())
    with pytest.raises(InputError, match="range"):
        parse_params("threshold", MergeSettings(sampler="mcmc"))


@pytest.mark.slow
def test_a_search_writes_its_trials_and_pareto_front(
    ray_head: RayHead, tmp_path_factory: pytest.TempPathFactory
) -> None:
    run = short_tms_run(tmp_path_factory.mktemp("search"), steps=100)
    args = ["clustering", str(run), "--runs", "2", "--batch-size", "256", "--no-progress"]
    res = spd_ray_cli(ray_head.env(), *args, "--tune", "alpha", "--trials", "3", timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    root = Path(res.stdout.strip().splitlines()[-1])
    trials = json.loads((root / "trials.json").read_text())
    assert len(trials["trials"]) == 3 and trials["params"] == ["alpha"]
    for t in trials["trials"]:
        assert 0.01 <= t["params"]["alpha"] <= 10 and 0 <= t["instability"] <= 1
    front = json.loads((root / "pareto.json").read_text())["front"]
    assert front
    for f in front:  # nothing in the table beats a front trial on both objectives
        assert not any(
            t["instability"] <= f["instability"]
            and t["mdl"] <= f["mdl"]
            and t != f
            and (t["instability"] < f["instability"] or t["mdl"] < f["mdl"])
            for t in trials["trials"]
        )
