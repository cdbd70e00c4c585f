"""Causal-importance functions and the sigmoids that turn their outputs into CI values in [0, 1].

A CI function maps what a module sees (its component activations x @ V, or its input x) to one
pre-activation per subcomponent. The *lower-leaky* sigmoid of it feeds masks and every
reconstruction metric; the *upper-leaky* one feeds only the importance-minimality loss.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn

from spd_ray.config import CIFnType, SigmoidType
from spd_ray.core.components import init_param_

LEAK = 0.01


class _LowerLeakyHard(torch.autograd.Function):
    """clamp(z, 0, 1) forward; the backward leaks below 0, but only for gradients that push z up.

    This keeps masks >= 0 while letting a dead subcomponent be revived by a loss that wants it
    larger.
    """

    @staticmethod
    def forward(ctx: Any, z: Tensor) -> Tensor:
        ctx.save_for_backward(z)
        return z.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> Tensor:
        (z,) = ctx.saved_tensors
        below = z <= 0
        inside = (z > 0) & (z <= 1)
        return torch.where(inside, g, torch.where(below & (g < 0), LEAK * g, torch.zeros_like(g)))


def lower_leaky_hard_sigmoid(z: Tensor) -> Tensor:
    return _LowerLeakyHard.apply(z)  # type: ignore[no-any-return]


def upper_leaky_hard_sigmoid(z: Tensor) -> Tensor:
    """clamp(z, 0, 1) below 1, 1 + 0.01 (z - 1) above (zero gradient below 0)."""
    return torch.where(z > 1, 1 + LEAK * (z - 1), z.clamp(0.0, 1.0))


def hard_sigmoid(z: Tensor) -> Tensor:
    return z.clamp(0.0, 1.0)


def swish_hard_sigmoid(z: Tensor) -> Tensor:
    """A smooth hard sigmoid built from swish functions (beta 10), ~0 below 0 and ~1 above 1."""

    def sw(t: Tensor) -> Tensor:
        return t * torch.sigmoid(10 * t)

    def usw(t: Tensor) -> Tensor:
        return t * torch.sigmoid(-10 * t)

    x = z - 0.5
    return 0.5 + usw(x - 0.5) - sw(x) + sw(x + 0.5) - usw(x)


_SIGMOIDS: dict[str, Callable[[Tensor], Tensor]] = {
    "normal": torch.sigmoid,
    "hard": hard_sigmoid,
    "lower_leaky_hard": lower_leaky_hard_sigmoid,
    "upper_leaky_hard": upper_leaky_hard_sigmoid,
    "swish_hard": swish_hard_sigmoid,
}


def sigmoid_pair(
    sigmoid_type: SigmoidType,
) -> tuple[Callable[[Tensor], Tensor], Callable[[Tensor], Tensor]]:
    """(lower, upper) sigmoids: `leaky_hard` pairs lower- and upper-leaky; others use one for
    both."""
    if sigmoid_type == "leaky_hard":
        return _SIGMOIDS["lower_leaky_hard"], _SIGMOIDS["upper_leaky_hard"]
    fn = _SIGMOIDS[sigmoid_type]
    return fn, fn


class ParallelLinear(nn.Module):
    """C independent linear maps in_dim -> out_dim, applied to [..., C, in_dim]."""

    def __init__(self, C: int, in_dim: int, out_dim: int, gain: float):
        super().__init__()
        self.W = nn.Parameter(torch.empty(C, in_dim, out_dim))
        self.b = nn.Parameter(torch.zeros(C, out_dim))
        init_param_(self.W, fan_in=in_dim, gain=gain)

    def forward(self, x: Float[Tensor, "... C d_in"]) -> Float[Tensor, "... C d_out"]:
        return torch.einsum("...ci,cio->...co", x, self.W) + self.b


class _PerComponentMLP(nn.Module):
    """Hidden layers and read-out shared by the two per-subcomponent CI function families."""

    def __init__(self, C: int, hidden_dims: list[int]):
        super().__init__()
        assert hidden_dims, "per-subcomponent CI functions need at least one hidden layer"
        self.C = C
        self.b_in = nn.Parameter(torch.zeros(C, hidden_dims[0]))
        self.hidden = nn.ModuleList(
            ParallelLinear(C, hidden_dims[i], hidden_dims[i + 1], gain=math.sqrt(2))
            for i in range(len(hidden_dims) - 1)
        )
        self.W_out = nn.Parameter(torch.empty(C, hidden_dims[-1]))
        self.b_out = nn.Parameter(torch.zeros(C))
        init_param_(self.W_out, fan_in=hidden_dims[-1])

    def _rest(self, pre: Float[Tensor, "... C h1"]) -> Float[Tensor, "... C"]:
        h = F.gelu(pre + self.b_in)
        for layer in self.hidden:
            h = F.gelu(layer(h))
        return (h * self.W_out).sum(-1) + self.b_out


class MLPCiFn(_PerComponentMLP):
    """One scalar MLP 1 -> h1 -> ... -> 1 per subcomponent, reading that subcomponent's x @ V."""

    takes_component_acts = True

    def __init__(self, C: int, hidden_dims: list[int]):
        super().__init__(C, hidden_dims)
        self.W_in = nn.Parameter(torch.empty(C, hidden_dims[0]))
        init_param_(self.W_in, fan_in=1, gain=math.sqrt(2))

    def forward(self, acts: Float[Tensor, "... C"]) -> Float[Tensor, "... C"]:
        return self._rest(acts.unsqueeze(-1) * self.W_in)


