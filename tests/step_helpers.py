"""What the compiled-step tests share (CPU in tests/core, GPU in tests/gpu): a reporter that keeps
the loop's logged rows, the loss recipe with a PGD ascent inside the step, and the train metrics
two runs are compared on."""

from __future__ import annotations

from typing import Any

import pytest

# A language model's losses (tiny_llama_1L's): subset routes and a PGD ascent inside the step.
WITH_PGD = (
    "loss_metric_configs=["
    "{classname: ImportanceMinimalityLoss, coeff: 1.0e-3, pnorm: 2.0, p_anneal_start_frac: 0.0,"
    " p_anneal_final_p: 0.5},"
    "{classname: StochasticReconSubsetLoss, coeff: 0.5},"
    "{classname: PGDReconSubsetLoss, coeff: 0.5, init: random, step_size: 0.1, n_steps: 2,"
    " mask_scope: shared_across_batch},"
    "{classname: FaithfulnessLoss, coeff: 1.0}]"
)


class Rows:
    """The loop's reporter, keeping every logged row by step."""

    def __init__(self) -> None:
        self.rows: dict[int, dict[str, float]] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.rows.setdefault(step, {}).update(metrics)

    def figures(self, step: int, figures: Any) -> None:
        pass

    def checkpoint(self, step: int, state: Any, final: bool) -> None:
        pass


def train_metrics(rows: dict[int, dict[str, float]]) -> dict[tuple[int, str], float]:
    """{(step, key): value} of the train losses and L0s (not the timing or the schedule)."""
    return {
        (step, k): v
        for step, row in rows.items()
        for k, v in row.items()
        if k.startswith("train/") and k not in ("train/steps_per_s", "train/lr")
    }


def assert_same_train_metrics(
    want_rows: dict[int, dict[str, float]], got_rows: dict[int, dict[str, float]], rtol: float
) -> None:
    """Every train metric of every logged step of an 8-step run within `rtol` (L0s within 2/64)."""
    want, got = train_metrics(want_rows), train_metrics(got_rows)
    assert set(want) == set(got) and len(want) >= 8 * 6
    for key, value in want.items():
        if "/l0/" in key[1]:  # a count over thresholded CI: a rounding flip moves it by 1/64
            assert got[key] == pytest.approx(value, abs=2 / 64), key
        else:
            assert got[key] == pytest.approx(value, rel=rtol, abs=1e-6), key
