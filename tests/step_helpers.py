"""What the compiled-step tests share (CPU in tests/core, GPU in tests/gpu): short runs of the tiny
ResidMLP fixture through the real training loop, a reporter that keeps the loop's logged rows, the
loss recipe with a PGD ascent inside the step, and the train metrics two runs are compared on."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from spd_ray.config import Config, load_config
from spd_ray.core.masks import Noise
from spd_ray.core.model import ComponentModel
from spd_ray.core.recon import StepInputs

TINY = Path(__file__).resolve().parent / "fixtures" / "tiny_resid_mlp.yaml"

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


def tiny_config(*overrides: str, steps: int = 8, log_every: int = 1) -> Config:
    """The tiny fixture for `steps` steps, train metrics every `log_every`, eval_freq = steps."""
    return load_config(
        TINY,
        [
            f"steps={steps}",
            f"train_log_freq={log_every}",
            f"eval_freq={steps}",
            "slow_eval_freq=null",
            "eval_metric_configs=[]",
            "faithfulness_warmup_steps=2",
            *overrides,
        ],
    )


def train_tiny(
    config: Config,
    device: torch.device | str = "cpu",
    on_step: Callable[[int, float], None] | None = None,
) -> dict[int, dict[str, float]]:
    """Train on the tiny target (seed 0) on `device`; the logged rows by step."""
    from spd_ray.targets.loading import build_toy
    from spd_ray.train.loop import make_state, run_loop
    from spd_ray.train.worker import build_worker

    assert config.target_model is not None
    torch.manual_seed(0)
    target = build_toy(config.target_model).requires_grad_(False)  # type: ignore[arg-type]
    worker = build_worker(config, target, device=device)
    worker.ctx.on_step = on_step
    rows = Rows()
    run_loop(config, worker.ctx, make_state(config, worker.ctx), rows)
    return rows.rows


def count_graphs(graphs: list[int]) -> Callable[[int, float], None]:
    """An `on_step` that appends, after each step, how many graphs Dynamo has compiled so far."""
    counters = torch._dynamo.utils.counters
    return lambda step, seconds: graphs.append(counters["stats"]["unique_graphs"])


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


def assert_same_step(
    got: tuple[torch.Tensor, dict[str, torch.Tensor]],
    want: tuple[torch.Tensor, dict[str, torch.Tensor]],
    fast: torch.nn.Module,
    plain: torch.nn.Module,
    atol: float = 1e-7,
    grad_atol: float = 1e-6,
    grads_nonzero: bool = False,
) -> None:
    """Two models' steps on the same batch and draws, `got` (total, metrics) of `fast` and `want`
    of `plain`: the total and every metric within rel 1e-5, then, after backward, every
    parameter's gradient within rel 1e-4 (all nonzero, with `grads_nonzero`); the gradients are
    cleared."""
    (got_total, got_metrics), (want_total, want_metrics) = got, want
    torch.testing.assert_close(got_total, want_total, rtol=1e-5, atol=atol)
    assert set(got_metrics) == set(want_metrics)
    for key in want_metrics:
        torch.testing.assert_close(
            got_metrics[key], want_metrics[key], rtol=1e-5, atol=atol, msg=key
        )
    got_total.backward()
    want_total.backward()
    for (name, p), q in zip(fast.named_parameters(), plain.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            assert q.grad is not None
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=grad_atol, msg=name)
            assert not grads_nonzero or q.grad.abs().max() > 0, name
        p.grad = q.grad = None


def steps_across_an_overflow(
    fast_step: Callable[..., Any],
    plain_step: Callable[..., Any],
    fast: torch.nn.Module,
    plain: torch.nn.Module,
    capacity: Callable[[], object],
) -> tuple[int, int, list[object], list[int], list[int]]:
    """tms_5-2-shaped batches of 512 through a compiled step skipping zero rows (`fast_step` of
    `fast`) and a plain one, on the same draws, each step compared (`assert_same_step`): four
    sparse batches with the same count of nonzero rows, then a denser one (250 nonzero rows, more
    than the first batch's capacity), then a sparse one again. Returns the capacities for the
    sparse and the dense count, and per step `capacity()`, the graphs compiled so far and the
    re-runs so far."""
    from spd_ray.core.ci import nonzero_row_capacity, nonzero_rows
    from spd_ray.core.masks import Noise

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    fast_noise, plain_noise = Noise.for_run(0, "train", "cpu"), Noise.for_run(0, "train", "cpu")
    g = torch.Generator().manual_seed(0)
    sparse = [(torch.rand(512, 5, generator=g) < 0.05) * torch.rand(512, 5, generator=g)]
    sparse += [sparse[0].roll(k, 0) for k in (1, 2, 3)]  # the same count of nonzero rows
    denser = torch.rand(512, 5, generator=g) * (torch.arange(512) < 250).unsqueeze(-1)
    n_sparse = int(nonzero_rows(sparse[0], 512).sum())
    first, second = nonzero_row_capacity(n_sparse, 512), nonzero_row_capacity(250, 512)
    assert first is not None and second is not None and first < 250 < second < 512
    capacities: list[object] = []
    graphs: list[int] = []
    reruns: list[int] = []
    for k, batch in enumerate([*sparse, denser, sparse[1]]):
        got = fast_step(batch, fast_noise, k / 10)
        want = plain_step(batch, plain_noise, k / 10)
        graphs.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])
        reruns.append(fast_step.reruns)
        capacities.append(capacity())
        assert_same_step(got, want, fast, plain)
    return first, second, capacities, graphs, reruns


def clean_inputs(
    model: ComponentModel,
    batch: torch.Tensor,
    output_loss_type: str,
    delta: bool,
    noise_seed: int,
    copies_per_forward: int | None = None,
) -> StepInputs:
    """What a loss term reads, without a config: the clean forward (no grad) and its continuous
    CI, 2 mask samples, noise from a generator seeded `noise_seed`."""
    with torch.no_grad():
        target_out, cache = model.clean_forward(batch)
    return StepInputs(
        model=model,
        batch=batch,
        target_out=target_out,
        cache=cache,
        ci=model.ci_from_cache(cache),
        output_loss_type=output_loss_type,  # type: ignore[arg-type]
        use_delta_component=delta,
        sampling="continuous",
        n_mask_samples=2,
        noise=Noise(torch.Generator().manual_seed(noise_seed)),
        copies_per_forward=copies_per_forward,
    )
