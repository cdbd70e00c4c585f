"""Distances between groupings against brute force, and the alignment of ensemble members."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from spd_ray.clustering.distances import (
    distances_at,
    ensemble_array,
    matching_dist,
    perm_invariant_hamming,
)
from spd_ray.clustering.merge import MergeSettings, merge


def _brute_hamming(a: np.ndarray, b: np.ndarray) -> int:
    """Fewest mismatches over every one-to-one renaming of a's groups (into b's groups or into
    fresh names that match nothing)."""
    ga, gb = sorted(set(a.tolist())), sorted(set(b.tolist()))
    targets = gb + [f"fresh{i}" for i in range(len(ga))]
    best = a.size
    for image in itertools.permutations(targets, len(ga)):
        rename = dict(zip(ga, image, strict=True))
        best = min(best, sum(rename[x] != y for x, y in zip(a.tolist(), b.tolist(), strict=True)))
    return best


def _brute_pairs(a: np.ndarray, b: np.ndarray) -> int:
    return sum(
        (a[i] == a[j]) != (b[i] == b[j]) for i, j in itertools.combinations(range(a.size), 2)
    )


@pytest.mark.parametrize("seed", range(30))
def test_distances_equal_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 8))
    a = rng.integers(0, int(rng.integers(1, 5)), size=n)
    b = rng.integers(0, int(rng.integers(1, 5)), size=n) + 10  # other names
    assert perm_invariant_hamming(a, b) == _brute_hamming(a, b)
    assert matching_dist(a, b) == _brute_pairs(a, b)
    perm = rng.permutation(50)
    assert perm_invariant_hamming(a, perm[a]) == 0 == matching_dist(a, perm[a])


def test_identical_members_have_distance_zero_and_the_upper_triangle_is_nan() -> None:
    rng = np.random.default_rng(0)
    active = torch.tensor(rng.random((100, 8)) < 0.3)
    labels = [f"m:{c}" for c in range(8)]
    h = merge(active, labels, MergeSettings(), seed=4)
    array, union = ensemble_array([h, h, h])
    assert union == labels and array.shape == (3, 8, 8)
    for row in range(8):
        for method in ("perm_invariant_hamming", "matching_dist"):
            d = distances_at(array, row, method)
            assert np.isnan(d[np.triu_indices(3)]).all()
            assert (d[np.tril_indices(3, -1)] == 0).all()


def test_a_member_without_a_subcomponent_has_it_alone() -> None:
    rng = np.random.default_rng(1)
    active = torch.tensor(rng.random((60, 4)) < 0.5)
    full = merge(active, ["a:0", "a:1", "b:0", "a:10"], MergeSettings(iters=2), seed=0)
    part = merge(active[:, [0, 2, 3]], ["a:0", "b:0", "a:10"], MergeSettings(iters=2), seed=0)
    array, union = ensemble_array([full, part])
    assert union == ["a:0", "a:1", "a:10", "b:0"]  # module path, then index as a number
    assert array.shape == (2, 3, 4)  # cut to the shorter history (both 3 rows)
    missing = union.index("a:1")
    for row in range(3):
        others = np.delete(array[1, row], missing)
        assert array[1, row, missing] not in others.tolist()
