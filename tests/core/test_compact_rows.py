"""A training step on the nonzero rows of a sparse batch (`compact_zero_rows`,
`spd_ray.core.rows`): the compacted rows draw the whole batch's noise, and the step's losses,
metrics and gradients equal the step on every row - eagerly, compiled, with PGD and subset routes,
and when a denser batch overflows the compiled graph's capacity."""

from __future__ import annotations

import pytest
import torch
from step_helpers import (
    assert_same_step,
    assert_same_train_metrics,
    steps_across_an_overflow,
    tiny_config,
    train_tiny,
)

from spd_ray.core.ci import nonzero_row_capacity, nonzero_rows
from spd_ray.core.masks import CounterNoise, Noise
from spd_ray.core.model import ComponentModel
from spd_ray.core.rows import KeptRows, RowNoise, kept_rows
from spd_ray.core.step import step_function
from spd_ray.registry import load_experiment
from spd_ray.targets.loading import build_toy
from spd_ray.train.worker import build_worker

CPU = torch.device("cpu")


def test_kept_rows_are_the_nonzero_rows_then_zero_rows_and_sums_count_the_dropped_ones():
    nonzero = torch.tensor([False, True, False, False, True, False, True, False])
    kept = kept_rows(nonzero, capacity=5, compiling=False)
    assert kept.index.tolist() == [1, 4, 6, 0, 2]  # stable: nonzero rows in order, then zeros
    assert (kept.capacity, kept.n_rows, kept.scale, kept.fits) == (5, 8, 5 / 8, None)
    # A per-row value that every zero row shares: the dropped rows (3, 5, 7) count like row 2.
    per_row = torch.tensor([[9.0, 1.0], [2.0, 3.0], [9.0, 1.0], [9.0, 1.0], [4.0, 5.0]])
    per_row = per_row[[3, 0, 4, 1, 2]]  # in kept order: rows 1, 4, 6, then zero rows 0, 2
    whole = torch.tensor([[9.0, 1.0], [9.0, 1.0], [2.0, 3.0], [9.0, 1.0]] * 2)
    whole[[1, 4, 6]] = per_row[:3]
    torch.testing.assert_close(kept.batch_sum(per_row), whole.sum(0))
    assert bool(kept_rows(nonzero, 4, compiling=True).fits)
    assert not bool(kept_rows(nonzero, 3, compiling=True).fits)  # no zero row among the kept


@pytest.mark.parametrize("rng", ["generator", "counter"])
def test_row_noise_gives_every_kept_row_its_draws_of_the_whole_batch(rng: str):
    kept = KeptRows(torch.tensor([5, 1, 6]), n_rows=8)
    whole, rows = Noise.for_run(3, "train", CPU, rng=rng), Noise.for_run(3, "train", CPU, rng=rng)
    compact = RowNoise(rows, kept)
    want = whole.rand((8, 4), CPU, torch.float32)
    torch.testing.assert_close(compact.rand((3, 4), CPU, torch.float32), want[[5, 1, 6]])
    want_int = whole.randint(1, 4, (8,), CPU)
    assert compact.randint(1, 4, (3,), CPU).tolist() == want_int[[5, 1, 6]].tolist()
    # Unbatched draws and PGD's stream pass through; both streams stay in step.
    torch.testing.assert_close(
        compact.rand_unbatched((1, 4), CPU, torch.float32),
        whole.rand_unbatched((1, 4), CPU, torch.float32),
    )
    pgd_want = whole.pgd_init().rand((8, 2), CPU, torch.float32)[[5, 1, 6]]
    torch.testing.assert_close(compact.pgd_init().rand((3, 2), CPU, torch.float32), pgd_want)
    if isinstance(whole, CounterNoise):
        assert whole.state_dict() == rows.state_dict()
    with pytest.raises(AssertionError, match="batched draw"):
        compact.rand((8, 4), CPU, torch.float32)


