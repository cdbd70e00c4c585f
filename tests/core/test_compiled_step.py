"""The compiled training step (`compile: true`) against the eager one: same masks, same metrics
step by step within float tolerance, no recompilation after the first compiled step, and the tape
of random draws replaying the real streams exactly."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from step_helpers import (
    TINY,
    WITH_PGD,
    assert_same_train_metrics,
    count_graphs,
    tiny_config,
    train_tiny,
)

from spd_ray.config import load_config
from spd_ray.core.compiled import CompiledStep, RecordingNoise, ReplayNoise, draw_tape
from spd_ray.core.masks import Noise
from spd_ray.core.schedule import annealed_p
from spd_ray.core.step import COMPILE_MIN_STEPS, compiles_step

CPU = torch.device("cpu")

# Every kind of draw a step makes: stochastic and delta masks (rand), subset routes (randint +
# rand), PGD's random sources per position (PGD-init stream) and shared across the batch
# (rand_unbatched), binomial CI noise; and an annealed p, which changes every step.
EVERY_DRAW = (
    "loss_metric_configs=["
    "{classname: ImportanceMinimalityLoss, coeff: 1.0e-3, pnorm: 2.0, p_anneal_start_frac: 0.0,"
    " p_anneal_final_p: 0.5, beta: 0.1},"
    "{classname: StochasticReconLoss, coeff: 1.0},"
    "{classname: StochasticReconLayerwiseLoss, coeff: 1.0},"
    "{classname: StochasticReconSubsetLoss, coeff: 0.5},"
    "{classname: PGDReconLoss, coeff: 0.5, init: random, step_size: 0.1, n_steps: 1,"
    " mask_scope: unique_per_datapoint},"
    "{classname: PGDReconSubsetLoss, coeff: 0.5, init: random, step_size: 0.1, n_steps: 1,"
    " mask_scope: shared_across_batch},"
    "{classname: FaithfulnessLoss, coeff: 1.0}]"
)


@pytest.mark.parametrize(
    ("settings", "rtol", "one_graph"),
    [
        pytest.param(
            ("autocast_bf16=false", EVERY_DRAW, "sampling=binomial"),
            1e-4,
            True,
            marks=pytest.mark.slow,  # ~15 s with a warm compile cache, minutes cold
        ),
        (("autocast_bf16=true", WITH_PGD), 2e-2, True),
    ],
    ids=["fp32-every-draw", "bf16-pgd"],
)
def test_compiled_step_matches_eager_step_by_step(
    settings: tuple[str, ...], rtol: float, one_graph: bool
):
    eager = train_tiny(tiny_config("compile=false", *settings))
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs: list[int] = []
    compiled = train_tiny(tiny_config("compile=true", *settings), on_step=count_graphs(graphs))
    # Step 1 runs eagerly (recording the tape), step 2 compiles, steps 3..8 reuse what step 2
    # compiled although the masks and the annealed p change every step.
    assert graphs[0] == 0 and graphs[1] >= 1
    assert graphs[2:] == [graphs[1]] * 6, graphs
    # One graph, PGD's inner autograd.grad included, where this torch can trace it.
    assert (graphs[1] == 1) == one_graph, graphs
    assert_same_train_metrics(eager, compiled, rtol)


@pytest.mark.parametrize("rng", ["counter", "generator"])
def test_the_tape_replays_the_real_streams_draw_for_draw(rng: Any):
    def noise() -> Noise:
        return Noise.for_run(3, "train", CPU, rank=1, world_size=2, rng=rng)

    eager, recorded = noise(), noise()
    tape: list[Any] = []
    rec = RecordingNoise(recorded, tape)

    def calls(n: Noise) -> list[torch.Tensor]:
        return [
            n.rand((4, 3), CPU, torch.float32),
            n.randint(1, 5, (4,), CPU),
            n.pgd_init().rand((4, 2), CPU, torch.float32),
            n.pgd_init().rand_unbatched((1, 2), CPU, torch.float32),
            n.rand((4,), CPU, torch.float64),
        ]

    first = calls(eager)
    assert all(torch.equal(a, b) for a, b in zip(first, calls(rec), strict=True))
    assert [(d.which, d.kind) for d in tape] == [
        ("masks", "rand"),
        ("masks", "randint"),
        ("pgd", "rand"),
        ("pgd", "rand_unbatched"),
        ("masks", "rand"),
    ]
    # The next step: replaying the tape on the real streams gives what eager calls draw next -
    # the numbers themselves (generator), or keys from which a ReplayNoise computes them.
    second = calls(eager)
    replayed, keyed = draw_tape(recorded, tape, CPU)
    assert keyed == (rng == "counter")
    if not keyed:
        assert all(torch.equal(a, b) for a, b in zip(second, replayed, strict=True))
    # ... and a ReplayNoise hands them out in call order, checking shapes, eagerly and compiled.
    replay = ReplayNoise(replayed, keyed, rank=1, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(second, calls(replay), strict=True))
    compiled = torch.compile(lambda d: calls(ReplayNoise(d, keyed, 1, 2)), fullgraph=True)
    assert all(torch.equal(a, b) for a, b in zip(second, compiled(replayed), strict=True))
    with pytest.raises(AssertionError, match="replayed draw"):
        ReplayNoise(replayed).rand((9,), CPU, torch.float32)


def test_annealed_p_as_a_tensor_equals_the_float_schedule():
    for args in [(2.0, 0.3, 0.0, 1.0), (1.0, 0.5, 0.25, 0.75), (2.0, 0.5, 0.5, 0.5)]:
        for frac in [0.0, 0.1, 0.25, 0.4, 0.5, 0.75, 0.9, 1.0]:
            want = annealed_p(frac, *args)
            got = annealed_p(torch.tensor(frac, dtype=torch.float64), *args)
            assert float(got) == pytest.approx(float(want), abs=1e-12), (frac, args)
    assert annealed_p(torch.tensor(0.4), 2.0, None, 0.0, 1.0) == 2.0  # no annealing: a float


def test_when_a_step_compiles():
    short, long = tiny_config(), tiny_config(f"steps={COMPILE_MIN_STEPS}")
    assert not compiles_step(short) and compiles_step(long)
    assert not compiles_step(long, world_size=2)  # data-parallel steps stay eager
    assert compiles_step(tiny_config("compile=true")) and not compiles_step(
        load_config(TINY, [f"steps={COMPILE_MIN_STEPS}", "compile=false"])
    )


def test_a_step_that_cannot_compile_runs_eagerly_with_the_same_draws():
    """A compiler failure (here: a backend that refuses every graph) warns once and leaves the
    run eager, with the numbers of an eager run: the failed step's draws are used again."""

    def refuse(gm: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Any:
        raise RuntimeError("no compiler for this model")

    def step(batch: torch.Tensor, noise: Noise, frac: float | torch.Tensor) -> Any:
        masks = noise.rand(tuple(batch.shape), CPU, torch.float32)
        noise.pgd_init().rand_unbatched((3,), CPU, torch.float32)
        return (batch * masks).sum(), {"m": masks.mean()}

    batch = torch.ones(4, 2)
    compiled = CompiledStep(step, backend=refuse)
    eager, noise = Noise.for_run(1, "train", CPU), Noise.for_run(1, "train", CPU)
    with pytest.warns(RuntimeWarning, match="could not be compiled.*no compiler"):
        got = [compiled(batch, noise, k / 4)[0] for k in range(4)]
    want = [step(batch, eager, k / 4)[0] for k in range(4)]
    assert compiled.eager and all(torch.equal(a, b) for a, b in zip(got, want, strict=True))
    # ... and both streams are where an eager run left them.
    assert torch.equal(noise.rand((5,), CPU, torch.float32), eager.rand((5,), CPU, torch.float32))
    assert torch.equal(
        noise.pgd_init().rand((5,), CPU, torch.float32),
        eager.pgd_init().rand((5,), CPU, torch.float32),
    )
