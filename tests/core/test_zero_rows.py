"""CI functions evaluated once for the zero rows of a sparse batch (`ci_skip_zero_rows`): the
same values and gradients as evaluating every row, the capacity a batch is compacted to, and a
compiled step whose batch has more nonzero rows than its capacity run again eagerly."""

from __future__ import annotations

import math

import pytest
import torch
from step_helpers import steps_across_an_overflow

from spd_ray.core.ci import (
    ci_on_nonzero_rows,
    make_ci_fn,
    nonzero_row_capacity,
    nonzero_rows,
)
from spd_ray.core.step import step_function
from spd_ray.registry import load_experiment
from spd_ray.targets.loading import build_toy
from spd_ray.train.worker import build_worker

CPU = torch.device("cpu")


def _sparse(n: int, d: int, p_row: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return x * (torch.rand(n, 1, generator=g) < p_row)


@pytest.mark.parametrize("ci_fn_type", ["mlp", "vector_mlp", "shared_mlp"])
def test_skipping_zero_rows_gives_every_rows_values_and_gradients(ci_fn_type: str):
    torch.manual_seed(0)
    C, d_in = 6, 5
    # float64: the two evaluations differ only in the order of the gradients' sums over rows
    fn = make_ci_fn(ci_fn_type, C, d_in, [8]).double()  # type: ignore[arg-type]
    torch.nn.init.normal_(fn.b_in if hasattr(fn, "b_in") else fn.layers[0].bias)
    x = _sparse(200, d_in, 0.3, seed=1).double().reshape(8, 25, d_in)  # [batch, seq, d_in]
    V = torch.randn(d_in, C, dtype=torch.float64)
    inp = x @ V if fn.takes_component_acts else x
    nonzero = nonzero_rows(x, 200)
    n_nonzero = int(nonzero.sum())
    assert 30 < n_nonzero < 90 and (x.reshape(200, -1)[~nonzero] == 0).all()

    def grads(z: torch.Tensor) -> list[torch.Tensor]:
        # a weight per output, so that every row's value matters
        weights = torch.linspace(-1, 1, z.numel(), dtype=z.dtype).reshape(z.shape)
        return list(torch.autograd.grad((z * weights).sum(), list(fn.parameters())))

    want = fn(inp)
    got, fits = ci_on_nonzero_rows(fn, inp, nonzero, capacity=96)
    assert bool(fits) and got.shape == want.shape == (8, 25, C)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(grads(got), grads(want), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    # More nonzero rows than the capacity: reported, so the caller evaluates every row.
    _, fits = ci_on_nonzero_rows(fn, inp, nonzero, capacity=n_nonzero - 1)
    assert not bool(fits)


def test_the_capacity_is_the_count_plus_four_standard_deviations_in_blocks_of_32():
    # tms_5-2: 4096 rows, 1 - 0.95^5 = 22.6% nonzero -> 926 + 4 * 26.8 + 16 = 1049 -> 1056,
    # 4.85 standard deviations above the mean count: a batch overflows it with p ~ 6e-7.
    assert nonzero_row_capacity(926, 4096) == 1056
    sd = math.sqrt(4096 * 0.226 * 0.774)
    assert 4.8 < (1056 - 926) / sd < 4.9
    assert nonzero_row_capacity(0, 4096) == 32
    # resid_mlp1's mlp_in: 2048 rows, 1 - 0.99^100 = 63% nonzero -> 1300 + 4 * 21.8 + 16 -> 1408
    assert nonzero_row_capacity(1300, 2048) == 1408
    # Too little to save (> 80% of the rows): evaluate every row.
    assert nonzero_row_capacity(1500, 2048) == 1600
    assert nonzero_row_capacity(1550, 2048) is None
    assert nonzero_row_capacity(40, 64) is None


def _tms_worker(skip: bool, batch_size: int):
    _, config = load_experiment(
        "tms_5-2",
        [
            f"batch_size={batch_size}",
            "autocast_bf16=false",
            f"ci_skip_zero_rows={str(skip).lower()}",
            "compact_zero_rows=false",  # the step on every row: the CI functions skip (or not)
            "compile=true",
        ],
    )
    assert config.target_model is not None
    torch.manual_seed(0)
    target = build_toy(config.target_model).requires_grad_(False)  # type: ignore[arg-type]
    worker = build_worker(config, target)
    return config, worker.ctx.model


def test_a_compiled_step_skipping_zero_rows_matches_an_eager_step_and_reruns_on_overflow():
    """tms_5-2's losses (fp32), batches of 512: compiled and skipping zero rows vs eager and
    evaluating every row, on the same draws. Sparse batches run one graph; a denser batch (more
    nonzero rows than the capacity the first batch set) is run again eagerly and sets a larger
    capacity, which the next step compiles once more."""
    config, fast = _tms_worker(skip=True, batch_size=512)
    _, plain = _tms_worker(skip=False, batch_size=512)
    fast.load_state_dict(plain.state_dict())
    fast_step = step_function(config, fast)
    plain_config = config.model_copy(update={"compile": False, "ci_skip_zero_rows": False})
    plain_step = step_function(plain_config, plain)
    first, second, capacities, graphs, reruns = steps_across_an_overflow(
        fast_step, plain_step, fast, plain, lambda: sorted(set(fast._row_capacity.values()))
    )
    assert len(fast._row_capacity) == 2  # linear1, linear2: the same rows are zero in both
    assert capacities == [[first]] * 4 + [[second]] * 2
    assert graphs == [0, 1, 1, 1, 1, 2], graphs  # one graph, compiled again for the new capacity
    assert reruns == [0, 0, 0, 0, 1, 1]
