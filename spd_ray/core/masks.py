"""Stochastic masks and routers.

A mask for module m on a batch is `ci + (1 - ci) * s` with s ~ U[0, 1) (continuous) or a fair coin
(binomial). A router says, per position, which modules are replaced by their masked components; the
rest run the target weights. Routers return `{path: Bool[Tensor, "*batch"]}` for the routed modules;
a module missing from the dict is not replaced at all, `None` for a module means every position.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from jaxtyping import Bool, Float
from torch import Tensor

from spd_ray.config import MaskRng, Sampling
from spd_ray.core import counter_rng
from spd_ray.core.streams import Stream, stream_generator, stream_seed
from spd_ray.errors import InputError

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
        rng: MaskRng = "counter",
    ) -> Noise:
        """The mask and PGD-init streams of a run's training or eval (`spd_ray.core.streams`):
        counter-based (`CounterNoise`, the default) or `torch.Generator`s (`rng="generator"`)."""
        masks: Stream = "train_masks" if phase == "train" else "eval_masks"
        pgd: Stream = "train_pgd_init" if phase == "train" else "eval_pgd_init"
        if rng == "counter":
            pgd_noise = CounterNoise(stream_seed(seed, pgd), rank, world_size)
            return CounterNoise(stream_seed(seed, masks), rank, world_size, pgd=pgd_noise)
        if rng != "generator":
            raise ValueError(f"mask_rng must be 'counter' or 'generator', not {rng!r}")
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

    def first_index(self, shape: tuple[int, ...], batched: bool = True) -> int:
        """Flat index of this worker's first element in a global draw whose dim 0 is split across
        workers (`batched`), or 0 for a draw every worker shares."""
        return self.rank * math.prod(shape) if batched else 0

    # Counter-based streams compute draws from keys (`CounterNoise.prepare`); generators cannot.
    keyed = False

    def state_dict(self) -> dict[str, Any]:
        """The streams' positions (checkpoint keys `noise_rng`, `pgd_init_rng`)."""
        if self.generator is None or self.pgd_generator is None:
            raise ValueError("only a run's noise (Noise.for_run) has a state to save")
        return {
            "noise_rng": self.generator.get_state(),
            "pgd_init_rng": self.pgd_generator.get_state(),
        }

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        """Restore `state_dict`; a checkpoint of the other kind of stream is an `InputError` that
        says which `--set mask_rng=...` resumes it."""
        if "noise_counter" in saved:
            raise InputError(
                "checkpoint holds counter-based mask noise but the config says mask_rng: "
                "generator; resume with --set mask_rng=counter or start again with --fresh"
            )
        if "pgd_init_rng" not in saved:
            raise InputError(
                "checkpoint has no 'pgd_init_rng': it predates the separate random streams "
                "(spd_ray.core.streams); start the run again with --fresh"
            )
        if self.generator is None or self.pgd_generator is None:
            raise ValueError("only a run's noise (Noise.for_run) has a state to load")
        self.generator.set_state(saved["noise_rng"])
        self.pgd_generator.set_state(saved["pgd_init_rng"])

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

    def prepare(
        self,
        kind: Literal["rand", "randint", "rand_unbatched"],
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype | None = None,
        low: int = 0,
        high: int = 0,
    ) -> Tensor:
        """What a compiled step needs to make one draw inside its graph, taken from the stream
        now: here the numbers themselves (a generator cannot be traced)."""
        match kind:
            case "rand":
                assert dtype is not None
                return self.rand(shape, device, dtype)
            case "randint":
                return self.randint(low, high, shape, device)
            case "rand_unbatched":
                assert dtype is not None
                return self.rand_unbatched(shape, device, dtype)


