"""The named random streams of a run, each derived from `config.seed` by a fixed hash.

A run draws its randomness from separate streams, so that no two ever produce the same numbers
(seeding two generators with the same seed would: on the CPU the mask noise would then equal the
data's uniforms draw for draw):

| stream | what it draws |
|---|---|
| `init` | component and CI-function initialisation (the global torch RNG, before building) |
| `train_data` | training batches (toy: the data generator; LM: the shuffle seed) |
| `train_masks` | training mask noise: stochastic masks, delta masks, routers, binomial CI noise |
| `train_pgd_init` | the random initial sources of PGD losses during training |
| `eval_data` | eval batches (the same ones at every eval) |
| `eval_masks` | eval mask noise (the same at every eval) |
| `eval_pgd_init` | the random initial PGD sources of evals |

`stream_seed(seed, name)` is the first 64-bit word of numpy's `SeedSequence(entropy=seed mod 2**64,
spawn_key=(STREAM_IDS[name],))`: a fixed, platform-independent hash of (seed, stream), so the
streams of one seed are unrelated to each other and to every stream of another seed. Each worker of
a data-parallel run builds the same generators and keeps its rows of every global draw (see
`spd_ray.core.masks.Noise` and `spd_ray.data.toy.ToyBatches`), so the numbers do not depend on the
number of workers. The ids are part of the format: changing one changes every run's numbers.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Stream = Literal[
    "init",
    "train_data",
    "train_masks",
    "train_pgd_init",
    "eval_data",
    "eval_masks",
    "eval_pgd_init",
]

STREAM_IDS: dict[str, int] = {
    "init": 1,
    "train_data": 2,
    "train_masks": 3,
    "train_pgd_init": 4,
    "eval_data": 5,
    "eval_masks": 6,
    "eval_pgd_init": 7,
}


def stream_seed(seed: int, stream: Stream) -> int:
    """The 64-bit seed of `stream` for a run seeded with `seed` (any int; negative seeds are taken
    mod 2**64)."""
    if stream not in STREAM_IDS:
        raise ValueError(f"unknown random stream {stream!r}; known: {sorted(STREAM_IDS)}")
    seq = np.random.SeedSequence(entropy=seed % 2**64, spawn_key=(STREAM_IDS[stream],))
    return int(seq.generate_state(1, dtype=np.uint64)[0])


def stream_generator(
    seed: int, stream: Stream, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A fresh generator on `device` at the start of `stream`."""
    return torch.Generator(device=device).manual_seed(stream_seed(seed, stream))
