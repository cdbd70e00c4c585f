"""The whole training step (clean forward, CI functions, every loss term and, through AOTAutograd,
their backward) as one `torch.compile`d graph.

The run's masks must stay the eager step's masks draw for draw (same numbers at a fixed seed,
however the step is run), and Dynamo cannot put draws from a `torch.Generator` into a graph. So:

1. The first call runs the step eagerly through a `RecordingNoise`, which draws from the real
   streams and writes down each draw's kind and shape (the step's *tape*: it depends only on the
   config and the batch shape, which are fixed for a run).
2. Every later call first replays the tape against the real streams (`draw_tape`: the same calls
   in the same order), then runs the compiled step with a `ReplayNoise` that hands them out in
   order. With counter-based noise (`mask_rng: counter`, the default: `CounterNoise`) what is
   replayed is each draw's key, two words, and the graph computes the numbers from it - hashing
   fused with the mask arithmetic, the same bits as the eager draw. With generator noise the
   numbers themselves are drawn eagerly and passed in.

Scalars that change every step (the training fraction that anneals the importance-minimality p)
enter the graph as 0-d tensors, so nothing recompiles after the first compiled step. A change of
batch shape (another tape) records again and compiles once more. A PGD loss's inner
`autograd.grad` is traced into the graph too (Dynamo's `trace_autograd_ops`, on for these
compiles only), so a step with PGD is one graph as well; where that fails (a torch without the
option) the step is compiled in pieces, and a step the compiler fails on runs eagerly
(`CompiledStep`).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor

from spd_ray.core.masks import Noise, counter_randint, counter_uniform

Which = Literal["masks", "pgd"]


@dataclass(frozen=True)
class Draw:
    """One call of a `Noise` method: enough to repeat it on the real stream."""

    which: Which  # the mask stream or the PGD-init stream
    kind: Literal["rand", "randint", "rand_unbatched"]
    shape: tuple[int, ...]
    dtype: torch.dtype | None = None
    low: int = 0
    high: int = 0


class RecordingNoise(Noise):
    """Draws from `base`'s streams like `base` does, and writes every call down in `tape`."""

    def __init__(self, base: Noise, tape: list[Draw], which: Which = "masks"):
        super().__init__(base.generator, base.rank, base.world_size, base.pgd_generator)
        self._base, self.tape, self.which = base, tape, which

    def pgd_init(self) -> Noise:
        pgd = self._base.pgd_init()
        if self.which == "pgd" or pgd is self._base:
            return self  # no separate stream: PGD draws from this one
        return RecordingNoise(pgd, self.tape, "pgd")

    def rand(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        self.tape.append(Draw(self.which, "rand", tuple(shape), dtype))
        return self._base.rand(shape, device, dtype)

    def randint(self, low: int, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        self.tape.append(Draw(self.which, "randint", tuple(shape), low=low, high=high))
        return self._base.randint(low, high, shape, device)

    def rand_unbatched(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        self.tape.append(Draw(self.which, "rand_unbatched", tuple(shape), dtype))
        return self._base.rand_unbatched(shape, device, dtype)


def draw_tape(noise: Noise, tape: list[Draw], device: torch.device) -> tuple[list[Tensor], bool]:
    """The tape's draws from the real streams of `noise`, in order (`Noise.prepare`): the numbers
    an eager step would have drawn, or for counter-based noise each draw's key, from which the graph
    computes the same numbers; and whether they are keys."""
    streams = {"masks": noise, "pgd": noise.pgd_init()}
    assert noise.keyed == streams["pgd"].keyed, "counter-based and generator streams mixed"
    out = [streams[d.which].prepare(d.kind, d.shape, device, d.dtype, d.low, d.high) for d in tape]
    return out, noise.keyed


class ReplayNoise(Noise):
    """Hands out pre-drawn tensors in the order they were recorded (inside the compiled step), or,
    `keyed`, computes each draw there from its key (counter-based noise of a worker at `rank` of
    `world_size`: the numbers `CounterNoise` draws eagerly)."""

    def __init__(
        self, draws: list[Tensor], keyed: bool = False, rank: int = 0, world_size: int = 1
    ):
        super().__init__(None, rank, world_size)
        self._draws = draws
        self._next = 0
        self._keyed = keyed

    def pgd_init(self) -> Noise:
        return self  # one tape for both streams, in call order

    def _take(self, shape: tuple[int, ...]) -> Tensor:
        t = self._draws[self._next]
        self._next += 1
        want = (2,) if self._keyed else tuple(shape)
        assert tuple(t.shape) == want, f"replayed draw {tuple(t.shape)} != {want}"
        return t

    def rand(self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> Tensor:
        if not self._keyed:
            return self._take(shape)
        shape = tuple(shape)
        return counter_uniform(self._take(shape), shape, self.first_index(shape), device, dtype)

    def randint(self, low: int, high: int, shape: tuple[int, ...], device: torch.device) -> Tensor:
        if not self._keyed:
            return self._take(shape)
        shape = tuple(shape)
        start = self.first_index(shape)
        return counter_randint(self._take(shape), shape, start, device, low, high)

    def rand_unbatched(
        self, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
    ) -> Tensor:
        if not self._keyed:
            return self._take(shape)
        return counter_uniform(self._take(shape), tuple(shape), 0, device, dtype)


class EagerReplayNoise(ReplayNoise):
    """`ReplayNoise` for a step that breaks into several graphs (PGD's inner `autograd.grad`):
    each draw is handed out outside the graphs. Traced, the draw counter would be a constant of
    every graph that draws, and a function drawing twice per step would recompile per call."""

    @torch._dynamo.disable  # type: ignore[misc]
    def _take(self, shape: tuple[int, ...]) -> Tensor:
        return super()._take(shape)


# A metric a step function may return: a 0-d bool, False when an assumption that its compiled graph
# made about the batch does not hold (a fixed number of nonzero rows, `ci_on_nonzero_rows`), so
# that its values are wrong; `CompiledStep` then runs the step again eagerly with the same draws.
STEP_VALID = "_step_valid"

# (batch, noise, step_frac) -> (total loss, metrics): the step's losses, with step_frac a float
# eagerly and a 0-d tensor inside the compiled graph (`LossFn`), a float from the loop (`StepFn`)
LossFn = Callable[[Tensor, Noise, "float | Tensor"], tuple[Tensor, dict[str, Tensor]]]
StepFn = Callable[[Tensor, Noise, float], tuple[Tensor, dict[str, Tensor]]]


def _tracing_autograd() -> contextlib.AbstractContextManager[Any]:
    """Dynamo traces `torch.autograd.grad` (PGD's ascent) into the graph, where this torch can;
    read when a graph is traced, so it is set around every call of a compiled step (a cheap
    context) rather than for the whole process."""
    if hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return torch._dynamo.config.patch(trace_autograd_ops=True)  # type: ignore[no-any-return]
    return contextlib.nullcontext()


class CompiledStep:
    """`step_fn` with its random draws taken out of the graph (see the module docstring).

    The step is compiled as one graph (`fullgraph`) where it can be; a step that cannot (PGD's
    inner gradient on a torch that cannot trace it) is compiled in pieces, its draws handed out
    between them (`EagerReplayNoise`).
    `fullgraph` says which it was, after the first compiled call; `eager`, that compiling failed
    and the step runs eagerly (same draws, same numbers)."""

    def __init__(self, step_fn: LossFn, backend: str | Callable[..., Any] = "inductor"):
        self._fn = step_fn
        self._whole = torch.compile(self._replayed, fullgraph=True, dynamic=False, backend=backend)
        self._pieces = torch.compile(self._replayed_in_pieces, dynamic=False, backend=backend)
        self.fullgraph: bool | None = None
        self.eager = False  # set when compiling failed
        self._frac: Tensor | None = None
        self._tapes: dict[tuple[int, ...], list[Draw]] = {}
        self._checks_valid: bool | None = None  # whether the step returns STEP_VALID
        self.reruns = 0  # compiled steps run again eagerly (STEP_VALID False)
        # (keyed, rank, world_size): whether the draws are counter-based keys, and the worker
        self._keyed: tuple[bool, int, int] = (False, 0, 1)

    def _run(
        self, noise: ReplayNoise, batch: Tensor, step_frac: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        total, metrics = self._fn(batch, noise, step_frac)
        assert noise._next == len(noise._draws), "the step drew fewer numbers than its tape"
        return total, metrics

    def _replayed(
        self, batch: Tensor, draws: list[Tensor], step_frac: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self._run(ReplayNoise(draws, *self._keyed), batch, step_frac)

    def _replayed_in_pieces(
        self, batch: Tensor, draws: list[Tensor], step_frac: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self._run(EagerReplayNoise(draws, *self._keyed), batch, step_frac)

    def __call__(
        self, batch: Tensor, noise: Noise, step_frac: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        key = tuple(batch.shape)
        tape = self._tapes.get(key)
        if tape is None:
            # First step at this batch shape: eager, writing the tape down.
            tape = []
            result = self._fn(batch, RecordingNoise(noise, tape), step_frac)
            self._tapes[key] = tape
            return result
        if self.eager:
            return self._fn(batch, noise, step_frac)
        draws, keyed = draw_tape(noise, tape, batch.device)
        self._keyed = (keyed, noise.rank, noise.world_size)  # constants of the graph
        # One device scalar, refilled: a fill is a kernel launch, not a host-to-device copy.
        if self._frac is None or self._frac.device != batch.device:
            self._frac = torch.zeros((), dtype=torch.float64, device=batch.device)
        frac = self._frac.fill_(step_frac)
        # A step that may find itself invalid is run again on the same draws, which it may
        # change in place (PGD's): a copy first.
        kept = [d.clone() for d in draws] if self._checks_valid is not False else draws
        with _tracing_autograd():
            if self.fullgraph is None:
                result = self._first_compiled(batch, draws, frac, step_frac)
            elif self.fullgraph:
                result = self._whole(batch, draws, frac)
            else:
                result = self._pieces(batch, draws, frac)
        total, metrics = result
        valid = metrics.pop(STEP_VALID, None)
        self._checks_valid = valid is not None
        if valid is None or bool(valid):
            return total, metrics
        self.reruns += 1
        return self._fn(batch, ReplayNoise(kept, *self._keyed), step_frac)

    def _first_compiled(
        self, batch: Tensor, draws: list[Tensor], frac: Tensor, step_frac: float
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One graph if it traces, else pieces; a model that cannot be compiled at all runs
        eagerly from here on (with a warning) rather than failing a run that ran before."""
        kept = [d.clone() for d in draws]  # a step may change its draws in place (PGD's)
        try:
            try:
                result = self._whole(batch, draws, frac)
                self.fullgraph = True
            except torch._dynamo.exc.Unsupported:  # not one graph; nothing ran
                result = self._pieces(batch, draws, frac)
                self.fullgraph = False
            return result
        except Exception as e:  # noqa: BLE001 - any compiler failure; a real error recurs below
            why = " ".join(str(e).split())[:300]
            warnings.warn(
                f"the training step could not be compiled ({type(e).__name__}: {why}); it runs "
                "eagerly (set compile: false to skip trying)",
                RuntimeWarning,
                stacklevel=2,
            )
            self.eager = True
        # The same draws, eagerly: the numbers of an eager run. An error of the step itself
        # (not of the compiler) is raised here again.
        return self._fn(batch, ReplayNoise(kept, *self._keyed), step_frac)
