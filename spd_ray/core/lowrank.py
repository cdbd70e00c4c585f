"""Wide activations kept as sums of narrow products (`LowRank`).

Some targets' wide activations are sums of a few narrow reads times fixed writes: ResidMLP's
d_embed-wide residual stream is x @ W_E plus, per block, h @ W_out^T (+ the bias), and it is only
ever read through linear maps (the next block's mlp_in, the read-off W_E^T). Kept as (read, write)
terms, a read through a map M contracts the small weight products first, read @ (write @ M), the
same function and gradients as (read @ write) @ M at a fraction of the FLOPs when the stream is
much wider than the reads (1000 vs 100 for ResidMLP 1), in the target's own training and in
every masked forward of its decomposition (`ComponentModel`: `low_rank_forward`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from jaxtyping import Float
from torch import Tensor, nn


@dataclass(frozen=True)
class Term:
    """read @ write. Terms with the same key share their write: `LowRank.cat` stacks their reads."""

    key: str
    read: Float[Tensor, "rows r"]
    write: Float[Tensor, "r d"]


class LowRank:
    """A [rows, d] matrix held as the sum of its terms' products, never formed unless asked."""

    def __init__(self, terms: list[Term]):
        assert len(terms) > 0, "a LowRank needs at least one term"
        keys = [t.key for t in terms]
        assert len(set(keys)) == len(keys), f"repeated LowRank term keys: {keys}"
        rows, width = terms[0].read.shape[0], terms[0].write.shape[-1]
        for t in terms:
            assert t.read.dim() == 2 and t.write.dim() == 2, f"term '{t.key}' is not a matrix pair"
            assert t.read.shape[0] == rows and t.write.shape[1] == width, (
                f"term '{t.key}': read {tuple(t.read.shape)} x write {tuple(t.write.shape)} "
                f"is not [{rows}, {width}]"
            )
            assert t.read.shape[1] == t.write.shape[0], f"term '{t.key}': inner sizes differ"
        self.terms = terms

    @property
    def shape(self) -> torch.Size:
        return torch.Size((self.terms[0].read.shape[0], self.terms[0].write.shape[1]))

    def dense(self) -> Float[Tensor, "rows d"]:
        return _sum([t.read @ t.write for t in self.terms])

    def matmul(self, m: Float[Tensor, "d k"]) -> Float[Tensor, "rows k"]:
        """self.dense() @ m without forming the dense matrix."""
        return _sum([t.read @ (t.write @ m) for t in self.terms])

    def __add__(self, other: LowRank) -> LowRank:
        return LowRank(self.terms + other.terms)

    def row_slice(self, start: int, stop: int) -> LowRank:
        return LowRank([Term(t.key, t.read[start:stop], t.write) for t in self.terms])

    def repeat(self, k: int) -> LowRank:
        """k copies stacked along the rows."""
        if k == 1:
            return self
        return LowRank([Term(t.key, t.read.repeat(k, 1), t.write) for t in self.terms])

    @staticmethod
    def cat(pieces: list[LowRank]) -> LowRank:
        """The pieces stacked along the rows: one term per key, its read zero on the rows of the
        pieces without that key."""
        if len(pieces) == 1:
            return pieces[0]
        writes: dict[str, Tensor] = {}
        for piece in pieces:
            for t in piece.terms:
                if t.key not in writes:
                    writes[t.key] = t.write
                assert t.write.shape == writes[t.key].shape, f"term '{t.key}' changes shape"
        terms = []
        for key, write in writes.items():
            reads = []
            for piece in pieces:
                read = next((t.read for t in piece.terms if t.key == key), None)
                if read is None:
                    ref = piece.terms[0].read
                    read = ref.new_zeros(ref.shape[0], write.shape[0])
                reads.append(read)
            terms.append(Term(key, torch.cat(reads), write))
        return LowRank(terms)


def _sum(parts: list[Tensor]) -> Tensor:
    return sum(parts[1:], parts[0])


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
        terms.append(Term(key + ".bias", x.new_ones(x.shape[0], 1), bias[None, :]))
    return terms


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
