"""Exact sums of grad x activation: fixed-point integers in two int64 limbs.

Every per-position value x is put on a fixed grid as `whole * 2**-20 + fine * 2**-60` (`split`;
exact for |x| >= 2**-8, else rounded by at most 2**-61), and sums are integer sums. Integer addition
is associative, so a state after batches A then B equals the merge of separate states of A and B
bit for bit, in any order or grouping; states cut by target range join back exactly. Range:
|sum| < 2**43 (~8.8e12) per (target, source) pair, guarded by a running bound.

A state (what an actor hands back, picklable, CPU tensors):
  whole, fine   int64 [rows, n_sources]: the sums, fine kept in [0, 2**40)
  targets       (lo, hi): the global target rows it holds
  n_tokens      valid positions summed over; n_batches: batches added
  bound         an upper bound of |whole|
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

WHOLE_BITS = 20  # fraction bits of the `whole` limb
FINE_BITS = 40  # further fraction bits of the `fine` limb (kept in [0, 2**FINE_BITS))
MAX_POSITION_VALUE = 2.0**32  # |grad x act| at one position, so that split is exact
MAX_WHOLE = 2**62  # headroom of the int64 `whole` limb


def split(x: Float[Tensor, "*shape"]) -> tuple[Tensor, Tensor]:
    """x (per position) as int64 (whole, fine) with x ~= whole * 2**-20 + fine * 2**-60 exactly on
    that grid, |fine| <= 2**39; exact while |x| < 2**32 (checked by the caller)."""
    s = x.double() * 2.0**WHOLE_BITS  # exact (a power of two)
    whole = torch.round(s)
    fine = torch.round((s - whole) * 2.0**FINE_BITS)  # s - whole is exact (Sterbenz)
    return whole.to(torch.int64), fine.to(torch.int64)


def normalise(whole: Tensor, fine: Tensor) -> None:
    """Carry `fine` into `whole` in place so that 0 <= fine < 2**FINE_BITS."""
    carry = torch.bitwise_right_shift(fine, FINE_BITS)  # floor division, also for negatives
    fine -= torch.bitwise_left_shift(carry, FINE_BITS)
    whole += carry


def to_float64(whole: Tensor, fine: Tensor) -> Float[Tensor, "*shape"]:
    return whole.double() * 2.0**-WHOLE_BITS + fine.double() * 2.0 ** -(WHOLE_BITS + FINE_BITS)


def merge_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """The exact sum of states of the same target rows (from different batches)."""
    assert states, "nothing to merge"
    first = states[0]
    for s in states[1:]:
        assert s["targets"] == first["targets"], f"rows {s['targets']} vs {first['targets']}"
        assert s["whole"].shape == first["whole"].shape, "states of different layouts"
    whole, fine = first["whole"].clone(), first["fine"].clone()
    for s in states[1:]:  # fine < 2**40 each: up to 2**23 states add up before the carry
        whole += s["whole"]
        fine += s["fine"]
    normalise(whole, fine)
    bound = sum(s["bound"] for s in states)
    assert bound < MAX_WHOLE, "attribution sums too large for the exact accumulator"
    return {
        "whole": whole,
        "fine": fine,
        "targets": first["targets"],
        "n_tokens": sum(s["n_tokens"] for s in states),
        "n_batches": sum(s["n_batches"] for s in states),
        "bound": bound,
    }


def concat_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """Adjacent target ranges (of the same batches) joined into one state."""
    assert states, "nothing to join"
    states = sorted(states, key=lambda s: s["targets"][0])
    for a, b in zip(states, states[1:], strict=False):
        assert a["targets"][1] == b["targets"][0], f"gap between {a['targets']} and {b['targets']}"
        assert a["n_tokens"] == b["n_tokens"], "states of different batches"
    return {
        "whole": torch.cat([s["whole"] for s in states]),
        "fine": torch.cat([s["fine"] for s in states]),
        "targets": (states[0]["targets"][0], states[-1]["targets"][1]),
        "n_tokens": states[0]["n_tokens"],
        "n_batches": states[0]["n_batches"],
        "bound": max(s["bound"] for s in states),
    }


def state_sums(state: dict[str, Any]) -> Float[Tensor, "rows n_sources"]:
    """The summed grad x activation of a state, float64 (not divided by the tokens)."""
    return to_float64(state["whole"], state["fine"])


def state_means(state: dict[str, Any]) -> Float[Tensor, "rows n_sources"]:
    """attr = sums / T, float64."""
    assert state["n_tokens"] > 0, "no tokens accumulated"
    return state_sums(state) / state["n_tokens"]
