"""The named random streams of a run: a fixed derivation from the seed, none repeating another."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch

import spd_ray.train.worker as run_module
from spd_ray.config import load_config
from spd_ray.core.masks import CounterNoise, Noise
from spd_ray.core.streams import STREAM_IDS, Stream, stream_generator, stream_seed
from spd_ray.data.toy import ToyBatches, make_toy_dataset
from spd_ray.targets.loading import build_toy
from spd_ray.train.loop import make_state

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_resid_mlp.yaml"
STREAMS: tuple[Stream, ...] = get_args(Stream)
SEEDS = (0, 1, 2, 7, 12345, -1)


def _clone(g: torch.Generator) -> torch.Generator:
    out = torch.Generator(device=g.device)
    out.set_state(g.get_state())
    return out


def test_every_stream_has_an_id_and_the_derivation_is_fixed():
    assert set(STREAMS) == set(STREAM_IDS) and len(set(STREAM_IDS.values())) == len(STREAM_IDS)
    # Pinned: a change here changes every run's numbers, so it must be deliberate.
    assert stream_seed(0, "train_data") == 16452687389592421897
    by_hand = np.random.SeedSequence(entropy=7, spawn_key=(STREAM_IDS["eval_masks"],))
    assert stream_seed(7, "eval_masks") == int(by_hand.generate_state(1, dtype=np.uint64)[0])
    assert stream_seed(-1, "init") == stream_seed(2**64 - 1, "init")
    with pytest.raises(ValueError, match="unknown random stream"):
        stream_seed(0, "masks")  # type: ignore[arg-type]


def test_draws_of_the_named_streams_never_coincide():
    """For several seeds, the first 1024 float64 uniforms of every (seed, stream) pair differ
    everywhere; before the streams existed, data and masks of a seed were equal draw for draw."""
    draws = {
        (seed, name): torch.rand(1024, dtype=torch.float64, generator=stream_generator(seed, name))
        for seed in SEEDS
        for name in STREAMS
    }
    assert len({stream_seed(s, n) for s, n in draws}) == len(draws)
    for (a, x), (b, y) in itertools.combinations(draws.items(), 2):
        assert not torch.isin(x, y).any(), f"streams {a} and {b} share a draw"


@pytest.mark.parametrize("rng", ["counter", "generator"])
def test_noise_for_run_shards_both_streams_like_one_worker(rng: Any):
    one = Noise.for_run(3, "train", "cpu", rng=rng)
    two = [Noise.for_run(3, "train", "cpu", rank=r, world_size=2, rng=rng) for r in range(2)]
    cpu = torch.device("cpu")
    for _ in range(2):
        want = one.rand((4, 5), cpu, torch.float32)
        assert torch.equal(torch.cat([n.rand((2, 5), cpu, torch.float32) for n in two]), want)
        want = one.pgd_init().rand((4, 3), cpu, torch.float32)
        got = torch.cat([n.pgd_init().rand((2, 3), cpu, torch.float32) for n in two])
        assert torch.equal(got, want)
    if rng == "counter":
        return  # its streams: tests/core/test_counter_rng.py
    train = Noise.for_run(3, "train", "cpu", rng=rng)
    evals = Noise.for_run(3, "eval", "cpu", rng=rng)
    firsts = [
        torch.rand(256, generator=g)
        for g in (train.generator, train.pgd_generator, evals.generator, evals.pgd_generator)
    ]
    for x, y in itertools.combinations(firsts, 2):
        assert not torch.isin(x, y).any()
    # Without a PGD generator (tests, ad-hoc use) PGD draws continue the mask stream.
    plain = Noise(torch.Generator().manual_seed(0))
    assert plain.pgd_init() is plain


def test_a_run_draws_each_stream_from_its_own_generator(monkeypatch: pytest.MonkeyPatch):
    config = load_config(TINY, ["seed=5"])
    assert config.target_model is not None
    target = build_toy(config.target_model).requires_grad_(False)  # type: ignore[arg-type]
    worker = run_module.build_worker(config, target)
    state = make_state(config, worker.ctx)
    seen: dict[str, Any] = {}

    def capture(config, model, batches, noise, step, slow, **kwargs):  # type: ignore[no-untyped-def]
        seen["noise"], seen["batch"] = noise, next(iter(batches))
        return {}, {}

    monkeypatch.setattr(run_module, "evaluate", capture)
    worker.ctx.evaluate(worker.model, 0, False)
    assert worker.ctx.train_batches.generator.initial_seed() == stream_seed(5, "train_data")
    noises = {
        "train_masks": state.noise,
        "train_pgd_init": state.noise.pgd_init(),
        "eval_masks": seen["noise"],
        "eval_pgd_init": seen["noise"].pgd_init(),
    }
    for name, n in noises.items():  # counter-based streams (mask_rng: counter, the default)
        assert isinstance(n, CounterNoise) and n.seed == stream_seed(5, name), name  # type: ignore[arg-type]
    dataset = make_toy_dataset(config.task_config, target)  # type: ignore[arg-type]
    eval_bs = config.effective_eval_batch_size
    first_eval = next(ToyBatches(dataset, eval_bs, stream_seed(5, "eval_data")))
    assert torch.equal(seen["batch"], first_eval)
    # The bug the streams fix: at step 0 the ResidMLP data's uniforms u[b, c] were the mask noise.
    shape = (config.batch_size, dataset.n_features)
    u = torch.rand(shape, generator=_clone(worker.ctx.train_batches.generator))
    noise = CounterNoise(stream_seed(5, "train_masks")).rand(shape, torch.device("cpu"), u.dtype)
    assert not torch.isin(u, noise).any()
