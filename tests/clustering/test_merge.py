"""The MDL merge against its definitions: every pair's cost is the MDL change of doing that merge,
the samplers draw with the probabilities they define (chi-squared), planted groups come back."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from spd_ray.clustering.merge import MergeSettings, merge, merge_costs, sample_pair
from spd_ray.errors import InputError


def _explicit_mdl(groups: list[list[int]], active: np.ndarray, alpha: float) -> float:
    """sum_i s_i (log2 k + alpha r_i), the group's rate s_i = fraction of samples where any
    member fires."""
    k = len(groups)
    total = 0.0
    for members in groups:
        s = active[:, members].any(axis=1).mean()
        total += s * (math.log2(k) + alpha * len(members))
    return total


@pytest.mark.parametrize("seed", range(4))
def test_every_pair_cost_is_the_mdl_change_of_that_merge(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n, samples = 9, 60
    active = rng.random((samples, n)) < rng.uniform(0.05, 0.6, size=n)
    # A random grouping of the n subcomponents into k groups.
    k = int(rng.integers(3, n + 1))
    assign = np.concatenate([np.arange(k), rng.integers(0, k, size=n - k)])
    rng.shuffle(assign)
    groups = [list(np.flatnonzero(assign == g)) for g in range(k)]
    alpha = float(rng.uniform(0, 2))
    masks = np.stack([active[:, m].any(axis=1) for m in groups], axis=1).astype(np.float64)
    co = torch.tensor(masks.T @ masks)
    sizes = torch.tensor([len(m) for m in groups], dtype=torch.float64)
    costs = merge_costs(co, sizes, k, samples, alpha)
    before = _explicit_mdl(groups, active, alpha)
    for i, j in itertools.combinations(range(k), 2):
        merged = [m for g, m in enumerate(groups) if g not in (i, j)] + [groups[i] + groups[j]]
        expected = _explicit_mdl(merged, active, alpha) - before
        assert float(costs[i, j]) == pytest.approx(expected, abs=1e-12)
        assert float(costs[j, i]) == pytest.approx(expected, abs=1e-12)


def test_the_mdl_the_merge_logs_is_the_explicit_one() -> None:
    rng = np.random.default_rng(7)
    active = rng.random((80, 10)) < 0.3
    settings = MergeSettings(alpha=0.7, iters=6)
    h = merge(torch.tensor(active), [f"m:{c}" for c in range(10)], settings, seed=3)
    assert h.group_idxs.shape == (7, 10) and h.pairs.shape == (6, 2)
    for t in range(7):
        ids = h.group_idxs[t]
        assert sorted(set(ids.tolist())) == list(range(10 - t))  # compact numbering
        groups = [list(np.flatnonzero(ids == g)) for g in range(10 - t)]
        assert h.mdl[t] == pytest.approx(_explicit_mdl(groups, active, 0.7), abs=1e-12)
        if t:
            assert h.mdl[t] - h.mdl[t - 1] == pytest.approx(h.costs[t - 1], abs=1e-9)
            # The pair merged at t-1 is one group at t, numbered by the lower index; groups
            # above the higher index shift down by one.
            a, b = h.pairs[t - 1]
            prev = h.group_idxs[t - 1]
            expect = np.where(prev == b, a, prev)
            expect = np.where(expect > b, expect - 1, expect)
            assert (ids == expect).all()


def _draws(costs: torch.Tensor, settings: MergeSettings, n: int) -> dict[tuple[int, int], int]:
    m = costs.shape[0]
    valid = torch.triu(torch.ones(m, m, dtype=torch.bool), diagonal=1)
    gen = torch.Generator().manual_seed(11)
    counts: dict[tuple[int, int], int] = {}
    for _ in range(n):
        pair = sample_pair(costs, valid, settings, gen)
        counts[pair] = counts.get(pair, 0) + 1
    return counts


def test_range_sampler_is_uniform_over_the_pairs_near_the_minimum() -> None:
    costs = torch.tensor(
        [
            [0.0, 1.0, 1.04, 3.0, 1.2],
            [1.0, 0.0, 5.0, 1.1, 1.01],
            [1.04, 5.0, 0.0, 2.0, 4.0],
            [3.0, 1.1, 2.0, 0.0, 1.03],
            [1.2, 1.01, 4.0, 1.03, 0.0],
        ],
        dtype=torch.float64,
    )
    settings = MergeSettings(sampler="range", threshold=0.0125)  # min 1.0 + 0.0125 * 4 = 1.05
    counts = _draws(costs, settings, 8000)
    eligible = [(0, 1), (0, 2), (1, 4), (3, 4)]  # costs 1.0, 1.04, 1.01, 1.03
    assert set(counts) == set(eligible)
    observed = [counts[p] for p in eligible]
    assert chisquare(observed).pvalue > 1e-3


def test_mcmc_sampler_follows_the_boltzmann_weights() -> None:
    rng = np.random.default_rng(2)
    m = 5
    raw = rng.uniform(-1, 1, size=(m, m))
    costs = torch.tensor(raw + raw.T, dtype=torch.float64)
    settings = MergeSettings(sampler="mcmc", temperature=0.4)
    n = 20000
    counts = _draws(costs, settings, n)
    pairs = list(itertools.combinations(range(m), 2))
    c = np.array([float(costs[p]) for p in pairs])
    w = np.exp(-(c - c.min()) / 0.4)
    expected = n * w / w.sum()
    observed = np.array([counts.get(p, 0) for p in pairs])
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("sampler", ["range", "mcmc"])
def test_planted_groups_come_back_exactly_at_k(seed: int, sampler: str) -> None:
    rng = np.random.default_rng(100 + seed)
    K, samples = 5, 400
    sizes = rng.integers(1, 5, size=K)
    owner = np.repeat(np.arange(K), sizes)
    rng.shuffle(owner)
    fires = rng.random((samples, K)) < rng.uniform(0.05, 0.4, size=K)
    active = torch.tensor(fires[:, owner])
    settings = MergeSettings(sampler=sampler, temperature=0.01)  # type: ignore[arg-type]
    h = merge(active, [f"m:{c}" for c in range(owner.size)], settings, seed=seed)
    ids = h.group_idxs[h.row_for_k(K)]
    # The same partition: subcomponents share a group exactly when they share an owner.
    assert ((ids[:, None] == ids[None, :]) == (owner[:, None] == owner[None, :])).all()


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(InputError, match="alpha"):
        MergeSettings(alpha=-1)
    with pytest.raises(InputError, match="threshold"):
        MergeSettings(threshold=2)
    with pytest.raises(InputError, match="temperature"):
        MergeSettings(temperature=0)
    with pytest.raises(InputError, match="sampler"):
        MergeSettings(sampler="greedy")  # type: ignore[arg-type]
    with pytest.raises(InputError, match="2 alive"):
        merge(torch.ones(3, 1, dtype=torch.bool), ["m:0"], MergeSettings())
