"""One requests-per-minute window and one USD budget for every actor of a labelling pipeline.

Providers enforce their rate limits per key, not per process, and a budget only means something
if it is counted once: so the window and the spend live in a single place. `LimiterCore` is that
logic in plain Python (a clock can be injected, so it is tested without waiting); `LocalLimiter`
serves one process; `LimiterActor` is a named Ray actor that every actor of a pipeline reaches
through `shared_limiter(name, ...)`.

The budget is checked before each request and charged after its response, so concurrent requests
in flight when it runs out can overshoot it by at most their own cost. A worker that dies with
requests in flight (its node lost) never releases their grants: with `max_hold_s`, a grant held
longer than any live request can take is counted as released then, so the lost worker's slots
come back instead of shrinking the window for the rest of the run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import ray

from spd_ray.autointerp.errors import BudgetExhausted
from spd_ray.errors import InputError

WINDOW_S = 60.0


class LimiterCore:
    """At most `rpm` grants in any rolling 60 s window, and no grant once `budget_usd` is spent.
    None disables either limit. A grant unreleased after `max_hold_s` (None: never) is presumed
    lost with its worker and released."""

    def __init__(
        self,
        rpm: float | None,
        budget_usd: float | None,
        clock: Callable[[], float] = time.monotonic,
        max_hold_s: float | None = None,
    ):
        if rpm is not None and rpm < 1:
            raise InputError(f"rpm must be >= 1 (grants per 60 s window) or None, got {rpm}")
        if budget_usd is not None and budget_usd < 0:
            raise InputError(f"budget_usd must be >= 0 or None, got {budget_usd}")
        if max_hold_s is not None and max_hold_s <= 0:
            raise InputError(f"max_hold_s must be > 0 or None, got {max_hold_s}")
        self.rpm = rpm
        self.budget_usd = budget_usd
        self.max_hold_s = max_hold_s
        self._cap = math.floor(rpm) if rpm is not None else None
        self._clock = clock
        # Grant times of the last 60 s: the window itself, and kept without a limit too so that
        # stats can report the busiest window.
        self._recent: deque[float] = deque()
        self.granted = 0
        self.refused_budget = 0
        self.spent_usd = 0.0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.max_in_window = 0
        # Granted requests whose response has not come back (`release`): they hold their slot
        # until then, and for 60 s after. A slot counted from the grant would let a provider that
        # counts arrivals see more than rpm requests in a window when requests leave late.
        self.in_flight = 0
        self.max_in_flight = 0
        # Grant times of the requests in flight, oldest first (a release retires the oldest,
        # which only makes the ones left look younger: they expire later, never earlier).
        self._held: deque[float] = deque()
        self.presumed_lost = 0  # grants released by `max_hold_s`
        self._late = 0  # of those, the ones whose own release has not come (yet)

    def _expire(self, now: float) -> None:
        """Release the grants held past `max_hold_s`: their worker died with them. Their slots
        count from now, as if their responses had just come back."""
        if self.max_hold_s is None:
            return
        while self._held and now - self._held[0] >= self.max_hold_s:
            self._held.popleft()
            self.in_flight -= 1
            self.presumed_lost += 1
            self._late += 1
            self._recent.append(now)

    def budget_left(self) -> bool:
        return self.budget_usd is None or self.spent_usd < self.budget_usd

    def try_acquire(self) -> tuple[bool, float]:
        """(granted, seconds to wait before asking again). Raises BudgetExhausted once the spend
        has reached the budget, so a budget of 0 never lets a request out. A grant must be
        followed by `release()` when its response (or failure) comes back."""
        if not self.budget_left():
            self.refused_budget += 1
            raise BudgetExhausted(
                f"budget of ${self.budget_usd:.4f} spent (${self.spent_usd:.4f} after "
                f"{self.granted} requests)"
            )
        now = self._clock()
        self._expire(now)
        while self._recent and now - self._recent[0] >= WINDOW_S:
            self._recent.popleft()
        if self._cap is not None and len(self._recent) + self.in_flight >= self._cap:
            if self._recent:
                return False, self._recent[0] + WINDOW_S - now
            return False, 0.25  # every slot is held by a request still in flight
        self.granted += 1
        self.in_flight += 1
        self._held.append(now)
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        self.max_in_window = max(self.max_in_window, len(self._recent) + self.in_flight)
        return True, 0.0

    def release(self) -> None:
        """A granted request has finished: its slot stays taken for 60 s from now."""
        now = self._clock()
        self._expire(now)
        if self.in_flight > 0:
            self.in_flight -= 1
            self._held.popleft()
            self._recent.append(now)
        elif self._late > 0:  # a grant presumed lost was not: its slot was counted already
            self._late -= 1
        else:
            raise InputError("release() without a matching grant")

    def record(self) -> None:
        """A request sent without a grant (the endpoint check) that finished now."""
        self.granted += 1
        self._recent.append(self._clock())
        self.max_in_window = max(self.max_in_window, len(self._recent) + self.in_flight)

    def spend(self, usd: float, prompt_tokens: int, completion_tokens: int) -> None:
        if usd < 0 or prompt_tokens < 0 or completion_tokens < 0:
            raise InputError(
                f"spend must be non-negative, got usd={usd}, prompt_tokens={prompt_tokens}, "
                f"completion_tokens={completion_tokens}"
            )
        self.spent_usd += usd
        self.prompt_tokens += prompt_tokens
        self.completion_tokens += completion_tokens

    def stats(self) -> dict[str, Any]:
        return {
            "rpm": self.rpm,
            "budget_usd": self.budget_usd,
            "granted": self.granted,
            "refused_budget": self.refused_budget,
            "spent_usd": self.spent_usd,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "max_in_window": self.max_in_window,
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "presumed_lost": self.presumed_lost,
        }


class Limiter(Protocol):
    """What LLMClient asks before each HTTP attempt and tells after each response."""

    async def acquire(self) -> None: ...

    async def release(self) -> None: ...

    async def spend(self, usd: float, prompt_tokens: int, completion_tokens: int) -> None: ...


async def _acquire(core: LimiterCore, sleep: Callable[[float], Awaitable[Any]]) -> None:
    # Single-threaded event loop: nothing changes between try_acquire's check and its grant.
    while True:
        granted, wait_s = core.try_acquire()
        if granted:
            return
        await sleep(wait_s)


class LocalLimiter:
    """The limiter of one process (one event loop). `clock` and `sleep` are injectable so tests
    can run minutes of rate limiting in no time."""

    def __init__(
        self,
        rpm: float | None,
        budget_usd: float | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ):
        self.core = LimiterCore(rpm, budget_usd, clock)
        self._sleep = sleep

    async def acquire(self) -> None:
        await _acquire(self.core, self._sleep)

    async def release(self) -> None:
        self.core.release()

    async def spend(self, usd: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.core.spend(usd, prompt_tokens, completion_tokens)

    def stats(self) -> dict[str, Any]:
        return self.core.stats()


@ray.remote(num_cpus=0)
class LimiterActor:
    """A LimiterCore in an async actor: callers await `acquire` while it waits for room here.

    `acquire` returns None when granted and the reason when the budget is spent, rather than
    raising: an exception would reach the caller wrapped in a RayTaskError.
    """

    def __init__(
        self, rpm: float | None, budget_usd: float | None, max_hold_s: float | None = None
    ):
        self.core = LimiterCore(rpm, budget_usd, max_hold_s=max_hold_s)

    async def acquire(self) -> str | None:
        try:
            await _acquire(self.core, asyncio.sleep)
        except BudgetExhausted as err:
            return err.reason
        return None

    async def spend(self, usd: float, prompt_tokens: int, completion_tokens: int) -> None:
        self.core.spend(usd, prompt_tokens, completion_tokens)

    async def stats(self) -> dict[str, Any]:
        return self.core.stats()

    async def release(self) -> None:
        self.core.release()

    async def record(self) -> None:
        self.core.record()

    async def config(self) -> tuple[float | None, float | None]:
        return self.core.rpm, self.core.budget_usd


class RayLimiter:
    """The Limiter protocol over a LimiterActor handle; picklable, so it can be handed to actors
    or rebuilt in each of them with `shared_limiter(name, ...)`."""

    def __init__(self, actor: Any, name: str):
        self.actor = actor
        self.name = name

    async def acquire(self) -> None:
        reason = await self.actor.acquire.remote()
        if reason is not None:
            raise BudgetExhausted(f"limiter {self.name!r}: {reason}")

    async def spend(self, usd: float, prompt_tokens: int, completion_tokens: int) -> None:
        await self.actor.spend.remote(usd, prompt_tokens, completion_tokens)

    async def release(self) -> None:
        await self.actor.release.remote()

    def stats(self) -> dict[str, Any]:
        """Blocking: call from the driver or sync code, not from inside an event loop."""
        return ray.get(self.actor.stats.remote())  # type: ignore[no-any-return]


def shared_limiter(
    name: str,
    rpm: float | None,
    budget_usd: float | None,
    namespace: str | None = None,
    max_hold_s: float | None = None,
) -> RayLimiter:
    """Get or create the named limiter actor of this Ray job (non-detached: it dies with the
    process that created it, so let the driver call this first). A new one is pinned to the
    caller's node: on a multi-node cluster it then lives as long as the driver does, and a worker
    node that dies cannot take every actor's shared window and spend with it. Raises ValueError
    when an actor of that name already exists with other limits, which would silently ignore
    these ones. Blocking (it confirms the limits with ray.get): call it from sync code."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    LimiterCore(rpm, budget_usd, max_hold_s=max_hold_s)  # bad limits fail here, not in the actor
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = LimiterActor.options(  # type: ignore[attr-defined]
        name=name, namespace=namespace, get_if_exists=True, lifetime=None, scheduling_strategy=here
    ).remote(rpm, budget_usd, max_hold_s)
    existing = tuple(ray.get(actor.config.remote()))
    if existing != (rpm, budget_usd):
        raise InputError(
            f"limiter {name!r} already exists with rpm={existing[0]}, budget_usd={existing[1]}; "
            f"asked for rpm={rpm}, budget_usd={budget_usd}"
        )
    return RayLimiter(actor, name)
