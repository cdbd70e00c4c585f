"""Argument types with bounds, checked when the command line is parsed: a bad value fails at once
with argparse's one-line error naming the flag, before anything is read, trained or written."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def int_in(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An int in [lo, hi] (no upper bound when hi is None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise argparse.ArgumentTypeError(f"{value} is not {bound}")
        return value

    parse.__name__ = "int"
    return parse


def float_in(lo: float, hi: float | None = None, lo_open: bool = False) -> Callable[[str], float]:
    """A finite float >= lo (> lo when `lo_open`) and <= hi."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        too_low = value <= lo if lo_open else value < lo
        if not math.isfinite(value) or too_low or (hi is not None and value > hi):
            bound = f"> {lo}" if lo_open else f">= {lo}"
            if hi is not None:
                bound += f" and <= {hi}"
            raise argparse.ArgumentTypeError(f"{text} is not a finite number {bound}")
        return value

    parse.__name__ = "float"
    return parse


# Worker-group restarts a run may use: bounded, so a run that fails every time ends.
MAX_FAILURES_LIMIT = 100

positive_int = int_in(1)
nonneg_int = int_in(0)
positive_float = float_in(0.0, lo_open=True)
nonneg_float = float_in(0.0)
