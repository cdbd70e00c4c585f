"""Stochastic masks and routers.

A mask for module m on a batch is `ci + (1 - ci) * s` with s ~ U[0, 1) (continuous) or a fair coin
(binomial). A router says, per position, which modules are replaced by their masked components; the
rest run the target weights. Routers return `{path: Bool[Tensor, "*batch"]}` for the routed modules;
a module missing from the dict is not replaced at all, `None` for a module means every position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spd_ray.config import Sampling
from spd_ray.core.streams import Stream, stream_generator

Routes = dict[str, Tensor | None]


@dataclass
class Noise:
    """Random draws that do not depend on how the batch is split across data-parallel workers.

    Every worker holds the same generator and draws noise for the *global* batch, then keeps its own
    rows (dim 0). A run on N workers therefore sees exactly the masks of a 1-worker run on the same
    global batch, while different rows (and so different workers) get different noise.
    """

    generator: torch.Generator | None = None
    rank: int = 0
    world_size: int = 1
    # PGD's random initial sources; None: drawn from `generator` (one stream for both, for tests
    # and ad-hoc use - runs build both with `Noise.for_run`).
    pgd_generator: torch.Generator | None = None

    @classmethod
    def for_run(
        cls,
        seed: int,
        phase: Literal["train", "eval"],
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
    ) -> Noise:
        """The mask and PGD-init streams of a run's training or eval (`spd_ray.core.streams`)."""
        masks: Stream = "train_masks" if phase == "train" else "eval_masks"
        pgd: Stream = "train_pgd_init" if phase == "train" else "eval_pgd_init"
        return cls(
            stream_generator(seed, masks, device),
            rank,
            world_size,
            pgd_generator=stream_generator(seed, pgd, device),
        )

    def pgd_init(self) -> Noise:
        """The draws of PGD's random initial sources, sharded like this noise."""
        if self.pgd_generator is None:
            return self
        return Noise(self.pgd_generator, self.rank, self.world_size)

    def _slice(self, t: Tensor) -> Tensor:
        if self.world_size == 1:
            return t
        n = t.shape[0] // self.world_size
        return t[self.rank * n : (self.rank + 1) * n].clone()  # own storage, not a view

    def _global(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        return shape if self.world_size == 1 else (shape[0] * self.world_size, *shape[1:])

    def rand(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        """U[0, 1) of `shape`, whose dim 0 is this worker's share of the batch."""
        g = torch.rand(self._global(shape), generator=self.generator, device=device, dtype=dtype)
        return self._slice(g)

    def randint(self, low: int, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        g = torch.randint(low, high, self._global(shape), generator=self.generator, device=device)
        return self._slice(g)

    def rand_unbatched(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        """U[0, 1) with no batch dim: identical on every worker."""
        return torch.rand(shape, generator=self.generator, device=device, dtype=dtype)


def stochastic_mask(
    ci: Float[Tensor, "*batch C"], sampling: Sampling, noise: Noise
) -> Float[Tensor, "*batch C"]:
    s = noise.rand(tuple(ci.shape), ci.device, ci.dtype)
    if sampling == "binomial":
        s = (s < 0.5).to(ci.dtype)
    return ci + (1 - ci) * s


def delta_mask(batch_shape: tuple[int, ...], like: Tensor, noise: Noise) -> Float[Tensor, "*batch"]:
    """The weight-delta term's mask: U[0, 1) per position (also under binomial sampling)."""
    return noise.rand(batch_shape, like.device, like.dtype)


def all_routes(paths: list[str]) -> Routes:
    return dict.fromkeys(paths)


def uniform_k_subset_routes(
    paths: list[str], batch_shape: tuple[int, ...], device: torch.device, noise: Noise
) -> dict[str, Bool[Tensor, "*batch"]]:
    """Per position draw k ~ U{1..n_modules}, then route a uniformly random k-subset of modules."""
    n = len(paths)
    k = noise.randint(1, n + 1, batch_shape, device)
    u = noise.rand((*batch_shape, n), device, torch.float32)
    rank = u.argsort(-1).argsort(-1)  # a uniform random permutation rank per module
    routed = rank < k.unsqueeze(-1)
    return {p: routed[..., i] for i, p in enumerate(paths)}


def static_probability_routes(
    paths: list[str],
    batch_shape: tuple[int, ...],
    p: float,
    device: torch.device,
    noise: Noise,
) -> dict[str, Bool[Tensor, "*batch"]]:
    """Each module routed independently with probability p per position."""
    draws = noise.rand((*batch_shape, len(paths)), device, torch.float32) < p
    return {path: draws[..., i] for i, path in enumerate(paths)}


def single_module_routes(path: str) -> Routes:
    return {path: None}
