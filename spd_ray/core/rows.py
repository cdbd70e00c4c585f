"""A training step (or an eval's loss terms) on the nonzero rows of a sparse batch
(`compact_zero_rows`).

In a target whose rows are independent (each output row a function of its own input row alone:
the toy models, which say so with `rows_independent = True`), every zero row of a batch takes the
same path, and where that path reaches every decomposed module as zeros (checked each step on one
of them: `ComponentModel.quiet_zero_row`), a zero row reconstructs exactly under any masks: a
masked module's component acts x @ V are 0 there, so it outputs what the target module does (0,
or its bias), and the rest of the forward sees the clean values. Such a row adds nothing to a
reconstruction loss and nothing to any gradient (up to the rounding of a bias under bf16
autocast). Many rows of the sparse toy tasks are zero (37% of resid_mlp1's, 77% of tms_5-2's), so
the step - clean forward, CI functions, masked forwards, backward - runs on the nonzero rows alone,
gathered into `capacity` rows (a size measured on the first batch, `nonzero_row_capacity`; the
slots left over hold zero rows), and puts the dropped rows back analytically:

- a reconstruction term, a mean over rows, is multiplied by capacity / rows (`KeptRows.scale`);
- importance minimality's sums S_c and the train L0 add (rows - capacity) times the value of a zero
  row (`KeptRows.batch_sum`): every zero row has the same CI, and one is among the kept rows;
- the step's noise is drawn for the whole batch and the kept rows taken from it (`RowNoise`), so
  every row gets the masks of the uncompacted step: the same numbers up to float rounding.

Inside a compiled step the capacity is a constant of the graph; a batch with as many nonzero rows
as that, or whose zero row is not quiet, is reported (`KeptRows.fits`) and the step is run again
eagerly, which raises the capacity or stops compacting (the next step compiles once more).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from spd_ray.core.ci import nonzero_first
from spd_ray.core.masks import Noise


@dataclass
class KeptRows:
    """The rows of a batch a compacted step runs on: `index` [capacity] holds the nonzero rows,
    then zero rows; `n_rows` is the whole batch's size."""

    index: Tensor
    n_rows: int
    # Compiled: 0-d bool, whether some kept row is zero (else the values are wrong). Eager: None.
    fits: Tensor | None = None

    @property
    def capacity(self) -> int:
        return int(self.index.shape[0])

    @property
    def scale(self) -> float:
        """A mean over the kept rows, of terms that are 0 on every dropped row, times this is the
        mean over the whole batch."""
        return self.capacity / self.n_rows

    def take(self, t: Tensor) -> Tensor:
        """The kept rows of a whole-batch tensor (dim 0)."""
        return t.index_select(0, self.index)

    def expand(self, per_row: Tensor) -> Tensor:
        """The whole batch's [n_rows, ...] of a per-row value [capacity, ...] that every zero row
        shares (the last kept row's value in every dropped row)."""
        zero = per_row[self.capacity - 1]
        whole = zero.expand(self.n_rows, *zero.shape).contiguous()
        return whole.index_copy(0, self.index, per_row)

    def batch_sum(self, per_row: Tensor) -> Tensor:
        """Sum over the whole batch of a per-row value [capacity, ...] that every zero row shares:
        the kept rows' sum plus the dropped rows' share, read off the last kept row (a zero row)."""
        dropped = self.n_rows - self.capacity
        return per_row.sum(0) + dropped * per_row[self.capacity - 1]


def kept_rows(nonzero: Tensor, capacity: int, compiling: bool) -> KeptRows:
    """The nonzero rows first (a stable sort of a 0/1 key), then zero rows, `capacity` in all.
    Eagerly the caller has checked that fewer than `capacity` rows are nonzero; compiled, `fits`
    says so."""
    fits = nonzero.sum() < capacity if compiling else None
    return KeptRows(nonzero_first(nonzero, capacity), int(nonzero.shape[0]), fits)


class RowNoise(Noise):
    """`base`'s draws for the whole batch, of which a compacted step keeps its rows: each kept row
    gets the numbers it would get in the uncompacted step. Every batched draw (`rand`,
    `randint`: dim 0 is the batch) is made at the whole batch's size; unbatched ones pass."""

    def __init__(self, base: Noise, kept: KeptRows):
        super().__init__(None, base.rank, base.world_size)
        self._base, self._kept = base, kept

    def pgd_init(self) -> Noise:
        return RowNoise(self._base.pgd_init(), self._kept)

    def _whole(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        shape = tuple(shape)
        assert shape and shape[0] == self._kept.capacity, (
            f"a batched draw of shape {shape} in a step on {self._kept.capacity} kept rows"
        )
        return (self._kept.n_rows, *shape[1:])

    def rand(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        return self._kept.take(self._base.rand(self._whole(shape), device, dtype))

    def randint(self, low: int, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        return self._kept.take(self._base.randint(low, high, self._whole(shape), device))

    def rand_unbatched(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        return self._base.rand_unbatched(shape, device, dtype)
