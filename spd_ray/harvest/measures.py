"""Derived measures over a harvest of subcomponent firing statistics (pure numpy, float64).

T is the number of (valid) token positions harvested. Counts are int64; token "mass" (summed
predicted probabilities on the output side) may be float64. Everything is computed in float64:
counts are converted before any product, so c_ij * T cannot overflow int64.

Pair measures, query component i against every component j, with c_ij = positions where both
fire, c_i = firings of i, c_j = firings of j:

- precision = c_ij / c_i                  (fraction of i's firings where j also fires)
- recall    = c_ij / c_j                  (fraction of j's firings where i also fires)
- jaccard   = c_ij / (c_i + c_j - c_ij)
- lift      = c_ij * T / (c_i * c_j)
- pmi       = log(c_ij * T / (c_i * c_j)) = log(lift)

Valid pairs exclude j == i (`self_index`), dead components (c_j == 0) and pairs that never
co-fire (c_ij == 0); a dead query (c_i == 0) has no valid pairs.

Token measures, one component firing n_fire times against a vocabulary, with counts[v] = its
firings at positions whose token is v (or, on the output side, the summed predicted probability
of v over its firing positions) and totals[v] = positions with token v (or total predicted mass
of v):

- recall    = counts / n_fire
- precision = counts / totals
- lift      = precision / (n_fire / T)
- pmi       = log(counts * T / (n_fire * totals))

Valid tokens have counts > 0 and totals > 0 (and n_fire > 0).

Invalid entries are NaN in every measure array. Ranking (`top_ranked`) orders valid entries by
value, ties broken by the larger raw count, then by the smaller index, so results are
deterministic.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from spd_ray.errors import InputError

PAIR_MEASURES: tuple[str, ...] = ("precision", "recall", "jaccard", "pmi", "lift")
TOKEN_MEASURES: tuple[str, ...] = ("precision", "recall", "lift", "pmi")


@dataclass(frozen=True)
class Ranked:
    """Top entries, best first: index int64 [k], value float64 [k], count [k] (input dtype)."""

    index: np.ndarray
    value: np.ndarray
    count: np.ndarray


def _vector(name: str, x: np.ndarray) -> np.ndarray:
    """A 1-D numeric, non-negative array [N] or a ValueError naming `name`."""
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InputError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype.kind not in "biuf":
        raise InputError(f"{name} must be numeric, got dtype {arr.dtype}")
    if arr.size and not (np.all(np.isfinite(arr)) and np.all(arr >= 0)):
        raise InputError(f"{name} must be finite and non-negative")
    return arr


def _scalar(name: str, x: float, positive: bool) -> float:
    """A finite float scalar (> 0 if `positive`, else >= 0) or a ValueError naming `name`."""
    if np.ndim(x) != 0:
        raise InputError(f"{name} must be a scalar, got shape {np.shape(x)}")
    value = float(x)
    if not np.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise InputError(f"{name} must be finite and {bound}, got {x!r}")
    return value


def _same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    """Raise a ValueError naming both arguments unless a and b have the same shape."""
    if a.shape != b.shape:
        raise InputError(f"{name_a} shape {a.shape} does not match {name_b} shape {b.shape}")


def _check_measure(measure: str, valid_names: tuple[str, ...]) -> None:
    """Raise a ValueError listing `valid_names` unless `measure` is one of them."""
    if measure not in valid_names:
        raise InputError(f"unknown measure {measure!r}; valid measures: {', '.join(valid_names)}")


def _spread(valid: np.ndarray, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Each measure's values over the valid entries, as a full float64 array, NaN elsewhere."""
    out: dict[str, np.ndarray] = {}
    for name, vals in values.items():
        full = np.full(valid.shape[0], np.nan, dtype=np.float64)
        full[valid] = vals
        out[name] = full
    return out


