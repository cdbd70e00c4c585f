"""Per-subcomponent "keep the k best" tables: the top-k examples by activation and the uniform
reservoir are the same structure with different keys.

Every candidate firing carries a component index, a key and a unique position id (`uid`). A table
keeps, for each component, the k candidates with the largest key, ties broken by the smaller uid,
so the result is a function of the *set* of candidates alone: whatever order the firings arrive
in, however they are split across actors, and however partial tables are merged, the kept set is
the same. That is what makes 1 and N actors agree exactly.

- Top-k by activation: key = |normalised activation|.
- Uniform reservoir: key = an independent U(0, 1) draw (float64) per firing. The k largest of n
  i.i.d. uniform keys are a uniformly random k-subset of the n firings, and merging two tables
  (union, keep the k largest keys) is again the k largest of all keys - a uniform sample of the
  union, with no weighting by partition size (the reference's weighted merge is biased when a
  partition is under-filled; this one cannot be).

Payloads (windows of tokens and values, or toy input vectors) ride along as tensors indexed like
the table rows; `update` computes payloads only for the candidates that enter the table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

Payload = dict[str, Tensor]


def _lexsort(comp: Tensor, key: Tensor, uid: Tensor) -> Tensor:
    """Order by (component ascending, key descending, uid ascending)."""
    order = torch.argsort(uid, stable=True)
    order = order[torch.argsort(key[order], descending=True, stable=True)]
    return order[torch.argsort(comp[order], stable=True)]


@dataclass
class KeepTable:
    """Up to `k` rows per component, sorted by (component, key desc, uid). Rows: `comp` [M],
    `key` [M] float64, `uid` [M] int64, and `payload` tensors with leading dim M."""

    n_components: int
    k: int
    comp: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    key: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    uid: Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))
    payload: Payload = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.comp.numel())

    def counts(self) -> Tensor:
        """Rows kept per component [n_components]."""
        return torch.bincount(self.comp, minlength=self.n_components)

    def threshold(self) -> Tensor:
        """Per component, the smallest kept key when the component is full, else -inf: a
        candidate below it can never enter (ties still can, through the uid)."""
        thr = torch.full((self.n_components,), -torch.inf, dtype=torch.float64)
        if self.k == 0:
            thr.fill_(torch.inf)
            return thr
        full = self.counts() >= self.k
        if len(self) and bool(full.any()):
            # Rows are sorted, so the last row of each component has its smallest key.
            last = torch.ones(len(self), dtype=torch.bool)
            last[:-1] = self.comp[1:] != self.comp[:-1]
            thr[self.comp[last]] = torch.where(
                full[self.comp[last]], self.key[last], torch.tensor(-torch.inf, dtype=torch.float64)
            )
        return thr

    def update(
        self,
        comp: Tensor,
        key: Tensor,
        uid: Tensor,
        payload_of: Callable[[Tensor], Payload],
    ) -> None:
        """Offer candidates; `payload_of(idx)` returns the payload rows of candidates `idx` (only
        those that enter are asked for)."""
        key = key.to(torch.float64)
        comp, uid = comp.to(torch.int64), uid.to(torch.int64)
        if comp.numel():
            thr = self.threshold()
            maybe = key >= thr[comp]
            if not bool(maybe.all()):
                idx_maybe = maybe.nonzero().squeeze(1)
                comp, key, uid = comp[idx_maybe], key[idx_maybe], uid[idx_maybe]
            else:
                idx_maybe = None
        if comp.numel() == 0 or self.k == 0:
            return
        M = len(self)
        all_comp = torch.cat([self.comp, comp])
        all_key = torch.cat([self.key, key])
        all_uid = torch.cat([self.uid, uid])
        order = _lexsort(all_comp, all_key, all_uid)
        sorted_comp = all_comp[order]
        first = torch.searchsorted(sorted_comp, sorted_comp, right=False)
        rank = torch.arange(len(order)) - first
        kept = order[rank < self.k]
        from_old = kept < M
        new_local = kept[~from_old] - M
        new_src = new_local if idx_maybe is None else idx_maybe[new_local]
        new_payload = payload_of(new_src) if new_src.numel() else None
        payload: Payload = {}
        names = set(self.payload) | (set(new_payload) if new_payload else set())
        for name in names:
            ref = self.payload[name] if name in self.payload else new_payload[name]  # type: ignore[index]
            out = torch.empty((len(kept), *ref.shape[1:]), dtype=ref.dtype)
            if bool(from_old.any()):
                out[from_old] = self.payload[name][kept[from_old]]
            if new_payload is not None:
                out[~from_old] = new_payload[name].to(ref.dtype)
            payload[name] = out
        self.comp, self.key, self.uid = all_comp[kept], all_key[kept], all_uid[kept]
        self.payload = payload

    def merge(self, other: KeepTable) -> None:
        """Add another table's rows as candidates (the merge of two partitions)."""
        assert (other.n_components, other.k) == (self.n_components, self.k), "tables differ"
        self.update(
            other.comp,
            other.key,
            other.uid,
            lambda idx: {n: t[idx] for n, t in other.payload.items()},
        )

    def select(self, lo: int, hi: int) -> KeepTable:
        """The rows of components [lo, hi), renumbered from 0 (a shard for the merge)."""
        m = (self.comp >= lo) & (self.comp < hi)
        return KeepTable(
            n_components=hi - lo,
            k=self.k,
            comp=self.comp[m] - lo,
            key=self.key[m],
            uid=self.uid[m],
            payload={n: t[m] for n, t in self.payload.items()},
        )

    def nbytes(self) -> int:
        tensors = [self.comp, self.key, self.uid, *self.payload.values()]
        return sum(t.numel() * t.element_size() for t in tensors)
