"""Keep tables: the kept set depends only on the set of candidates (order, partition and merge
invariant), top-k equals a brute-force sort, and the reservoir is a uniform sample (chi-square),
also after merging unequal partitions."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from spd_ray.harvest.keep import KeepTable


def _offer(table: KeepTable, comp: torch.Tensor, key: torch.Tensor, uid: torch.Tensor) -> None:
    table.update(comp, key, uid, lambda idx: {"uid_copy": uid[idx].clone()})


def _as_sets(t: KeepTable) -> list[tuple[int, float, int]]:
    return list(zip(t.comp.tolist(), t.key.tolist(), t.uid.tolist(), strict=True))


def test_top_k_equals_brute_force_and_ignores_order_and_partition() -> None:
    g = torch.Generator().manual_seed(0)
    n, N, k = 2000, 7, 5
    comp = torch.randint(0, N, (n,), generator=g)
    # Few distinct keys: many ties, broken by the smaller uid.
    key = torch.randint(0, 6, (n,), generator=g).double()
    uid = torch.randperm(n, generator=g)
    whole = KeepTable(N, k)
    _offer(whole, comp, key, uid)
    expected = []
    for c in range(N):
        rows = sorted((-key[i].item(), uid[i].item()) for i in range(n) if comp[i] == c)[:k]
        expected += [(c, -kk, u) for kk, u in rows]
    assert _as_sets(whole) == expected
    assert torch.equal(whole.payload["uid_copy"], whole.uid)
    # Shuffled, in batches of uneven size, over 3 "actors" merged in another order.
    perm = torch.randperm(n, generator=g)
    parts = [KeepTable(N, k) for _ in range(3)]
    for j, chunk in enumerate(torch.split(perm, [100, 900, 30, 500, 470])):
        _offer(parts[j % 3], comp[chunk], key[chunk], uid[chunk])
    merged = KeepTable(N, k)
    for p in (parts[2], parts[0], parts[1]):
        merged.merge(p)
    assert _as_sets(merged) == expected
    assert torch.equal(merged.payload["uid_copy"], merged.uid)


def test_sizes_are_min_k_and_seen_and_select_renumbers() -> None:
    counts = [0, 1, 4, 9]
    comp = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    t = KeepTable(4, 5)
    _offer(t, comp, torch.rand(len(comp), dtype=torch.float64), torch.arange(len(comp)))
    assert t.counts().tolist() == [0, 1, 4, 5]
    part = t.select(2, 4)
    assert part.n_components == 2 and part.counts().tolist() == [4, 5]
    empty = KeepTable(4, 0)
    _offer(empty, comp, torch.rand(len(comp), dtype=torch.float64), torch.arange(len(comp)))
    assert len(empty) == 0


def _inclusion(tables: list[KeepTable], trials: int, n: int) -> np.ndarray:
    merged = KeepTable(trials, tables[0].k)
    for t in tables:
        merged.merge(t)
    hits = np.zeros(n)
    np.add.at(hits, merged.uid.numpy(), 1)
    return hits


def _uniform_p(hits: np.ndarray, trials: int, k: int) -> float:
    n = len(hits)
    expected = trials * k / n
    stat = float(((hits - expected) ** 2 / expected).sum())
    return float(stats.chi2.sf(stat, n - 1))


@pytest.mark.parametrize("sizes", [[40], [3, 37], [1, 4, 35]])
def test_reservoir_is_uniform_single_and_after_unequal_merges(sizes: list[int]) -> None:
    """Each of n=40 firings lands in a k=6 reservoir with frequency k/n over 4000 independent
    trials (one trial per table component, so one call draws them all), whether one table saw all
    firings or partitions of unequal size (some under-filled) were merged."""
    n, k, trials = sum(sizes), 6, 4000
    g = torch.Generator().manual_seed(1)
    tables, start = [], 0
    for size in sizes:
        t = KeepTable(trials, k)
        comp = torch.arange(trials).repeat_interleave(size)
        uid = torch.arange(start, start + size).repeat(trials)
        _offer(t, comp, torch.rand(trials * size, generator=g, dtype=torch.float64), uid)
        tables.append(t)
        start += size
    hits = _inclusion(tables, trials, n)
    assert hits.sum() == trials * k
    assert _uniform_p(hits, trials, k) > 1e-3
    # The test has power: 30% too many picks of 4 firings are rejected.
    if len(sizes) > 1:
        biased = hits.copy()
        biased[:4] *= 1.3
        biased *= hits.sum() / biased.sum()
        assert _uniform_p(biased, trials, k) < 1e-3