class VectorMLPCiFn(_PerComponentMLP):
    """One MLP d_in -> h1 -> ... -> 1 per subcomponent, reading the module input."""

    takes_component_acts = False

    def __init__(self, C: int, d_in: int, hidden_dims: list[int]):
        super().__init__(C, hidden_dims)
        self.W_in = nn.Parameter(torch.empty(d_in, C, hidden_dims[0]))
        init_param_(self.W_in, fan_in=d_in, gain=math.sqrt(2))

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        pre = (x @ self.W_in.flatten(1)).unflatten(
            -1, (self.C, -1)
        )  # all C first layers in one matmul
        return self._rest(pre)


class SharedMLPCiFn(nn.Module):
    """One ordinary MLP d_in -> h1 -> ... -> C shared by all subcomponents of a module."""

    takes_component_acts = False

    def __init__(self, C: int, d_in: int, hidden_dims: list[int]):
        super().__init__()
        self.C = C
        dims = [d_in, *hidden_dims, C]
        layers = [nn.Linear(dims[i], dims[i + 1]) for i in range(len(dims) - 1)]
        for i, layer in enumerate(layers):
            last = i == len(layers) - 1
            init_param_(layer.weight, fan_in=dims[i], gain=1.0 if last else math.sqrt(2))
            nn.init.zeros_(layer.bias)
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Float[Tensor, "... d_in"]) -> Float[Tensor, "... C"]:
        h = x
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = F.gelu(h)
        return h


CIFn = MLPCiFn | VectorMLPCiFn | SharedMLPCiFn


def make_ci_fn(ci_fn_type: CIFnType, C: int, d_in: int, hidden_dims: list[int]) -> CIFn:
    match ci_fn_type:
        case "mlp":
            return MLPCiFn(C, hidden_dims)
        case "vector_mlp":
            return VectorMLPCiFn(C, d_in, hidden_dims)
        case "shared_mlp":
            return SharedMLPCiFn(C, d_in, hidden_dims)


# Zero rows. Every CI function is row-wise, and x @ V of a row x = 0 is 0, so all rows whose module
# input is exactly zero (most rows of the sparse toy tasks: 77% of a tms_5-2 batch) share one CI
# value. `ci_on_nonzero_rows` evaluates the function once for them and on the others alone,
# compacted to a fixed number of rows: a static shape, so a compiled step neither recompiles nor
# branches on the data; it reports whether the batch fit instead (the caller evaluates every row
# when it did not).


def nonzero_row_capacity(n_nonzero: int, n_rows: int) -> int | None:
    """Rows to compact to, from one batch's count of nonzero rows: that count plus four binomial
    standard deviations and 16, rounded up to a multiple of 32 (a later batch of the same data
    overflows it with probability < 5e-5, and such a batch costs one more step, not a wrong one);
    None when it would not save a fifth of the rows."""
    p = n_nonzero / n_rows
    margin = 4 * math.sqrt(n_rows * p * (1 - p)) + 16
    capacity = 32 * math.ceil((n_nonzero + margin) / 32)
    return capacity if capacity <= 0.8 * n_rows else None


def nonzero_rows(module_input: Tensor, n_rows: int) -> Tensor:
    """Bool [n_rows]: which rows of a module's input [..., d_in] are not all zero."""
    return (module_input.reshape(n_rows, -1) != 0).any(-1)


def measured_capacity(
    table: dict[Any, int | None], key: Any, nonzero_of: Callable[[], Tensor], spare: int = 0
) -> tuple[int, Tensor] | None:
    """The capacity `key`'s rows are compacted to, and which rows are nonzero (`nonzero_of()`,
    Bool [n_rows], called only when compacting); None: run every row. Eagerly the capacity is set
    from the first batch (`nonzero_row_capacity`) and set again by a batch with more than
    capacity - `spare` nonzero rows (also the eager re-run of a compiled step that did not fit),
    so data that grows denser does not run every step twice; None there is for good. Inside a
    compiled graph it is `table`'s value, a constant (the caller reports whether the batch fit)."""
    compiling = torch.compiler.is_compiling()
    capacity = table.get(key) if compiling else table.get(key, -1)
    if capacity is None:
        return None
    nonzero = nonzero_of()
    if not compiling:
        n_nonzero = int(nonzero.sum())
        if n_nonzero + spare > capacity:
            capacity = table[key] = nonzero_row_capacity(n_nonzero, int(nonzero.shape[0]))
            if capacity is None:
                return None
    return capacity, nonzero


def nonzero_first(nonzero: Tensor, capacity: int) -> Tensor:
    """Row indices [capacity]: the `nonzero` rows in order (a stable sort of a 0/1 key), then zero
    rows; all the nonzero ones where there are at most `capacity`."""
    return torch.argsort(nonzero.to(torch.uint8), descending=True, stable=True)[:capacity]


def ci_on_nonzero_rows(
    fn: Callable[[Tensor], Tensor], inp: Tensor, nonzero: Tensor, capacity: int
) -> tuple[Tensor, Tensor]:
    """(`fn(inp)`, True) for a row-wise CI function `fn` when at most `capacity` rows are
    `nonzero` (Bool [n_rows]), evaluating `fn` on those rows and once on a zero row for all the
    others; the first value is wrong where the second, a 0-d bool, is False. `inp` is what `fn`
    reads (component acts or the module input itself), [..., d]."""
    lead, d = inp.shape[:-1], inp.shape[-1]
    flat = inp.reshape(-1, d)
    rows = nonzero_first(nonzero, capacity)
    z_rows = fn(flat.index_select(0, rows))
    z_zero = fn(flat.new_zeros(1, d))
    z = z_zero.expand(flat.shape[0], -1).contiguous().index_copy(0, rows, z_rows)
    return z.reshape(*lead, -1), nonzero.sum() <= capacity