def pair_measures(
    c_ij: np.ndarray, c_i: int, c_j: np.ndarray, T: int, self_index: int | None
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(valid mask [N] bool, {measure: float64 [N]}) for one query component; invalid are NaN."""
    c_ij = _vector("c_ij", c_ij)
    c_j = _vector("c_j", c_j)
    _same_shape("c_ij", c_ij, "c_j", c_j)
    ci = _scalar("c_i", c_i, positive=False)
    t = _scalar("T", T, positive=True)
    n = c_ij.shape[0]
    if self_index is not None and not 0 <= self_index < n:
        raise InputError(f"self_index {self_index} out of range for {n} components")

    valid = (c_ij > 0) & (c_j > 0)
    if ci == 0:
        valid[:] = False
    if self_index is not None:
        valid[self_index] = False

    both = c_ij[valid].astype(np.float64)
    other = c_j[valid].astype(np.float64)
    lift = both * t / (ci * other)
    values = {
        "precision": both / ci,
        "recall": both / other,
        "jaccard": both / (ci + other - both),
        "pmi": np.log(lift),
        "lift": lift,
    }
    return valid, _spread(valid, values)


def token_measures(
    counts: np.ndarray, n_fire: float, totals: np.ndarray, T: float
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(valid mask [V] bool, {measure: float64 [V]}) for one component; invalid entries NaN."""
    counts = _vector("counts", counts)
    totals = _vector("totals", totals)
    _same_shape("counts", counts, "totals", totals)
    fire = _scalar("n_fire", n_fire, positive=False)
    t = _scalar("T", T, positive=True)

    valid = (counts > 0) & (totals > 0)
    if fire == 0:
        valid[:] = False

    cnt = counts[valid].astype(np.float64)
    tot = totals[valid].astype(np.float64)
    precision = cnt / tot
    values = {
        "precision": precision,
        "recall": cnt / fire,
        "lift": precision / (fire / t),
        "pmi": np.log(cnt * t / (fire * tot)),
    }
    return valid, _spread(valid, values)


def top_ranked(
    values: np.ndarray, valid: np.ndarray, counts: np.ndarray, k: int, largest: bool = True
) -> Ranked:
    """The k best valid entries of values [N] (by value, then larger count, then smaller index)."""
    values = np.asarray(values)
    valid = np.asarray(valid)
    counts = np.asarray(counts)
    if values.ndim != 1:
        raise InputError(f"values must be 1-D, got shape {values.shape}")
    if valid.dtype != np.bool_:
        raise InputError(f"valid must be a bool mask, got dtype {valid.dtype}")
    _same_shape("valid", valid, "values", values)
    _same_shape("counts", counts, "values", values)
    if counts.dtype.kind not in "biuf":
        raise InputError(f"counts must be numeric, got dtype {counts.dtype}")
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 0:
        raise InputError(f"k must be a non-negative int, got {k!r}")

    cand = np.flatnonzero(valid).astype(np.int64)
    vals = values[cand].astype(np.float64)
    if not np.all(np.isfinite(vals)):
        raise InputError("values must be finite wherever valid is True")
    cnts = counts[cand]
    cnt_key = cnts.astype(np.int64) if cnts.dtype.kind in "bu" else cnts
    primary = -vals if largest else vals
    order = np.lexsort((cand, -cnt_key, primary))[: int(k)]
    return Ranked(index=cand[order], value=vals[order], count=cnts[order])


def top_correlated(
    c_ij: np.ndarray,
    c_i: int,
    c_j: np.ndarray,
    T: int,
    self_index: int | None,
    measure: str,
    k: int,
    largest: bool = True,
) -> Ranked:
    """The k components [k] ranked by a pair measure against the query; empty if it is dead."""
    _check_measure(measure, PAIR_MEASURES)
    valid, values = pair_measures(c_ij, c_i, c_j, T, self_index)
    return top_ranked(values[measure], valid, np.asarray(c_ij), k, largest)


def top_tokens(
    counts: np.ndarray,
    n_fire: float,
    totals: np.ndarray,
    T: float,
    measure: str,
    k: int,
    largest: bool = True,
) -> Ranked:
    """The k tokens [k] ranked by a token measure for one component; empty if it is dead."""
    _check_measure(measure, TOKEN_MEASURES)
    valid, values = token_measures(counts, n_fire, totals, T)
    return top_ranked(values[measure], valid, np.asarray(counts), k, largest)
