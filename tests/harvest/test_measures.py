"""Harvest measures against brute force: counts and measures recomputed with explicit Python loops
over positions on a small random harvest, plus hand-made ranking and hand-calculated cases."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from spd_ray.harvest.measures import (
    PAIR_MEASURES,
    TOKEN_MEASURES,
    Ranked,
    pair_measures,
    token_measures,
    top_correlated,
    top_ranked,
    top_tokens,
)

P, N, V = 500, 12, 30
DEAD = 3  # component that never fires
DISJOINT = (5, 7)  # pair that never co-fires
UNSEEN_TOKEN = 29  # token id never present in tok
ZERO_PROB_TOKEN = 17  # token never given probability mass


@dataclass(frozen=True)
class Harvest:
    F: np.ndarray  # bool [P, N]
    tok: np.ndarray  # int64 [P]
    probs: np.ndarray  # float64 [P, V]
    c_ij: np.ndarray  # int64 [N, N]
    c_i: np.ndarray  # int64 [N]
    counts: np.ndarray  # int64 [N, V]
    totals: np.ndarray  # int64 [V]
    mass: np.ndarray  # float64 [N, V]
    mass_totals: np.ndarray  # float64 [V]


@pytest.fixture(scope="module")
def harvest() -> Harvest:
    rng = np.random.default_rng(1234)
    density = np.array([0.5, 0.3, 0.2, 0.0, 0.1, 0.25, 0.05, 0.3, 0.02, 0.6, 0.15, 0.4])
    F = rng.random((P, N)) < density
    assert not F[:, DEAD].any()
    F[:, DISJOINT[1]] &= ~F[:, DISJOINT[0]]
    tok = rng.integers(0, V - 1, size=P).astype(np.int64)  # never UNSEEN_TOKEN
    probs = rng.dirichlet(np.ones(V), size=P)
    probs[:, ZERO_PROB_TOKEN] = 0.0
    probs /= probs.sum(axis=1, keepdims=True)
    Fi = F.astype(np.int64)
    onehot = (tok[:, None] == np.arange(V)[None, :]).astype(np.int64)
    return Harvest(
        F=F,
        tok=tok,
        probs=probs,
        c_ij=Fi.T @ Fi,
        c_i=Fi.sum(axis=0),
        counts=Fi.T @ onehot,
        totals=onehot.sum(axis=0),
        mass=F.astype(np.float64).T @ probs,
        mass_totals=probs.sum(axis=0),
    )


def _brute_pair(F: np.ndarray, i: int) -> dict[tuple[int, str], float]:
    """Pair measures for query i by explicit loops over positions: {(j, measure): value}."""
    fires = [[bool(F[p, n]) for n in range(N)] for p in range(P)]
    ci = sum(1 for p in range(P) if fires[p][i])
    out: dict[tuple[int, str], float] = {}
    for j in range(N):
        cj = sum(1 for p in range(P) if fires[p][j])
        cij = sum(1 for p in range(P) if fires[p][i] and fires[p][j])
        if j == i or cj == 0 or cij == 0:
            continue
        out[j, "precision"] = cij / ci
        out[j, "recall"] = cij / cj
        out[j, "jaccard"] = cij / (ci + cj - cij)
        out[j, "lift"] = (cij / P) / ((ci / P) * (cj / P))
        out[j, "pmi"] = math.log(cij / P) - math.log(ci / P) - math.log(cj / P)
    return out


def _brute_token(
    F: np.ndarray, tok: np.ndarray, probs: np.ndarray, n: int, output: bool
) -> dict[tuple[int, str], float]:
    """Token measures for component n by explicit loops over positions: {(v, measure): value}."""
    n_fire = 0
    count = [0.0] * V
    total = [0.0] * V
    for p in range(P):
        fired = bool(F[p, n])
        n_fire += fired
        for v in range(V):
            weight = float(probs[p, v]) if output else float(tok[p] == v)
            total[v] += weight
            if fired:
                count[v] += weight
    out: dict[tuple[int, str], float] = {}
    for v in range(V):
        if count[v] == 0 or total[v] == 0:
            continue
        out[v, "recall"] = count[v] / n_fire
        out[v, "precision"] = count[v] / total[v]
        out[v, "lift"] = (count[v] / total[v]) * P / n_fire
        out[v, "pmi"] = math.log(count[v] / n_fire) - math.log(total[v] / P)
    return out


def _compare(
    valid: np.ndarray, values: dict[str, np.ndarray], brute: dict[tuple[int, str], float], names
) -> None:
    expected_valid = sorted({idx for idx, _ in brute})
    assert np.flatnonzero(valid).tolist() == expected_valid
    assert set(values) == set(names)
    for name in names:
        got = values[name]
        assert got.dtype == np.float64
        assert np.isnan(got[~valid]).all()
        want = np.array([brute[idx, name] for idx in expected_valid])
        # pmi can be ~0 where the relative error is meaningless; a tiny absolute slack covers it
        np.testing.assert_allclose(got[valid], want, rtol=1e-12, atol=1e-14)


def test_derived_counts_match_loops(harvest: Harvest) -> None:
    h = harvest
    for i in range(N):
        assert h.c_i[i] == sum(1 for p in range(P) if h.F[p, i])
        for v in range(V):
            assert h.counts[i, v] == sum(1 for p in range(P) if h.F[p, i] and h.tok[p] == v)
    assert h.c_ij[DISJOINT] == 0 and h.c_i[DISJOINT[0]] > 0 and h.c_i[DISJOINT[1]] > 0
    assert h.c_i[DEAD] == 0 and h.totals[UNSEEN_TOKEN] == 0
    np.testing.assert_allclose(h.probs.sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("i", range(N))
def test_pair_measures_match_brute_force(harvest: Harvest, i: int) -> None:
    h = harvest
    valid, values = pair_measures(h.c_ij[i], int(h.c_i[i]), h.c_i, P, self_index=i)
    brute = _brute_pair(h.F, i)
    _compare(valid, values, brute, PAIR_MEASURES)
    assert not valid[i] and not valid[DEAD]
    if i in DISJOINT:
        assert not valid[DISJOINT[1] if i == DISJOINT[0] else DISJOINT[0]]
    if i == DEAD:
        assert not valid.any()
    else:
        assert valid.sum() >= 5


def test_pair_measures_without_self_index_keeps_self(harvest: Harvest) -> None:
    h = harvest
    valid, values = pair_measures(h.c_ij[0], int(h.c_i[0]), h.c_i, P, self_index=None)
    assert valid[0]
    assert values["precision"][0] == 1.0 and values["jaccard"][0] == 1.0
    np.testing.assert_allclose(values["lift"][0], P / h.c_i[0], rtol=1e-12)


@pytest.mark.parametrize("output", [False, True], ids=["input", "output"])
@pytest.mark.parametrize("n", range(N))
def test_token_measures_match_brute_force(harvest: Harvest, n: int, output: bool) -> None:
    h = harvest
    counts, totals = (h.mass[n], h.mass_totals) if output else (h.counts[n], h.totals)
    valid, values = token_measures(counts, float(h.c_i[n]), totals, float(P))
    brute = _brute_token(h.F, h.tok, h.probs, n, output)
    _compare(valid, values, brute, TOKEN_MEASURES)
    excluded = ZERO_PROB_TOKEN if output else UNSEEN_TOKEN
    assert not valid[excluded]
    if n == DEAD:
        assert not valid.any()
    elif output:
        assert valid.sum() == V - 1
    if n == 8 and not output:  # sparse component: some seen tokens have zero count
        assert (~valid & (h.totals > 0)).any()


def test_hand_calculated_pair() -> None:
    c_ij = np.array([2, 0, 3], dtype=np.int64)
    c_j = np.array([5, 0, 4], dtype=np.int64)
    valid, m = pair_measures(c_ij, 4, c_j, 10, self_index=2)
    assert valid.tolist() == [True, False, False]
    assert m["precision"][0] == 0.5
    assert m["recall"][0] == 0.4
    assert m["jaccard"][0] == pytest.approx(2 / 7, rel=1e-15)
    assert m["lift"][0] == 1.0
    assert m["pmi"][0] == 0.0
    for name in PAIR_MEASURES:
        assert np.isnan(m[name][1:]).all()


def test_hand_calculated_tokens() -> None:
    counts = np.array([2, 0, 1, 3], dtype=np.int64)
    totals = np.array([4, 5, 0, 3], dtype=np.int64)
    valid, m = token_measures(counts, 5, totals, 20)
    assert valid.tolist() == [True, False, False, True]
    np.testing.assert_allclose(m["recall"][[0, 3]], [0.4, 0.6], rtol=1e-15)
    np.testing.assert_allclose(m["precision"][[0, 3]], [0.5, 1.0], rtol=1e-15)
    np.testing.assert_allclose(m["lift"][[0, 3]], [2.0, 4.0], rtol=1e-15)
    np.testing.assert_allclose(m["pmi"][[0, 3]], [math.log(2), math.log(4)], rtol=1e-15)


def test_no_int64_overflow() -> None:
    big = 3_000_000_000  # c_ij * T = 9e18 * ... would overflow int64
    c_ij = np.array([big], dtype=np.int64)
    valid, m = pair_measures(c_ij, big, np.array([big], dtype=np.int64), 4 * big, self_index=None)
    assert valid[0]
    assert m["lift"][0] == 4.0
    assert m["pmi"][0] == pytest.approx(math.log(4.0), rel=1e-15)


def test_top_ranked_order_and_ties() -> None:
    values = np.array([0.5, 0.9, 0.5, 0.5, 0.9, 0.1, 2.0, 0.5])
    valid = np.array([True, True, True, True, True, True, False, True])
    counts = np.array([3, 1, 7, 3, 1, 4, 9, 7], dtype=np.int64)
    r = top_ranked(values, valid, counts, k=5)
    # 0.9 tie (1, 4) same count -> smaller index; 0.5 ties: count 7 (2, 7) before count 3 (0, 3)
    assert r.index.tolist() == [1, 4, 2, 7, 0]
    assert r.value.tolist() == [0.9, 0.9, 0.5, 0.5, 0.5]
    assert r.count.tolist() == [1, 1, 7, 7, 3]
    assert r.index.dtype == np.int64 and r.value.dtype == np.float64
    assert r.count.dtype == counts.dtype

    bottom = top_ranked(values, valid, counts, k=3, largest=False)
    assert bottom.index.tolist() == [5, 2, 7]
    assert bottom.value.tolist() == [0.1, 0.5, 0.5]

    everything = top_ranked(values, valid, counts, k=100)
    assert everything.index.tolist() == [1, 4, 2, 7, 0, 3, 5]  # invalid 6 never appears

    assert top_ranked(values, valid, counts, k=0).index.size == 0


def test_top_ranked_float_counts_keep_dtype() -> None:
    values = np.array([1.0, 1.0, 1.0])
    counts = np.array([0.25, 0.75, 0.5])
    r = top_ranked(values, np.ones(3, dtype=bool), counts, k=3)
    assert r.index.tolist() == [1, 2, 0]
    assert r.count.dtype == np.float64


def test_top_correlated_matches_measures(harvest: Harvest) -> None:
    h = harvest
    i = 0
    valid, m = pair_measures(h.c_ij[i], int(h.c_i[i]), h.c_i, P, i)
    for measure in PAIR_MEASURES:
        r = top_correlated(h.c_ij[i], int(h.c_i[i]), h.c_i, P, i, measure, k=4)
        assert isinstance(r, Ranked) and r.index.size == 4
        assert i not in r.index.tolist() and DEAD not in r.index.tolist()
        best = np.sort(m[measure][valid])[::-1][:4]
        np.testing.assert_array_equal(r.value, best)
        np.testing.assert_array_equal(r.value, m[measure][r.index])
        np.testing.assert_array_equal(r.count, h.c_ij[i][r.index])
        low = top_correlated(h.c_ij[i], int(h.c_i[i]), h.c_i, P, i, measure, k=2, largest=False)
        np.testing.assert_array_equal(low.value, np.sort(m[measure][valid])[:2])
    n_valid = int(valid.sum())
    assert top_correlated(h.c_ij[i], int(h.c_i[i]), h.c_i, P, i, "pmi", k=99).index.size == n_valid


def test_top_tokens_matches_measures(harvest: Harvest) -> None:
    h = harvest
    n = 9
    valid, m = token_measures(h.counts[n], int(h.c_i[n]), h.totals, P)
    for measure in TOKEN_MEASURES:
        r = top_tokens(h.counts[n], int(h.c_i[n]), h.totals, P, measure, k=5)
        np.testing.assert_array_equal(r.value, np.sort(m[measure][valid])[::-1][:5])
        np.testing.assert_array_equal(r.count, h.counts[n][r.index])
        assert r.count.dtype == np.int64
    out = top_tokens(h.mass[n], int(h.c_i[n]), h.mass_totals, P, "lift", k=V)
    assert out.index.size == V - 1 and ZERO_PROB_TOKEN not in out.index.tolist()
    assert out.count.dtype == np.float64


def test_dead_component_gives_empty(harvest: Harvest) -> None:
    h = harvest
    r = top_correlated(h.c_ij[DEAD], 0, h.c_i, P, DEAD, "jaccard", k=3)
    assert r.index.size == 0 and r.value.size == 0 and r.count.size == 0
    assert r.index.dtype == np.int64 and r.value.dtype == np.float64
    t = top_tokens(h.counts[DEAD], 0, h.totals, P, "precision", k=3)
    assert t.index.size == 0 and t.count.dtype == np.int64


def test_unknown_measure_lists_valid_names(harvest: Harvest) -> None:
    h = harvest
    with pytest.raises(ValueError, match="precision, recall, jaccard, pmi, lift"):
        top_correlated(h.c_ij[0], int(h.c_i[0]), h.c_i, P, 0, "cosine", k=3)
    with pytest.raises(ValueError, match="precision, recall, lift, pmi"):
        top_tokens(h.counts[0], int(h.c_i[0]), h.totals, P, "jaccard", k=3)
    with pytest.raises(ValueError, match="valid measures"):  # even for a dead component
        top_tokens(h.counts[DEAD], 0, h.totals, P, "nope", k=3)


def test_shape_and_argument_errors() -> None:
    ones = np.ones(3, dtype=np.int64)
    with pytest.raises(ValueError, match="c_ij .*c_j"):
        pair_measures(ones, 1, np.ones(4, dtype=np.int64), 10, None)
    with pytest.raises(ValueError, match="c_ij must be 1-D"):
        pair_measures(np.ones((3, 3), dtype=np.int64), 1, ones, 10, None)
    with pytest.raises(ValueError, match="self_index"):
        pair_measures(ones, 1, ones, 10, 3)
    with pytest.raises(ValueError, match="T must be"):
        pair_measures(ones, 1, ones, 0, None)
    with pytest.raises(ValueError, match="counts .*totals"):
        token_measures(ones, 1, np.ones(2), 10)
    with pytest.raises(ValueError, match="n_fire"):
        token_measures(ones, -1, ones, 10)
    with pytest.raises(ValueError, match="valid .*values"):
        top_ranked(np.ones(3), np.ones(2, dtype=bool), ones, 1)
    with pytest.raises(ValueError, match="counts .*values"):
        top_ranked(np.ones(3), np.ones(3, dtype=bool), np.ones(2), 1)
    with pytest.raises(ValueError, match="k must be"):
        top_ranked(np.ones(3), np.ones(3, dtype=bool), ones, -1)
