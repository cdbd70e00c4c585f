"""LLMClient against a real local OpenAI-compatible HTTP server: structured answers, usage and
cost, retries per fault kind, re-asks, fail-fast errors and bounded concurrency, all with exact
request counts."""

from __future__ import annotations

import asyncio
import pickle
import socket
import time
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any, Literal

import pytest
from llm_server import Label, LLMServer, stub_from_schema
from pydantic import BaseModel, Field

from spd_ray.autointerp.client import (
    FatalLLMError,
    LLMClient,
    LLMError,
    LLMSettings,
    Usage,
    backoff_s,
    retry_after_s,
    strip_fences,
)

MESSAGES = [
    {"role": "system", "content": "You label components."},
    {"role": "user", "content": "x"},
]


def _settings(server: LLMServer, **overrides: Any) -> LLMSettings:
    # Fast retries and a short timeout keep every fault test well under a second.
    fields: dict[str, Any] = {
        "base_url": server.base_url,
        "model": "test-model",
        "timeout_s": 0.5,
        "backoff_base_s": 0.01,
        "backoff_max_s": 5.0,
    }
    return LLMSettings(**{**fields, **overrides})


async def _ask(settings: LLMSettings) -> tuple[Label, Usage, str]:
    client = LLMClient(settings)
    try:
        return await client.complete_json(MESSAGES, Label)
    finally:
        await client.aclose()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_happy_path_parses_label_and_prices_tokens_exactly() -> None:
    answer = '{"label": "fires on commas", "confidence": 0.8}'
    with LLMServer(
        answer=lambda _: answer, prompt_tokens=1234, completion_tokens=56, api_key="sk-test"
    ) as server:
        settings = _settings(
            server, api_key="sk-test", price_in_per_mtok=3.0, price_out_per_mtok=15.0
        )
        label, usage, raw = asyncio.run(_ask(settings))
        body = server.bodies[0]
    assert label == Label(label="fires on commas", confidence=0.8)
    assert raw == answer
    assert (usage.prompt_tokens, usage.completion_tokens, usage.requests) == (1234, 56, 1)
    assert usage.cost_usd == pytest.approx((1234 * 3.0 + 56 * 15.0) / 1e6, rel=1e-12)
    assert server.requests == 1
    # What went over the wire: strict JSON schema named after the model class.
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "Label"
    assert fmt["json_schema"]["strict"] is True
    assert fmt["json_schema"]["schema"] == Label.model_json_schema()
    assert body["model"] == "test-model" and body["max_tokens"] == 1500
    assert body["messages"] == MESSAGES


def test_fenced_json_is_accepted() -> None:
    fenced = '```json\n{"label": "fenced", "confidence": 1.0}\n```'
    with LLMServer(answer=lambda _: fenced) as server:
        label, usage, raw = asyncio.run(_ask(_settings(server)))
    assert label.label == "fenced" and raw == fenced and usage.requests == 1
    assert strip_fences("```\n{}\n```") == "{}" and strip_fences(' {"a": 1} ') == '{"a": 1}'


@pytest.mark.parametrize(
    "faults",
    [
        ["500"],
        ["429:0"],
        ["timeout"],
        ["malformed"],
        ["garbage"],
        ["truncated"],
        ["drop"],
        ["drop", "500", "truncated", "timeout", "garbage", "429:0"],
    ],
    ids=lambda f: "+".join(f),
)
def test_each_fault_then_success_yields_the_label(faults: list[str]) -> None:
    with LLMServer(faults=faults, timeout_sleep_s=1.5, completion_tokens=7) as server:
        label, usage, _ = asyncio.run(_ask(_settings(server)))
        counts = dict(server.fault_counts)
        chat, answered = server.chat_requests, server.answered
    assert label.label == "stub"
    assert chat == 1 + len(faults) and answered == 1
    assert usage.requests == 1 + len(faults)
    kinds = [f.split(":")[0] for f in faults]
    assert counts == {k: kinds.count(k) for k in set(kinds)}
    # Only 200s with a body carry usage: the good answer, plus the malformed one if any.
    assert usage.completion_tokens == 7 * (1 + kinds.count("malformed"))


def test_retry_after_is_honoured() -> None:
    with LLMServer(faults=["429:1"]) as server:
        start = time.monotonic()
        label, usage, _ = asyncio.run(_ask(_settings(server, backoff_base_s=0.0)))
        elapsed = time.monotonic() - start
        gap = server.timestamps[1] - server.timestamps[0]
    assert label.label == "stub" and usage.requests == 2 and server.requests == 2
    assert gap >= 1.0 and 1.0 <= elapsed < 3.0