# The tiny ResidMLP with sparse data (82% zero rows), fp32, a loss of every kind that draws noise:
# stochastic masks and delta masks, layerwise copies, subset routes (randint + rand), a PGD ascent
# from per-row random sources, hidden-activation reconstruction.
SPARSE = ("batch_size=512", "task_config.feature_probability=0.02", "autocast_bf16=false")
EVERY_LOSS = (
    "loss_metric_configs=["
    "{classname: ImportanceMinimalityLoss, coeff: 1.0e-3, pnorm: 2.0, beta: 0.5},"
    "{classname: StochasticReconLoss, coeff: 1.0},"
    "{classname: StochasticReconLayerwiseLoss, coeff: 1.0},"
    "{classname: StochasticReconSubsetLoss, coeff: 0.5},"
    "{classname: StochasticHiddenActsReconLoss, coeff: 0.5},"
    "{classname: PGDReconLoss, coeff: 0.5, init: random, step_size: 0.1, n_steps: 2,"
    " mask_scope: unique_per_datapoint},"
    "{classname: FaithfulnessLoss, coeff: 1.0}]"
)


def test_an_eager_step_on_the_nonzero_rows_gives_the_losses_and_gradients_of_every_row():
    """Step by step on the same batches and noise: every loss term, total, L0 and gradient of the
    compacted step within float rounding of the step on all 512 rows."""
    config = tiny_config(*SPARSE, EVERY_LOSS, "compile=false", "ci_skip_zero_rows=false")
    models = []
    for compact in (True, False):
        c = config.model_copy(update={"compact_zero_rows": compact})
        torch.manual_seed(0)
        target = build_toy(c.target_model).requires_grad_(False)  # type: ignore[arg-type]
        models.append(build_worker(c, target).ctx.model)
    fast, plain = models
    # Random CI-function biases, so that a zero row's CI (shared by the dropped rows) is far from
    # 0 and counts in importance minimality, L0 and the CI functions' gradients.
    torch.manual_seed(1)
    for name, p in fast.ci_fns.named_parameters():
        if name.rsplit(".", 1)[-1].startswith("b"):
            torch.nn.init.normal_(p, 0.0, 1.0)
    plain.load_state_dict(fast.state_dict())
    step = step_function(config, fast)
    plain_step = step_function(config, plain)
    noises = [Noise.for_run(0, "train", CPU) for _ in range(2)]
    g = torch.Generator().manual_seed(1)
    for k in range(3):
        x = (torch.rand(512, 10, generator=g) < 0.02) * (torch.rand(512, 10, generator=g) * 2 - 1)
        got = step(x, noises[0], k / 3)
        want = plain_step(x, noises[1], k / 3)
        n_nonzero = int(nonzero_rows(x, 512).sum())
        assert fast._batch_capacity == {512: nonzero_row_capacity(n_nonzero, 512)}
        assert fast._batch_capacity[512] < 200 and plain._batch_capacity == {}
        assert len(want[1]) >= 9
        assert_same_step(got, want, fast, plain, atol=1e-8, grad_atol=1e-7, grads_nonzero=True)
    assert noises[0].state_dict() == noises[1].state_dict()


def test_training_compiled_on_the_nonzero_rows_logs_the_metrics_of_an_eager_run_on_every_row():
    """8 steps of the real loop (bf16 autocast as shipped), compiled and compacted vs eager on
    every row: every train metric of every step within bf16 rounding."""
    sparse = ("batch_size=512", "task_config.feature_probability=0.02")
    want = train_tiny(tiny_config(*sparse, "compile=false", "compact_zero_rows=false"))
    got = train_tiny(tiny_config(*sparse, "compile=true", "compact_zero_rows=true"))
    assert_same_train_metrics(want, got, rtol=2e-2)


def _tms(compact: bool):
    _, config = load_experiment(
        "tms_5-2",
        [
            "batch_size=512",
            "autocast_bf16=false",
            "ci_skip_zero_rows=false",
            f"compact_zero_rows={str(compact).lower()}",
            "compile=true",
        ],
    )
    assert config.target_model is not None
    torch.manual_seed(0)
    target = build_toy(config.target_model).requires_grad_(False)  # type: ignore[arg-type]
    return config, build_worker(config, target).ctx.model