class CounterNoise(Noise):
    """Noise from one counter-based stream (`spd_ray.core.counter_rng`): draw c is a hash of
    (stream seed, c, element index), so a worker computes just its own rows of the global draw
    (the numbers of a 1-worker run), a compiled step computes its draws inside the graph from each
    draw's key, and CPU and GPU give the same bits. The state is the number of draws taken."""

    def __init__(
        self,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pgd: CounterNoise | None = None,
        counter: int = 0,
    ):
        super().__init__(None, rank, world_size)
        self.seed, self.counter, self._pgd = seed, counter, pgd

    keyed = True

    def pgd_init(self) -> Noise:
        return self if self._pgd is None else self._pgd

    def state_dict(self) -> dict[str, Any]:
        """The draw counters of the mask and PGD-init streams (checkpoint key `noise_counter`)."""
        if self._pgd is None:
            raise ValueError("only a run's noise (Noise.for_run) has a state to save")
        return {"noise_counter": [self.counter, self._pgd.counter]}

    def load_state_dict(self, saved: dict[str, Any]) -> None:
        if "noise_counter" not in saved:
            raise InputError(
                "checkpoint holds torch.Generator mask noise but the config says mask_rng: "
                "counter; resume with --set mask_rng=generator (the stream it was made with) or "
                "start again with --fresh"
            )
        if self._pgd is None:
            raise ValueError("only a run's noise (Noise.for_run) has a state to load")
        self.counter, self._pgd.counter = (int(c) for c in saved["noise_counter"])

    def _key(self) -> tuple[int, int]:
        self.counter += 1
        return counter_rng.draw_key(self.seed, self.counter - 1)

    def _start(self, shape: tuple[int, ...], batched: bool) -> int:
        """Flat index of this worker's first element in the global draw (checked to fit)."""
        counter_rng.check_size(0, math.prod(shape) * (self.world_size if batched else 1))
        return self.first_index(shape, batched)

    def _uniform(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, batched: bool
    ) -> Tensor:
        start, key = self._start(shape, batched), self._key()
        if device.type == "cpu":
            bits = counter_rng.bits_np(key, start, math.prod(shape))
            return counter_rng.uniform_np(bits, dtype).reshape(shape)
        return counter_uniform(key_tensor(key, device), shape, start, device, dtype)

    def rand(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        return self._uniform(tuple(shape), device, dtype, batched=True)

    def rand_unbatched(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        return self._uniform(tuple(shape), device, dtype, batched=False)

    def randint(self, low: int, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        shape = tuple(shape)
        start, key = self._start(shape, True), self._key()
        if device.type == "cpu":
            bits = torch.from_numpy(counter_rng.bits_np(key, start, math.prod(shape)))
            return counter_rng.randint_from_bits(bits, low, high).reshape(shape)
        return counter_randint(key_tensor(key, device), shape, start, device, low, high)

    def prepare(
        self,
        kind: Literal["rand", "randint", "rand_unbatched"],
        shape: tuple[int, ...],
        device: torch.device,
        dtype: torch.dtype | None = None,
        low: int = 0,
        high: int = 0,
    ) -> Tensor:
        """The draw's key, [k0, k1] (int64): the graph hashes the elements itself."""
        self._start(tuple(shape), kind != "rand_unbatched")
        return key_tensor(self._key(), device)


def key_tensor(key: tuple[int, int], device: torch.device) -> Tensor:
    return torch.tensor(key, dtype=torch.int64).to(device, non_blocking=True)


def counter_uniform(
    key: Tensor,
    shape: tuple[int, ...],
    start: int,
    device: torch.device,
    dtype: torch.dtype,
) -> Tensor:
    """U[0, 1) of the draw with `key` (`key_tensor`), elements from flat index `start` (torch ops:
    traceable, any device; the same bits as `CounterNoise`'s numpy path)."""
    bits = counter_rng.bits_torch(key, start, math.prod(shape), device)
    return counter_rng.uniform_from_bits(bits, dtype).reshape(shape)


def counter_randint(
    key: Tensor,
    shape: tuple[int, ...],
    start: int,
    device: torch.device,
    low: int,
    high: int,
) -> Tensor:
    bits = counter_rng.bits_torch(key, start, math.prod(shape), device)
    return counter_rng.randint_from_bits(bits, low, high).reshape(shape)


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
