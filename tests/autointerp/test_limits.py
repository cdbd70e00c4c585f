"""The shared rate limit and budget: the window and budget logic on a fake clock, the local
limiter in front of a real HTTP server, and one Ray test where two actors share a named limiter."""

from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import ray
from llm_server import Label, LLMServer
from ray_head import RayHead

from spd_ray.autointerp.client import BudgetExhausted, LLMClient, LLMSettings
from spd_ray.autointerp.limits import (
    LimiterCore,
    LocalLimiter,
    shared_limiter,
)

HERE = Path(__file__).resolve().parent  # Ray workers import this module from here
TESTS = HERE.parent  # ... and llm_server from here
MESSAGES = [{"role": "user", "content": "label this"}]


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


def _settings(server: LLMServer, **overrides: Any) -> LLMSettings:
    fields: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "test-model",
        "timeout_s": 5.0,
        "backoff_base_s": 0.01,
        "price_in_per_mtok": 1.0,  # with 1000 prompt tokens: $0.001 a request
    }
    return LLMSettings(**{**fields, **overrides})


def _instant(core: LimiterCore) -> tuple[bool, float]:
    """A request that is answered the moment it is granted."""
    result = core.try_acquire()
    if result[0]:
        core.release()
    return result


def test_rpm_window_on_a_fake_clock() -> None:
    clock = FakeClock()
    core = LimiterCore(rpm=5, budget_usd=None, clock=clock)
    for i in range(5):
        clock.now = 2.0 * i  # grants at 0, 2, 4, 6, 8
        assert _instant(core) == (True, 0.0)
    clock.now = 10.0
    assert core.try_acquire() == (False, pytest.approx(50.0))  # until the grant at 0 is 60 s old
    clock.now = 59.9
    assert core.try_acquire() == (False, pytest.approx(0.1))
    clock.now = 60.0  # the grant at 0 leaves the window exactly now
    assert _instant(core) == (True, 0.0)
    clock.now = 61.0
    assert core.try_acquire() == (False, pytest.approx(1.0))  # next oldest: the grant at 2
    stats = core.stats()
    assert stats["granted"] == 6 and stats["max_in_window"] == 5


def test_unlimited_rpm_still_reports_the_busiest_window() -> None:
    clock = FakeClock()
    core = LimiterCore(rpm=None, budget_usd=None, clock=clock)
    for t in [0, 1, 2, 30, 61, 62]:
        clock.now = float(t)
        assert _instant(core) == (True, 0.0)
    assert core.stats()["max_in_window"] == 4  # 0, 1, 2 and 30; by 61 the first two have left


def test_a_slot_is_held_until_its_response_and_60_s_after() -> None:
    """A provider counts arrivals, which come after the grant: the slot runs from the grant to
    60 s after the response, so no 60 s window of arrivals can hold more than rpm requests."""
    clock = FakeClock()
    core = LimiterCore(rpm=2, budget_usd=None, clock=clock)
    assert core.try_acquire() == (True, 0.0)  # t=0, still in flight
    clock.now = 1.0
    assert _instant(core) == (True, 0.0)  # t=1, answered at once
    clock.now = 2.0
    assert core.try_acquire() == (False, pytest.approx(59.0))  # the t=1 slot frees at 61
    clock.now = 30.0
    core.release()  # the t=0 request is answered at 30: its slot now lasts until 90
    clock.now = 61.0
    assert _instant(core) == (True, 0.0)
    clock.now = 62.0
    assert core.try_acquire() == (False, pytest.approx(28.0))
    assert core.stats()["max_in_flight"] == 2
    with pytest.raises(ValueError, match="without a matching grant"):
        core.release()


def test_budget_stops_grants_once_spent() -> None:
    core = LimiterCore(rpm=None, budget_usd=1.0)
    assert core.try_acquire()[0]
    core.spend(0.6, 100, 10)
    assert core.try_acquire()[0]
    core.spend(0.4, 50, 5)
    with pytest.raises(BudgetExhausted, match=r"budget of \$1.0000 spent"):
        core.try_acquire()
    stats = core.stats()
    assert stats["granted"] == 2 and stats["refused_budget"] == 1
    assert stats["spent_usd"] == pytest.approx(1.0)
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (150, 15)