def test_a_compiled_step_on_the_nonzero_rows_matches_and_reruns_a_batch_that_overflows():
    """tms_5-2 (a bias on linear2), fp32, batches of 512: compiled and compacted vs eager on every
    row, on the same draws. Sparse batches run one graph; a denser batch (more nonzero rows than
    the first batch's capacity) is run again eagerly and sets a larger capacity, which the next
    step compiles once more."""
    config, fast = _tms(compact=True)
    _, plain = _tms(compact=False)
    fast.load_state_dict(plain.state_dict())
    fast_step = step_function(config, fast)
    plain_step = step_function(config.model_copy(update={"compile": False}), plain)
    first, second, capacities, graphs, reruns = steps_across_an_overflow(
        fast_step, plain_step, fast, plain, lambda: fast._batch_capacity[512]
    )
    assert capacities == [first] * 4 + [second] * 2
    assert graphs == [0, 1, 1, 1, 1, 2], graphs  # one graph, compiled again for the new capacity
    assert reruns == [0, 0, 0, 0, 1, 1]


def test_only_targets_that_say_their_rows_are_independent_are_compacted():
    """A target without `rows_independent` (a language model's positions attend to each other)
    runs every row, whatever the flag; a declared one with a batch that is not [rows, features]
    does too."""
    x = torch.zeros(256, 4)
    x[:10] = 1.0

    class Rowwise(torch.nn.Sequential):
        rows_independent = True

    for target, batch, compacts in [
        (torch.nn.Sequential(torch.nn.Linear(4, 4, bias=False)), x, False),
        (Rowwise(torch.nn.Linear(4, 4, bias=False)), x, True),
        (Rowwise(torch.nn.Linear(4, 4, bias=False)), x.reshape(16, 16, 4), False),
    ]:
        model = ComponentModel(target.requires_grad_(False), [("0", 3)])
        model.compact_zero_rows = True
        kept = model.kept_rows(batch)
        assert (kept is not None) == compacts
        if kept is not None:  # 10 nonzero + 4 sd (12.4) + 16 -> 64 rows, the first 10 nonzero
            assert kept.capacity == 64 and kept.index[:10].tolist() == list(range(10))
            _, cache = model.clean_forward(kept.take(batch))
            assert bool(model.quiet_zero_row(cache, kept))


def test_a_target_whose_zero_rows_reach_a_module_as_nonzero_is_not_compacted():
    """ResidMLP with an mlp_in bias: a zero row reaches mlp_out as act(bias), where masks change
    its output. The first step finds so, runs on every row (the numbers of the plain step) and
    compacting stops for good."""
    config = tiny_config(*SPARSE, "target_model.in_bias=true", "compile=false")
    steps, models = [], []
    for compact in (True, False):
        c = config.model_copy(update={"compact_zero_rows": compact})
        torch.manual_seed(0)
        target = build_toy(c.target_model).requires_grad_(False)  # type: ignore[arg-type]
        torch.nn.init.normal_(target.layers[0].mlp_in.bias, 0.0, 1.0)  # type: ignore[union-attr]
        model = build_worker(c, target).ctx.model
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model)
        steps.append(step_function(c, model))
    g = torch.Generator().manual_seed(1)
    x = (torch.rand(512, 10, generator=g) < 0.02) * torch.rand(512, 10, generator=g)
    kept = models[0].kept_rows(x)
    assert kept is not None  # sparse enough; the step then finds the zero row not quiet
    _, cache = models[0].clean_forward(kept.take(x))
    assert not bool(models[0].quiet_zero_row(cache, kept))
    got, _ = steps[0](x, Noise.for_run(0, "train", CPU), 0.0)
    want, _ = steps[1](x, Noise.for_run(0, "train", CPU), 0.0)
    assert models[0]._batch_capacity == {512: None}
    assert got.item() == want.item()


