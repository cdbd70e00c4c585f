"""Subcomponents: each decomposed weight W (d_out x d_in) is approximated by sum_c U[c]^T V[:, c]^T.

V: [d_in, C] reads the input, U: [C, d_out] writes the output; the component weight in nn.Linear
orientation is (V @ U)^T. For an embedding, V: [vocab, C] is indexed by token id and the weight is
V @ U ([vocab, d_embed], the nn.Embedding orientation).
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Float
from torch import Tensor, nn


def init_param_(param: Tensor, fan_in: int, gain: float = 1.0) -> None:
    """normal(0, gain / sqrt(fan_in)), in place."""
    with torch.no_grad():
        param.normal_(0.0, gain / math.sqrt(fan_in))


class LinearComponents(nn.Module):
    """C rank-one subcomponents of a d_in -> d_out linear map."""

    def __init__(self, d_in: int, d_out: int, C: int):
        super().__init__()
        self.d_in, self.d_out, self.C = d_in, d_out, C
        self.V = nn.Parameter(torch.empty(d_in, C))
        self.U = nn.Parameter(torch.empty(C, d_out))
        init_param_(self.V, fan_in=d_in)
        init_param_(self.U, fan_in=C)

    def get_V(self) -> Float[Tensor, "d_in C"]:
        return self.V

    def get_U(self) -> Float[Tensor, "C d_out"]:
        return self.U

    def weight(self) -> Float[Tensor, "d_out d_in"]:
        return (self.get_V() @ self.get_U()).T

    def acts(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        return x @ self.get_V()

    def subcomponent_weights(self) -> Float[Tensor, "C d_out d_in"]:
        return torch.einsum("ic,co->coi", self.get_V(), self.get_U())


class TiedLinearComponents(LinearComponents):
    """Subcomponents of a module whose target weight is the transpose of another's (tied weights).

    Shares the source's parameters as one set: V = source.U^T and U = source.V^T, so the optimizer
    sees (and updates) each shared parameter exactly once.
    """

    def __init__(self, source: LinearComponents):
        nn.Module.__init__(self)
        self.d_in, self.d_out, self.C = source.d_out, source.d_in, source.C
        # A plain list keeps the source out of this module's parameters and state_dict.
        self._source = [source]

    def get_V(self) -> Tensor:
        return self._source[0].U.T

    def get_U(self) -> Tensor:
        return self._source[0].V.T

    def weight(self) -> Float[Tensor, "d_out d_in"]:
        # Exactly the source's weight transposed: (V U)^T computed from the transposed factors
        # sums in another order, and on some CPUs' matmul kernels differs in the last bit.
        return self._source[0].weight().T


class EmbeddingComponents(nn.Module):
    """C rank-one subcomponents of an embedding table [vocab, d_embed]."""

    def __init__(self, vocab: int, d_embed: int, C: int):
        super().__init__()
        self.d_in, self.d_out, self.C = vocab, d_embed, C
        self.V = nn.Parameter(torch.empty(vocab, C))
        self.U = nn.Parameter(torch.empty(C, d_embed))
        init_param_(self.V, fan_in=vocab)
        init_param_(self.U, fan_in=C)

    def get_V(self) -> Tensor:
        return self.V

    def get_U(self) -> Tensor:
        return self.U

    def weight(self) -> Float[Tensor, "vocab d_embed"]:
        return self.V @ self.U

    def acts(self, ids: Tensor) -> Float[Tensor, "... C"]:
        return self.V[ids]

    def subcomponent_weights(self) -> Float[Tensor, "C vocab d_embed"]:
        return torch.einsum("vc,cd->cvd", self.V, self.U)


Components = LinearComponents | EmbeddingComponents
