"""The greedy, stochastic, MDL-driven merge of subcomponents into groups (components).

Input: a boolean activation matrix A [samples, n] (a subcomponent fires on a sample when its CI is
above the activation threshold). Every subcomponent starts as its own group (k = n). With Ĉ the
groups' co-activation matrix divided by the number of samples, s = diag Ĉ (each group's firing
rate), r the group sizes and OR_ij = s_i + s_j - Ĉ_ij (the rate at which i or j fires), the
description length of a grouping is

    MDL = sum_i s_i * (log2 k + alpha * r_i)

and merging groups i and j changes it by

    dMDL_ij = (sum s - s_i - s_j) * log2((k-1)/k) + OR_ij * log2(k-1) - (s_i + s_j) * log2 k
              + alpha * (OR_ij * (r_i + r_j) - s_i * r_i - s_j * r_j).

Each iteration computes the cost of every pair in one array operation, draws a pair with the
sampler (`range`: uniform over the pairs whose cost is within `threshold * (max - min)` of the
minimum; `mcmc`: probability proportional to exp(-(cost - min) / temperature)) and merges it: the
new group fires where either fired, keeps the lower index, and the higher index is removed (groups
above it shift down by one).

Groups live in fixed slots (one per subcomponent) with an alive mask, so a merge updates one row
and column of the co-activation matrix in place; compact group numbers are the ranks of the alive
slots, which is exactly the "keep the lower index, shift the rest down" numbering.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from spd_ray.errors import InputError

Sampler = Literal["range", "mcmc"]


@dataclass(frozen=True)
class MergeSettings:
    alpha: float = 1.0  # weight of the group-size (rank) term of the MDL
    iters: int | None = None  # merges to perform; None: down to one group
    sampler: Sampler = "range"
    threshold: float = 0.05  # range sampler: the fraction of the cost range drawn from
    temperature: float = 1.0  # mcmc sampler
    activation_threshold: float = 0.01  # a subcomponent fires where its CI is above this
    filter_dead_threshold: float = 0.001  # dropped when its largest CI is below this

    def __post_init__(self) -> None:
        def bad(field: str, why: str) -> InputError:
            return InputError(f"{field} {getattr(self, field)!r}: {why}")

        for name in ("alpha", "threshold", "temperature", "activation_threshold"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value)):
                raise bad(name, "must be a finite number")
        if self.alpha < 0:
            raise bad("alpha", "must be >= 0")
        if not 0 <= self.threshold <= 1:
            raise bad("threshold", "must be between 0 and 1")
        if self.temperature <= 0:
            raise bad("temperature", "must be > 0")
        if not 0 < self.activation_threshold < 1:
            raise bad("activation_threshold", "must be between 0 and 1 (exclusive)")
        if not 0 <= self.filter_dead_threshold < 1:
            raise bad("filter_dead_threshold", "must be in [0, 1)")
        if self.iters is not None and self.iters < 1:
            raise bad("iters", "must be >= 1")
        if self.sampler not in ("range", "mcmc"):
            raise bad("sampler", "must be 'range' or 'mcmc'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeHistory:
    """What a merge did. Row t of `group_idxs` is the grouping after t merges (row 0: every
    subcomponent alone), so there are k = n - t groups at row t."""

    labels: list[str]  # the subcomponents merged ("<module path>:<index>"), in column order
    group_idxs: np.ndarray  # int32 [T + 1, n]: compact group number of each subcomponent
    pairs: np.ndarray  # int32 [T, 2]: the (lower, higher) compact groups merged at merge t
    costs: np.ndarray  # float64 [T]: dMDL of each merge performed
    mdl: np.ndarray  # float64 [T + 1]: MDL of the grouping at row t
    n_samples: int

    @property
    def n(self) -> int:
        return len(self.labels)

    @property
    def k_groups(self) -> np.ndarray:
        return self.n - np.arange(self.group_idxs.shape[0])

    def row_for_k(self, k: int) -> int:
        """The row with k groups."""
        t = self.n - k
        if not 0 <= t < self.group_idxs.shape[0]:
            raise InputError(
                f"k {k} is not reached: this merge went from {self.n} down to "
                f"{self.n - self.group_idxs.shape[0] + 1} groups"
            )
        return t


def mdl(s: Tensor, r: Tensor, k: int, alpha: float) -> float:
    """Description length of groups with firing rates s and sizes r (k groups)."""
    return float((s * (math.log2(k) + alpha * r)).sum()) if k > 0 else 0.0


def merge_costs(co: Tensor, r: Tensor, k: int, n_samples: int, alpha: float) -> Tensor:
    """dMDL of merging every pair of groups [m, m] (co: co-activation counts of m groups, r: their
    sizes, k: the number of groups, which is m unless the caller holds dead slots)."""
    c = co.double() / n_samples
    s = torch.diagonal(c)
    rr = r.double()
    s_i, s_j = s[:, None], s[None, :]
    union = s_i + s_j - c
    total = s.sum()
    log_k = math.log2(k)
    log_k1 = math.log2(k - 1) if k > 1 else 0.0
    shrink = math.log2((k - 1) / k) if k > 1 else 0.0
    rank = alpha * (union * (rr[:, None] + rr[None, :]) - (s * rr)[:, None] - (s * rr)[None, :])
    return (total - s_i - s_j) * shrink + union * log_k1 - (s_i + s_j) * log_k + rank


def _weights(values: Tensor, settings: MergeSettings) -> Tensor:
    """The sampler's unnormalised weight of each candidate cost."""
    lo, hi = values.min(), values.max()
    if settings.sampler == "range":
        return (values <= lo + settings.threshold * (hi - lo)).double()
    return torch.exp(-(values - lo) / settings.temperature).double()