def _ddp_worker(rank: int, store_file: str, out_dir: str) -> None:
    """One of two gloo workers: the compacted eager step on its half of the batch."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    config, model = _sparse_resid(compact=True)
    step = step_function(config, model, world_size=2)
    x = _sparse_batch()
    total, metrics = step(x[256 * rank : 256 * (rank + 1)], _ddp_noise(rank, 2), 0.5)
    total.backward()
    grads = {}
    for name, p in model.named_parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            grads[name] = p.grad / 2  # the loop's gradient averaging
    out = {"metrics": metrics, "grads": grads, "capacity": model._batch_capacity}
    torch.save(out, f"{out_dir}/rank{rank}.pt")
    dist.destroy_process_group()


def _sparse_resid(compact: bool):
    config = tiny_config(*SPARSE, EVERY_LOSS, "compile=false", "ci_skip_zero_rows=false")
    config = config.model_copy(update={"compact_zero_rows": compact})
    torch.manual_seed(0)
    target = build_toy(config.target_model).requires_grad_(False)  # type: ignore[arg-type]
    return config, build_worker(config, target).ctx.model


def _sparse_batch() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return (torch.rand(512, 10, generator=g) < 0.02) * (torch.rand(512, 10, generator=g) * 2 - 1)


def _ddp_noise(rank: int, world_size: int) -> Noise:
    return Noise.for_run(0, "train", CPU, rank=rank, world_size=world_size)


def test_two_workers_compacting_their_halves_give_the_one_worker_step(tmp_path):
    """2 gloo processes, each compacting its own 256 rows (its own capacity, its rows of the
    global noise): the mean of their loss terms and the averaged gradient equal one worker's
    step on all 512 rows."""
    import torch.multiprocessing as mp

    mp.spawn(_ddp_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    config, model = _sparse_resid(compact=False)
    want_total, want = step_function(config, model)(_sparse_batch(), _ddp_noise(0, 1), 0.5)
    want_total.backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for r in ranks:
        assert r["capacity"] == {256: 96}  # compacted: ~46 nonzero rows of 256
    for key, value in want.items():
        got = (ranks[0]["metrics"][key] + ranks[1]["metrics"][key]) / 2
        torch.testing.assert_close(got, value, rtol=1e-5, atol=1e-8, msg=key)
    for name, p in model.named_parameters():
        if p.grad is not None:
            for r in ranks:
                torch.testing.assert_close(r["grads"][name], p.grad, rtol=1e-4, atol=1e-7)


def test_an_eval_on_the_nonzero_rows_gives_every_metric_of_an_eval_on_every_row():
    """The run's evaluation (fp32, fresh eval batches, CI statistics plus every loss that draws
    noise): loss terms on the kept rows, CI statistics on every row rebuilt from them; every
    scalar within float rounding of the eval on every row. Random CI-function biases, so that the
    zero rows' shared CI is far from 0 and counts in L0, means and densities."""
    stats = (
        "{classname: CI_L0}, {classname: CIMeanPerComponent},"
        " {classname: ComponentActivationDensity},"
        " {classname: CIHistograms, n_batches_accum: 1}]"
    )
    metrics = "eval_metric_configs=" + EVERY_LOSS.split("=", 1)[1].replace("]", ",") + stats
    config = tiny_config(*SPARSE, "compile=false", metrics, "n_eval_steps=3")
    evals, models = {}, []
    for compact in (True, False):
        c = config.model_copy(update={"compact_zero_rows": compact})
        torch.manual_seed(0)
        target = build_toy(c.target_model).requires_grad_(False)  # type: ignore[arg-type]
        worker = build_worker(c, target)
        model = worker.ctx.model
        if not models:
            torch.manual_seed(1)
            for name, p in model.ci_fns.named_parameters():
                if name.rsplit(".", 1)[-1].startswith("b"):
                    torch.nn.init.normal_(p, 0.0, 1.0)
        else:
            model.load_state_dict(models[0].state_dict())
        models.append(model)
        scalars, figures = worker.ctx.evaluate(model, 0, True)
        evals[compact] = ({k: float(v) for k, v in scalars.items()}, set(figures))
        assert model._batch_capacity.get(512) == (160 if compact else None)
    (got, got_figs), (want, want_figs) = evals[True], evals[False]
    assert set(got) == set(want) and len(want) >= 10 and got_figs == want_figs
    assert want["eval/l0/layers.0.mlp_in"] > 0.5  # the zero rows' CI counts
    for key, value in want.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