def test_backoff_rules() -> None:
    settings = LLMSettings(base_url="http://x/v1", model="m", backoff_base_s=0.5, backoff_max_s=4)
    assert retry_after_s({"retry-after": "2"}) == 2.0
    assert retry_after_s({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert retry_after_s({}) is None and retry_after_s({"retry-after": "soon"}) is None
    future = format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    assert 28.0 <= retry_after_s({"retry-after": future}) <= 30.0  # type: ignore[operator]
    assert backoff_s(settings, 0, 10.0) == 4.0  # Retry-After capped at backoff_max_s
    assert backoff_s(settings, 0, 1.5) == 1.5  # exactly, no jitter
    for attempt, base in [(0, 0.5), (1, 1.0), (2, 2.0), (3, 4.0), (6, 4.0)]:
        waits = [backoff_s(settings, attempt, None) for _ in range(200)]
        assert all(0.5 * base <= w <= 1.5 * base for w in waits)
        assert max(waits) - min(waits) > 0.1 * base  # jittered, not constant


def test_malformed_twice_then_valid_succeeds_with_reasks() -> None:
    with LLMServer(faults=["malformed", "malformed"]) as server:
        label, usage, _ = asyncio.run(_ask(_settings(server)))
        bodies = server.bodies
    assert label.label == "stub" and usage.requests == 3 and len(bodies) == 3
    # Each re-ask carries the bad answer and what was wrong with it.
    reask = bodies[2]["messages"]
    assert len(reask) == len(MESSAGES) + 4
    assert reask[2]["role"] == "assistant" and reask[2]["content"].startswith("Sure!")
    assert reask[3]["role"] == "user" and "only the JSON" in reask[3]["content"]


def test_malformed_beyond_max_reasks_raises() -> None:
    with LLMServer(faults=["malformed"] * 5) as server:
        with pytest.raises(LLMError, match="malformed") as info:
            asyncio.run(_ask(_settings(server, max_reasks=1)))
        assert server.chat_requests == 2
    assert not isinstance(info.value, FatalLLMError)
    assert "after 1 re-asks" in info.value.reason and info.value.usage.requests == 2


def test_schema_violation_is_reasked() -> None:
    answers = iter(['{"label": "x", "confidence": 7}', '{"label": "x", "confidence": 0.7}'])
    with LLMServer(answer=lambda _: next(answers)) as server:
        label, usage, _ = asyncio.run(_ask(_settings(server)))
        bodies = server.bodies
    assert label.confidence == 0.7 and usage.requests == 2
    assert "confidence" in bodies[1]["messages"][-1]["content"]


def test_persistent_500_gives_up_after_max_retries_plus_one() -> None:
    with LLMServer(faults=["500"] * 20) as server:
        with pytest.raises(LLMError, match="gave up after 4 requests: 500") as info:
            asyncio.run(_ask(_settings(server, max_retries=3)))
        assert server.chat_requests == 4
    assert not isinstance(info.value, FatalLLMError) and info.value.usage.requests == 4


@pytest.mark.parametrize(
    ("status", "outcome"),
    [
        (400, "error"),
        (422, "error"),
        (402, "fatal"),
        (408, "retry"),
        (409, "retry"),
        (503, "retry"),
    ],
)
def test_status_policy(status: int, outcome: str) -> None:
    with LLMServer(faults=[f"http:{status}"]) as server:
        if outcome == "retry":
            label, usage, _ = asyncio.run(_ask(_settings(server)))
            assert label.label == "stub" and usage.requests == 2
        else:
            kind = FatalLLMError if outcome == "fatal" else LLMError
            with pytest.raises(kind, match=str(status)) as info:
                asyncio.run(_ask(_settings(server)))
            assert (type(info.value) is FatalLLMError) == (outcome == "fatal")
        assert server.chat_requests == (2 if outcome == "retry" else 1)


def test_unreachable_base_url_is_fatal_fast() -> None:
    port = _closed_port()
    settings = LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", model="m", timeout_s=30)
    start = time.monotonic()
    with pytest.raises(FatalLLMError, match=f"cannot reach http://127.0.0.1:{port}/v1") as info:
        asyncio.run(_ask(settings))
    assert time.monotonic() - start < 2.0
    assert "refused" in info.value.reason.lower() and info.value.usage.requests == 1


def test_refused_after_a_success_is_retried_not_fatal() -> None:
    async def run(server: LLMServer) -> None:
        client = LLMClient(_settings(server, max_retries=2))
        try:
            await client.complete_json(MESSAGES, Label)
            server.stop()  # the server goes away after the client has reached it
            with pytest.raises(LLMError, match="gave up after 3 requests") as info:
                await client.complete_json(MESSAGES, Label)
            assert not isinstance(info.value, FatalLLMError)
            assert info.value.usage.requests == 3
        finally:
            await client.aclose()

    with LLMServer() as server:
        asyncio.run(run(server))


def test_wrong_key_is_fatal_after_one_request() -> None:
    with LLMServer(api_key="right") as server:
        with pytest.raises(FatalLLMError, match="401") as info:
            asyncio.run(_ask(_settings(server, api_key="wrong")))
        assert server.requests == 1 and server.fault_counts["401"] == 1
    assert "API key" in info.value.reason


@pytest.mark.parametrize("status", [404, 400])
def test_unknown_model_is_fatal_after_one_request(status: int) -> None:
    with LLMServer(models=["served-model"], unknown_model_status=status) as server:
        with pytest.raises(FatalLLMError, match="'no-such-model'") as info:
            asyncio.run(_ask(_settings(server, model="no-such-model")))
        assert server.requests == 1
    assert str(status) in info.value.reason
    if status == 404:
        assert info.value.reason.startswith(f"model 'no-such-model' not found at {server.base_url}")


def test_wrong_path_is_fatal_and_points_at_base_url() -> None:
    with LLMServer() as server:
        settings = _settings(server, base_url=server.base_url.removesuffix("/v1"))
        with pytest.raises(FatalLLMError, match="404 not found .* check base_url"):
            asyncio.run(_ask(settings))
        assert server.requests == 1


def test_check_surfaces_the_same_fatal_errors() -> None:
    async def check(settings: LLMSettings) -> None:
        client = LLMClient(settings)
        try:
            await client.check()
        finally:
            await client.aclose()

    port = _closed_port()
    with pytest.raises(FatalLLMError, match="cannot reach"):
        asyncio.run(check(LLMSettings(base_url=f"http://127.0.0.1:{port}/v1", model="m")))
    with LLMServer(api_key="right", models=["served-model"]) as server:
        ok = _settings(server, api_key="right", model="served-model")
        asyncio.run(check(ok))
        assert server.answered == 1 and server.bodies[0]["max_tokens"] <= 16
        assert "response_format" not in server.bodies[0]
        with pytest.raises(FatalLLMError, match="401"):
            asyncio.run(check(ok.model_copy(update={"api_key": "wrong"})))
        with pytest.raises(FatalLLMError, match="model 'gpt-nope' not found"):
            asyncio.run(check(ok.model_copy(update={"model": "gpt-nope"})))
        assert server.requests == 3


def test_concurrency_is_bounded_by_the_callers_semaphore() -> None:
    async def many(settings: LLMSettings) -> list[Label]:
        client = LLMClient(settings)
        gate = asyncio.Semaphore(4)

        async def one() -> Label:
            async with gate:
                label, _, _ = await client.complete_json(MESSAGES, Label)
                return label

        try:
            return await asyncio.gather(*(one() for _ in range(20)))
        finally:
            await client.aclose()

    with LLMServer(latency_s=0.1) as server:
        labels = asyncio.run(many(_settings(server)))
        assert server.requests == 20 and server.answered == 20
        assert 2 <= server.max_in_flight <= 4
    assert len(labels) == 20


def test_errors_pickle_with_their_usage() -> None:
    err = FatalLLMError("bad key", Usage(1, 2, 0.5, 3))
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is FatalLLMError and back.reason == "bad key"
    assert back.usage == Usage(1, 2, 0.5, 3)
    assert Usage(1, 2, 0.5, 1) + Usage(3, 4, 0.25, 2) == Usage(4, 6, 0.75, 3)


class _Example(BaseModel):
    text: str = Field(min_length=6)
    weight: float = Field(gt=-3.0, lt=-1.0)


class _Rich(BaseModel):
    kind: Literal["token", "position"]
    count: int = Field(ge=3)
    small: int = Field(lt=0)
    examples: list[_Example] = Field(min_length=2)
    note: str | None
    flag: bool


def test_default_answer_fits_nested_schemas() -> None:
    """The server's default answer satisfies whatever schema a pipeline test asks for."""
    rich = _Rich.model_validate(stub_from_schema(_Rich.model_json_schema()))
    assert rich.kind == "token" and rich.count == 3 and rich.small == -1
    assert len(rich.examples) == 2 and rich.examples[0].weight == -2.0
    with LLMServer() as server:
        settings = _settings(server)

        async def ask() -> _Rich:
            client = LLMClient(settings)
            try:
                return (await client.complete_json(MESSAGES, _Rich))[0]
            finally:
                await client.aclose()

        assert asyncio.run(ask()) == rich
