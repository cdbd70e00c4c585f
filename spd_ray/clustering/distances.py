"""Distances between two groupings of the same n subcomponents (label arrays of group ids), and
the alignment of ensemble members that merged different subsets of them.

- `perm_invariant_hamming`: the fewest subcomponents that must change group to turn one grouping
  into the other under the best one-to-one renaming of groups: n minus the maximum-weight
  matching on the contingency table (Hungarian algorithm).
- `matching_dist`: the number of pairs of subcomponents that are together in one grouping and
  apart in the other.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from scipy.optimize import linear_sum_assignment

from spd_ray.clustering.merge import MergeHistory
from spd_ray.errors import InputError

DISTANCES = ("perm_invariant_hamming", "matching_dist")


def contingency(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """counts[i, j] = how many subcomponents are in group i of a and group j of b."""
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(f"groupings must be 1-d and of one length, got {a.shape} and {b.shape}")
    _, ia = np.unique(a, return_inverse=True)
    _, ib = np.unique(b, return_inverse=True)
    counts = np.zeros((int(ia.max()) + 1, int(ib.max()) + 1), dtype=np.int64)
    np.add.at(counts, (ia, ib), 1)
    return counts


def perm_invariant_hamming(a: np.ndarray, b: np.ndarray) -> int:
    counts = contingency(a, b)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    return int(a.size - counts[rows, cols].sum())


def matching_dist(a: np.ndarray, b: np.ndarray) -> int:
    counts = contingency(a, b)

    def pairs(x: np.ndarray) -> int:
        return int((x * (x - 1) // 2).sum())

    both = pairs(counts)
    return pairs(counts.sum(1)) + pairs(counts.sum(0)) - 2 * both


DISTANCE_FNS: dict[str, Callable[[np.ndarray, np.ndarray], int]] = {
    "perm_invariant_hamming": perm_invariant_hamming,
    "matching_dist": matching_dist,
}


def check_methods(methods: Sequence[str]) -> list[str]:
    bad = [m for m in methods if m not in DISTANCE_FNS]
    if bad or not methods:
        raise InputError(f"--distances {','.join(methods)!r}: choose from {', '.join(DISTANCES)}")
    return list(dict.fromkeys(methods))


def on_union(history: MergeHistory, row: int, union: list[str]) -> np.ndarray:
    """The grouping at `row` of a member, over the union's columns: a subcomponent the member
    does not have (dropped as dead) is a group of its own."""
    col = {lab: i for i, lab in enumerate(union)}
    cols = np.array([col[lab] for lab in history.labels], dtype=np.int64)
    out = np.empty(len(union), dtype=np.int32)
    ids = history.group_idxs[row]
    out[cols] = ids
    missing = np.setdiff1d(np.arange(len(union)), cols)
    out[missing] = int(ids.max()) + 1 + np.arange(missing.size)
    return out


def union_labels(histories: Sequence[MergeHistory]) -> list[str]:
    """Every member's subcomponents, sorted by module path, then index."""
    return sorted({lab for h in histories for lab in h.labels}, key=label_order)


def ensemble_array(histories: Sequence[MergeHistory]) -> tuple[np.ndarray, list[str]]:
    """[members, T + 1, n] group ids over the union of the members' subcomponents (`on_union`),
    and the union's labels; rows are cut to the shortest member."""
    if not histories:
        raise InputError("no ensemble members to align")
    union = union_labels(histories)
    rows = min(h.group_idxs.shape[0] for h in histories)
    out = np.empty((len(histories), rows, len(union)), dtype=np.int32)
    for m, h in enumerate(histories):
        for t in range(rows):
            out[m, t] = on_union(h, t, union)
    return out, union


def label_order(label: str) -> tuple[str, int]:
    path, _, index = label.rpartition(":")
    return path, int(index)


def distances_at(array: np.ndarray, row: int, method: str) -> np.ndarray:
    """[members, members] distances at one row: the lower triangle filled, the rest NaN."""
    fn = DISTANCE_FNS[method]
    m = array.shape[0]
    out = np.full((m, m), np.nan)
    for i in range(m):
        for j in range(i):
            out[i, j] = fn(array[i, row], array[j, row])
    return out
