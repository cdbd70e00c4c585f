"""Learning-rate schedules (warmup then constant / linear / cosine) and importance-minimality p
annealing."""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor


def scheduled_value(
    step: int,
    total_steps: int,
    start_val: float,
    warmup_pct: float = 0.0,
    final_val_frac: float = 1.0,
    fn_type: Literal["constant", "cosine", "linear"] = "constant",
) -> float:
    """Value at `step` of `total_steps`: linear warmup from 0 over int(total * warmup_pct) steps,
    then decay from start_val to start_val * final_val_frac, reached at step total_steps - 1."""
    warmup = int(total_steps * warmup_pct)
    if step < warmup:
        return start_val * step / warmup
    decay_steps = total_steps - warmup
    if fn_type == "constant" or decay_steps <= 1:
        return start_val
    progress = min((step - warmup) / (decay_steps - 1), 1.0)
    f = final_val_frac
    if fn_type == "linear":
        return start_val * (f + (1 - f) * (1 - progress))
    return start_val * (f + (1 - f) * 0.5 * (1 + math.cos(math.pi * progress)))


def annealed_p(
    frac: float | Tensor, p0: float, final_p: float | None, start_frac: float, end_frac: float
) -> float | Tensor:
    """p0 before start_frac, linear to final_p until end_frac, final_p after (no annealing when
    final_p is None or start_frac >= 1). A 0-d tensor `frac` (the compiled step's) gives a 0-d
    tensor, computed without branching on its value."""
    if final_p is None or start_frac >= 1.0:
        return p0
    if isinstance(frac, Tensor):
        if end_frac <= start_frac:
            return torch.where(frac < start_frac, p0, final_p)
        w = ((frac - start_frac) / (end_frac - start_frac)).clamp(0.0, 1.0)
        return p0 + (final_p - p0) * w
    if frac < start_frac:
        return p0
    if frac >= end_frac:
        return final_p
    t = (frac - start_frac) / (end_frac - start_frac)
    return p0 + (final_p - p0) * t