def sample_pair(
    costs: Tensor, valid: Tensor, settings: MergeSettings, generator: torch.Generator
) -> tuple[int, int]:
    """A pair (i, j), i < j, drawn by the settings' sampler among the valid entries."""
    flat_valid = valid.flatten()
    weights = _weights(costs.flatten()[flat_valid], settings)
    pick = int(torch.multinomial(weights.cpu().float(), 1, generator=generator))
    index = int(torch.nonzero(flat_valid).flatten()[pick])
    i, j = divmod(index, costs.shape[1])
    return (i, j) if i < j else (j, i)


def merge(
    active: Tensor,
    labels: list[str],
    settings: MergeSettings,
    seed: int = 0,
    device: torch.device | str = "cpu",
) -> MergeHistory:
    """Run the greedy merge on a boolean activation matrix [samples, n]."""
    if active.dim() != 2 or active.shape[1] != len(labels):
        raise InputError(f"activations must be [samples, {len(labels)}], got {tuple(active.shape)}")
    n_samples, n = active.shape
    if n < 2:
        raise InputError(f"need at least 2 alive subcomponents to merge, got {n}")
    if n_samples < 1:
        raise InputError("need at least one sample to merge on")
    device = torch.device(device)
    iters = n - 1 if settings.iters is None else min(settings.iters, n - 1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    # f32 sums of 0/1 values are exact below 2**24 samples; f64 above.
    dtype = torch.float32 if n_samples < 2**24 else torch.float64
    groups = active.to(device=device, dtype=dtype)  # [samples, n] slot masks
    co = groups.T @ groups  # [n, n] co-activation counts
    sizes = torch.ones(n, dtype=torch.float64, device=device)
    alive = torch.ones(n, dtype=torch.bool, device=device)
    slot_of = torch.arange(n, device=device)  # each subcomponent's slot
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=device), diagonal=1)

    group_idxs = np.empty((iters + 1, n), dtype=np.int32)
    pairs = np.empty((iters, 2), dtype=np.int32)
    costs_done = np.empty(iters, dtype=np.float64)
    mdls = np.empty(iters + 1, dtype=np.float64)

    def record(t: int) -> None:
        compact = torch.cumsum(alive.long(), 0) - 1
        group_idxs[t] = compact[slot_of].cpu().numpy()
        s = torch.diagonal(co).double()[alive] / n_samples
        mdls[t] = mdl(s, sizes[alive], int(alive.sum()), settings.alpha)

    record(0)
    for t in range(iters):
        k = n - t
        cost = merge_costs(co, sizes, k, n_samples, settings.alpha)
        valid = upper & alive[:, None] & alive[None, :]
        a, b = sample_pair(cost, valid, settings, generator)
        costs_done[t] = float(cost[a, b])
        compact = torch.cumsum(alive.long(), 0) - 1
        pairs[t] = (int(compact[a]), int(compact[b]))
        # Group a becomes a OR b; slot b dies.
        merged = torch.maximum(groups[:, a], groups[:, b])
        groups[:, a] = merged
        row = merged @ groups
        co[a, :] = row
        co[:, a] = row
        co[a, a] = merged.sum()
        sizes[a] += sizes[b]
        # Slot b holds nothing from now on, so sums over all slots (sum s) stay right.
        groups[:, b] = 0
        co[b, :] = 0
        co[:, b] = 0
        sizes[b] = 0
        alive[b] = False
        slot_of[slot_of == b] = a
        record(t + 1)
    return MergeHistory(list(labels), group_idxs, pairs, costs_done, mdls, int(n_samples))
