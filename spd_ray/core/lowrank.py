"""Wide activations kept as sums of narrow products (`LowRank`).

Some targets' wide activations are sums of a few narrow reads times fixed writes: ResidMLP's
d_embed-wide residual stream is x @ W_E plus, per block, h @ W_out^T (+ the bias), and it is only
ever read through linear maps (the next block's mlp_in, the read-off W_E^T). Kept as (read, write)
terms, a read through a map M contracts the small weight products first, read @ (write @ M), the
same function and gradients as (read @ write) @ M at a fraction of the FLOPs when the stream is
much wider than the reads (1000 vs 100 for ResidMLP 1), in the target's own training and in
every clean and masked forward of its decomposition (`ComponentModel`: `low_rank_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn


@dataclass(frozen=True, eq=False)
class Term:
    """read @ write on rows start .. start + len(read) of its matrix, zero on the others. Terms
    with the same key share their write."""

    key: str
    read: Float[Tensor, "n r"]
    write: Float[Tensor, "r d"]
    start: int = 0

    @property
    def stop(self) -> int:
        return self.start + self.read.shape[0]


class LowRank:
    """A [rows, d] matrix held as the sum of its terms' products, never formed unless asked.

    Stacking pieces (`cat`: the copies of a masked forward, each with its own terms) keeps each
    term on its own rows, so a product costs what the rows that hold the term cost."""

    def __init__(self, terms: list[Term], rows: int | None = None):
        assert len(terms) > 0, "a LowRank needs at least one term"
        self.rows = max(t.stop for t in terms) if rows is None else rows
        self.width = terms[0].write.shape[1]
        for t in terms:
            assert t.read.dim() == 2 and t.write.dim() == 2, f"term '{t.key}' is not a matrix pair"
            assert t.read.shape[1] == t.write.shape[0], f"term '{t.key}': inner sizes differ"
            assert t.write.shape[1] == self.width and t.start >= 0 and t.stop <= self.rows, (
                f"term '{t.key}': rows {t.start}..{t.stop} x width {t.write.shape[1]} is not "
                f"inside [{self.rows}, {self.width}]"
            )
        self.terms = terms

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.rows, self.width))

    def dense(self) -> Float[Tensor, "rows d"]:
        return self._placed([(t.start, t.read @ t.write) for t in self.terms])

    def matmul(self, m: Float[Tensor, "d k"]) -> Float[Tensor, "rows k"]:
        """self.dense() @ m without forming the dense matrix."""
        through: dict[str, Tensor] = {}  # write @ m, once per key
        parts = []
        for t in self.terms:
            if t.key not in through:
                through[t.key] = t.write @ m
            parts.append((t.start, t.read @ through[t.key]))
        return self._placed(parts)

    def _placed(self, parts: list[tuple[int, Tensor]]) -> Tensor:
        """The sum of row blocks (start, block) on `rows` rows: blocks over every row added as
        they are; the others laid end to end in as few zero-filled columns as do not overlap."""
        whole = [y for s, y in parts if s == 0 and y.shape[0] == self.rows]
        chains: list[list[tuple[int, Tensor]]] = []
        for s, y in sorted(
            ((s, y) for s, y in parts if not (s == 0 and y.shape[0] == self.rows)),
            key=lambda p: p[0],
        ):
            chain = next((c for c in chains if c[-1][0] + c[-1][1].shape[0] <= s), None)
            if chain is None:
                chains.append([(s, y)])
            else:
                chain.append((s, y))
        for chain in chains:
            blocks, at = [], 0
            for s, y in chain:
                if s > at:
                    blocks.append(y.new_zeros(s - at, y.shape[1]))
                blocks.append(y)
                at = s + y.shape[0]
            if at < self.rows:
                blocks.append(chain[0][1].new_zeros(self.rows - at, chain[0][1].shape[1]))
            whole.append(torch.cat(blocks) if len(blocks) > 1 else blocks[0])
        return sum(whole[1:], whole[0])

    def __add__(self, other: LowRank) -> LowRank:
        assert self.rows == other.rows, f"adding {self.rows} rows to {other.rows}"
        return LowRank(self.terms + other.terms, self.rows)

    def row_slice(self, start: int, stop: int) -> LowRank:
        terms = []
        for t in self.terms:
            lo, hi = max(t.start, start), min(t.stop, stop)
            if lo < hi:
                terms.append(Term(t.key, t.read[lo - t.start : hi - t.start], t.write, lo - start))
        return LowRank(terms, stop - start)

    def repeat(self, k: int) -> LowRank:
        """k copies stacked along the rows."""
        if k == 1:
            return self
        terms = []
        for t in self.terms:
            if t.start == 0 and t.stop == self.rows:
                terms.append(Term(t.key, t.read.repeat(k, 1), t.write))
            else:
                terms += [Term(t.key, t.read, t.write, t.start + i * self.rows) for i in range(k)]
        return LowRank(terms, k * self.rows)

    @staticmethod
    def cat(pieces: list[LowRank]) -> LowRank:
        """The pieces stacked along the rows, each term on its piece's rows (a key's terms on
        adjacent rows merged into one)."""
        if len(pieces) == 1:
            return pieces[0]
        terms: list[Term] = []
        offset = 0
        for piece in pieces:
            for t in piece.terms:
                start = offset + t.start
                i = next((i for i in reversed(range(len(terms))) if terms[i].key == t.key), None)
                if i is not None and terms[i].stop == start:
                    prev = terms[i]
                    terms[i] = Term(t.key, torch.cat([prev.read, t.read]), prev.write, prev.start)
                else:
                    terms.append(Term(t.key, t.read, t.write, start))
            offset += piece.rows
        return LowRank(terms, offset)


def linear_terms(
    key: str,
    x: Float[Tensor, "rows d_in"],
    weight: Float[Tensor, "d_out d_in"],
    bias: Float[Tensor, " d_out"] | None,
    scale: Float[Tensor, "rows 1"] | None = None,
) -> list[Term]:
    """Terms of scale * (x @ weight^T) + bias: keys `key` and `key + ".bias"`."""
    terms = [Term(key, x if scale is None else scale * x, weight.T)]
    if bias is not None:
        terms.append(bias_term(key, x, bias))
    return terms


def bias_term(key: str, like: Float[Tensor, "rows k"], bias: Float[Tensor, " d"]) -> Term:
    """The term of `bias` added to every row of `like`'s rows, keyed `key + ".bias"`."""
    return Term(key + ".bias", like.new_ones(like.shape[0], 1), bias[None, :])


def linear_dense(module: nn.Module, x: Tensor | LowRank) -> Float[Tensor, "rows d_out"]:
    """module(x) for an nn.Linear or any module that takes a LowRank input itself."""
    if isinstance(x, LowRank) and isinstance(module, nn.Linear):
        out = x.matmul(module.weight.T)
        return out if module.bias is None else out + module.bias
    return module(x)  # type: ignore[no-any-return]


def linear_low_rank(module: nn.Module, x: Float[Tensor, "rows d_in"], key: str) -> LowRank:
    """module(x) as a LowRank, for an nn.Linear or a module with its own `low_rank_forward`."""
    own = getattr(module, "low_rank_forward", None)
    if own is not None:
        return own(x)  # type: ignore[no-any-return]
    assert isinstance(module, nn.Linear), f"'{key}' is neither an nn.Linear nor low-rank aware"
    return LowRank(linear_terms(key, x, module.weight, module.bias))