def test_zero_budget_refuses_the_first_acquire() -> None:
    core = LimiterCore(rpm=10, budget_usd=0.0)
    with pytest.raises(BudgetExhausted):
        core.try_acquire()
    assert core.stats()["granted"] == 0


def test_bad_limits_fail_fast() -> None:
    with pytest.raises(ValueError, match="rpm"):
        LimiterCore(rpm=0.5, budget_usd=None)
    with pytest.raises(ValueError, match="budget_usd"):
        LimiterCore(rpm=None, budget_usd=-1.0)
    with pytest.raises(ValueError, match="usd=-0.1"):
        LimiterCore(rpm=None, budget_usd=None).spend(-0.1, 0, 0)


def test_local_limiter_waits_for_the_window() -> None:
    clock = FakeClock()
    limiter = LocalLimiter(rpm=5, budget_usd=None, clock=clock, sleep=clock.sleep)

    async def twelve() -> list[float]:
        times = []
        for _ in range(12):
            await limiter.acquire()
            await limiter.release()
            times.append(clock.now)
        return times

    times = asyncio.run(twelve())
    assert times == [0.0] * 5 + [60.0] * 5 + [120.0] * 2
    assert clock.sleeps == [60.0, 60.0]
    assert limiter.stats()["max_in_window"] == 5


def test_local_limiter_with_client_grants_and_accounts_every_request() -> None:
    async def ten(settings: LLMSettings, limiter: LocalLimiter) -> list[float]:
        client = LLMClient(settings, limiter)
        try:
            results = await asyncio.gather(
                *(client.complete_json(MESSAGES, Label) for _ in range(10))
            )
        finally:
            await client.aclose()
        return [usage.cost_usd for _, usage, _ in results]

    limiter = LocalLimiter(rpm=30, budget_usd=1.0)
    with LLMServer(prompt_tokens=1000, completion_tokens=20) as server:
        settings = _settings(server, price_out_per_mtok=2.0)
        costs = asyncio.run(ten(settings, limiter))
        assert server.chat_requests == 10
    stats = limiter.stats()
    assert stats["granted"] == 10 and stats["max_in_window"] == 10
    assert (stats["prompt_tokens"], stats["completion_tokens"]) == (10_000, 200)
    assert stats["spent_usd"] == pytest.approx(sum(costs)) == pytest.approx(10 * 0.00104)


def test_every_retry_goes_through_the_limiter() -> None:
    limiter = LocalLimiter(rpm=30, budget_usd=None)

    async def one(settings: LLMSettings) -> None:
        client = LLMClient(settings, limiter)
        try:
            await client.complete_json(MESSAGES, Label)
        finally:
            await client.aclose()

    with LLMServer(faults=["429:0", "500"], prompt_tokens=1000, completion_tokens=0) as server:
        asyncio.run(one(_settings(server)))
        assert server.chat_requests == 3
    stats = limiter.stats()
    assert stats["granted"] == 3 and stats["spent_usd"] == pytest.approx(0.001)


def test_budget_stops_the_client_before_sending() -> None:
    async def five(settings: LLMSettings, limiter: LocalLimiter) -> Counter[str]:
        client = LLMClient(settings, limiter)
        outcomes: Counter[str] = Counter()
        try:
            for _ in range(5):  # one at a time, so the budget binds exactly
                try:
                    await client.complete_json(MESSAGES, Label)
                    outcomes["ok"] += 1
                except BudgetExhausted as err:
                    assert err.usage.requests == 0
                    outcomes["budget"] += 1
        finally:
            await client.aclose()
        return outcomes

    with LLMServer(prompt_tokens=1000, completion_tokens=0) as server:
        # $0.001 a request: spent 0.001, 0.002 < 0.0025 still grant; 0.003 does not.
        outcomes = asyncio.run(five(_settings(server), LocalLimiter(None, 0.0025)))
        assert outcomes == {"ok": 3, "budget": 2} and server.chat_requests == 3
        outcomes = asyncio.run(five(_settings(server), LocalLimiter(None, 0.0)))
        assert outcomes == {"budget": 5} and server.chat_requests == 3  # nothing more was sent


