"""Distances of single-feature CI matrices from the patterns a correct toy decomposition shows.

Row f of a CI matrix holds the causal importance of every subcomponent when only input feature f is
active. Two patterns are known for toy models:

- *identity*: one subcomponent per feature (e.g. ResidMLP's W_in): up to a column permutation the
  matrix is the identity, with any extra columns all zero;
- *dense(k)*: k subcomponents active on every feature, the rest never (e.g. ResidMLP's W_out).

Distances count entries that miss the pattern by more than a tolerance, so small CI values of
inactive subcomponents do not matter and the result is an exact integer.
"""

from __future__ import annotations

import fnmatch
from typing import Literal

import numpy as np
import torch
from jaxtyping import Float, Int
from scipy.optimize import linear_sum_assignment
from torch import Tensor

from spd_ray.errors import InputError

# The Hungarian algorithm is cubic: ~1.5 s at 500 x 500 and tens of seconds at 1000 x 1000.
HUNGARIAN_MAX_SIZE = 500

AssignMethod = Literal["auto", "hungarian", "greedy"]


def _as_numpy(ci: Float[Tensor, "n_features C"]) -> np.ndarray:
    if ci.ndim != 2:
        raise ValueError(f"expected a 2-D CI matrix [n_features, C], got shape {tuple(ci.shape)}")
    return ci.detach().to(device="cpu", dtype=torch.float64).numpy()


def _greedy_assignment(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Match rows to columns taking the largest remaining entry first (ties: row-major order)."""
    n_rows, n_cols = values.shape
    order = np.argsort(-values, axis=None, kind="stable")
    row_used = np.zeros(n_rows, dtype=bool)
    col_used = np.zeros(n_cols, dtype=bool)
    rows, cols = [], []
    for flat in order:
        r, c = divmod(int(flat), n_cols)
        if row_used[r] or col_used[c]:
            continue
        row_used[r] = col_used[c] = True
        rows.append(r)
        cols.append(c)
        if len(rows) == min(n_rows, n_cols):
            break
    rows_arr, cols_arr = np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)
    by_row = np.argsort(rows_arr)
    return rows_arr[by_row], cols_arr[by_row]


def _identity_assignment(values: np.ndarray, method: AssignMethod) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of a matching maximising the matched mass, sorted by row."""
    if method == "auto":
        method = "hungarian" if min(values.shape) < HUNGARIAN_MAX_SIZE else "greedy"
    if method == "greedy":
        return _greedy_assignment(values)
    rows, cols = linear_sum_assignment(values, maximize=True)
    return rows.astype(np.int64), cols.astype(np.int64)


def _mass_order(values: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """`cols` sorted by total mass, largest first (ties: lower index first)."""
    mass = values[:, cols].sum(axis=0)
    return cols[np.argsort(-mass, kind="stable")]


def permute_to_identity(
    ci: Float[Tensor, "n_features C"], method: AssignMethod = "auto"
) -> tuple[Float[Tensor, "n_features C"], Int[Tensor, " C"]]:
    """Permute the columns so that the matrix is as close to the identity as possible.

    Column f of the result is the subcomponent matched to feature f by a maximum-mass assignment
    (Hungarian when min(shape) < 500, else greedy, unless `method` says); unmatched columns follow,
    by total mass, largest first. With fewer columns than features the matched columns come in the
    order of their features. Returns (permuted, perm) with permuted = ci[:, perm].
    """
    values = _as_numpy(ci)
    _, cols = _identity_assignment(values, method)
    unmatched = np.setdiff1d(np.arange(values.shape[1]), cols)
    perm_np = np.concatenate([cols, _mass_order(values, unmatched)])
    perm = torch.as_tensor(perm_np, dtype=torch.long, device=ci.device)
    return ci[:, perm], perm


def identity_distance(
    ci: Float[Tensor, "n_features C"], tol: float, method: AssignMethod = "auto"
) -> int:
    """#off-diagonal entries > tol + #diagonal entries < 1 - tol, after `permute_to_identity`.

    Entries in the columns beyond the n_features x n_features block count as off-diagonal.
    """
    n_features, C = ci.shape
    if n_features > C:
        raise InputError(f"identity pattern needs C >= n_features, got C={C} < {n_features}")
    values = _as_numpy(ci)
    rows, cols = _identity_assignment(values, method)
    matched = values[rows, cols]
    off_diagonal = int((values > tol).sum()) - int((matched > tol).sum())
    diagonal = int((matched < 1 - tol).sum())
    return off_diagonal + diagonal


def permute_to_dense(
    ci: Float[Tensor, "n_features C"],
) -> tuple[Float[Tensor, "n_features C"], Int[Tensor, " C"]]:
    """Columns sorted by total mass, largest first (ties: lower index first)."""
    values = _as_numpy(ci)
    perm_np = _mass_order(values, np.arange(values.shape[1]))
    perm = torch.as_tensor(perm_np, dtype=torch.long, device=ci.device)
    return ci[:, perm], perm


def dense_distance(ci: Float[Tensor, "n_features C"], k: int, tol: float) -> int:
    """Distance from k dense columns: after sorting by mass, each of the first k columns without an
    entry >= 1 - tol counts 1, and every entry > tol in the remaining columns counts 1."""
    C = ci.shape[1]
    if not 0 < k <= C:
        raise InputError(f"dense pattern needs 0 < k <= C, got k={k}, C={C}")
    values = _as_numpy(ci)
    values = values[:, _mass_order(values, np.arange(C))]
    missing_strong = int((~(values[:, :k] >= 1 - tol).any(axis=0)).sum())
    spurious = int((values[:, k:] > tol).sum())
    return missing_strong + spurious


def match_patterns(paths: list[str], patterns: list[str], what: str) -> dict[str, str]:
    """{path: pattern} for each path matched by one of `patterns` (fnmatch).

    A pattern that matches no path, or a path matched by two patterns, is a ValueError; `what`
    names the config field in the message.
    """
    matched: dict[str, str] = {}
    for pattern in patterns:
        hits = [p for p in paths if fnmatch.fnmatch(p, pattern)]
        if not hits:
            raise InputError(f"{what}: pattern {pattern!r} matches none of {paths}")
        for path in hits:
            if path in matched:
                raise InputError(
                    f"{what}: module {path!r} matches both {matched[path]!r} and {pattern!r}"
                )
            matched[path] = pattern
    return matched


def permute_by_pattern(
    ci: dict[str, Float[Tensor, "n_features C"]],
    identity_patterns: list[str] | None,
    dense_patterns: list[str] | None,
) -> dict[str, tuple[Float[Tensor, "n_features C"], Int[Tensor, " C"]]]:
    """{path: (permuted, perm)}: dense sorting for paths matching `dense_patterns`, identity
    permutation for all others. Patterns must each match a path; `identity_patterns` only checks
    (identity is the default) but a path may not be both."""
    paths = list(ci)
    identity = match_patterns(paths, identity_patterns or [], "identity_patterns")
    dense = match_patterns(paths, dense_patterns or [], "dense_patterns")
    both = sorted(set(identity) & set(dense))
    if both:
        raise InputError(f"modules {both} match both identity_patterns and dense_patterns")
    return {
        path: permute_to_dense(m) if path in dense else permute_to_identity(m)
        for path, m in ci.items()
    }