@ray.remote(num_cpus=0)
class Labeller:
    """A pipeline-like actor: its own client, the pipeline's shared limiter looked up by name."""

    def __init__(self, settings: LLMSettings, name: str, rpm: float | None, budget: float | None):
        self.settings = settings
        self.limiter = shared_limiter(name, rpm, budget)

    def ready(self) -> bool:
        return True

    async def label(self, n: int, concurrent: bool, wait_s: float) -> dict[str, int]:
        """n requests (all at once, or one after another); after wait_s the unfinished ones are
        abandoned and counted as pending."""
        client = LLMClient(self.settings, self.limiter)
        outcomes: Counter[str] = Counter()

        async def one() -> None:
            try:
                await client.complete_json(MESSAGES, Label)
                outcomes["ok"] += 1
            except BudgetExhausted:
                outcomes["budget"] += 1

        async def serial() -> None:
            for _ in range(n):
                await one()

        tasks = [asyncio.create_task(one()) for _ in range(n)] if concurrent else []
        tasks = tasks or [asyncio.create_task(serial())]
        _, pending = await asyncio.wait(tasks, timeout=wait_s)
        for task in pending:
            task.cancel()
        outcomes["pending"] = len(pending) if concurrent else n - sum(outcomes.values())
        await client.aclose()
        return dict(outcomes)


def test_two_ray_actors_share_one_rate_limit_and_budget(ray_head: RayHead) -> None:
    # Workers import this module (and llm_server) by name to rebuild Labeller and Label.
    ray.init(
        address=ray_head.address,
        namespace="autointerp-limits-test",
        runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join([str(HERE), str(TESTS)])}},
        log_to_driver=False,
    )
    try:
        with LLMServer(prompt_tokens=1000, completion_tokens=0) as server:
            settings = _settings(server)

            # Rate limit: 8 a minute for 2 x 5 requests: exactly 8 go out, 2 wait their turn.
            rpm_limiter = shared_limiter("rpm-8", rpm=8, budget_usd=None)
            actors = [Labeller.remote(settings, "rpm-8", 8, None) for _ in range(2)]
            ray.get([a.ready.remote() for a in actors], timeout=120)
            results = ray.get([a.label.remote(5, True, 4.0) for a in actors], timeout=60)
            total = sum((Counter(r) for r in results), Counter())
            stats = rpm_limiter.stats()
            assert total == {"ok": 8, "pending": 2}
            assert stats["granted"] == 8 and stats["max_in_window"] == 8
            assert server.chat_requests == 8
            assert stats["spent_usd"] == pytest.approx(8 * 0.001)
            times = sorted(server.timestamps)
            assert max(sum(1 for u in times if t <= u < t + 60) for t in times) <= 8

            # Budget: $0.0025 at $0.001 a request allows 3, or 4 when both actors were granted
            # while 2 were in flight; every other request is refused without being sent.
            with pytest.raises(ValueError, match="already exists with rpm=8"):
                shared_limiter("rpm-8", rpm=9, budget_usd=None)
            budget_limiter = shared_limiter("budget", rpm=None, budget_usd=0.0025)
            sent_before = server.chat_requests
            actors = [Labeller.remote(settings, "budget", None, 0.0025) for _ in range(2)]
            results = ray.get([a.label.remote(4, False, 20.0) for a in actors], timeout=120)
            total = sum((Counter(r) for r in results), Counter())
            stats = budget_limiter.stats()
            granted = stats["granted"]
            assert 3 <= granted <= 4
            assert total == {"ok": granted, "budget": 8 - granted}
            assert stats["refused_budget"] == 8 - granted
            assert server.chat_requests - sent_before == granted
            assert stats["spent_usd"] == pytest.approx(granted * 0.001)
    finally:
        ray.shutdown()
