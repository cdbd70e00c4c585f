"""One structured LLM answer over any OpenAI-compatible endpoint (hosted, OpenRouter, vLLM).

Labelling every subcomponent means tens of thousands of requests from many Ray actors, so this
layer owns the failure policy rather than leaving it to the SDK:
- transient trouble (429, 408, 409, 5xx, timeouts, dropped connections, truncated bodies) is
  retried with Retry-After or jittered exponential backoff, every attempt counted and paid for;
- an endpoint that can never work (unreachable, bad key, unknown model or path, no credit) raises
  `FatalLLMError` at once, so a misconfigured job stops in seconds instead of failing every
  component after minutes of retries;
- answers are validated against a pydantic schema and the model is re-asked a bounded number of
  times when its JSON is malformed;
- every HTTP attempt first asks a shared `Limiter` (limits.py) for room under the requests per
  minute and the USD budget, and reports what it spent.

The SDK's own retries are switched off (`max_retries=0`) so that Retry-After, fail-fast and the
request counts are decided here, once.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypeVar

import openai
from openai.types.chat import ChatCompletion
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from spd_ray.autointerp.errors import BudgetExhausted, FatalLLMError, LLMError, Usage

if TYPE_CHECKING:
    from collections.abc import Mapping

    from spd_ray.autointerp.limits import Limiter

T = TypeVar("T", bound=BaseModel)

# Worth another try: rate limits, request timeouts, conflicts; 5xx are added by range.
_RETRY_STATUS = frozenset({408, 409, 429})
# A 400 that names the model but complains about length is about this prompt, not the endpoint.
_PROMPT_PROBLEM = re.compile(r"context|maximum|too long|tokens", re.IGNORECASE)
_FENCED = re.compile(r"^```[a-zA-Z]*\s*\n?(.*?)\n?\s*```$", re.DOTALL)


class LLMSettings(BaseModel):
    """Where and how to ask. Prices are per million tokens, in USD, as providers list them."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base_url: str = Field(description="OpenAI-compatible API root, e.g. http://host:8000/v1.")
    model: str = Field(description="Model name as the endpoint knows it.")
    api_key: str = Field(
        "EMPTY", repr=False, description="Bearer key; the caller reads it from the environment."
    )
    timeout_s: float = Field(60.0, gt=0, description="Per-request HTTP timeout in seconds.")
    max_retries: int = Field(6, ge=0, description="Retries of one request after transient errors.")
    max_reasks: int = Field(2, ge=0, description="Re-asks after malformed or invalid JSON.")
    backoff_base_s: float = Field(0.5, ge=0, description="First backoff; doubles per retry.")
    backoff_max_s: float = Field(60.0, ge=0, description="Cap on one backoff or Retry-After wait.")
    max_tokens: int = Field(1500, gt=0, description="Completion token limit per request.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature.")
    price_in_per_mtok: float = Field(0.0, ge=0, description="USD per million prompt tokens.")
    price_out_per_mtok: float = Field(0.0, ge=0, description="USD per million completion tokens.")


def strip_fences(text: str) -> str:
    """The JSON inside a ```json ... ``` block, or the text itself."""
    stripped = text.strip()
    match = _FENCED.match(stripped)
    return match.group(1).strip() if match else stripped


def retry_after_s(headers: Mapping[str, str]) -> float | None:
    """Seconds a response asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or an
    HTTP date; None when it says nothing usable."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            return max(0.0, float(millis) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def backoff_s(settings: LLMSettings, attempt: int, retry_after: float | None) -> float:
    """Wait before retry number `attempt + 1`: what the server asked for (capped), else jittered
    exponential backoff so that many actors do not retry in lockstep."""
    if retry_after is not None:
        return min(settings.backoff_max_s, retry_after)
    base = min(settings.backoff_max_s, settings.backoff_base_s * 2.0**attempt)
    return base * random.uniform(0.5, 1.5)


def _error_detail(err: openai.APIStatusError) -> str:
    body = err.body
    message = body.get("message") if isinstance(body, dict) else body
    text = str(message if message else err.message)
    return " ".join(text.split())[:300]


def _is_connect_failure(err: BaseException) -> bool:
    """Whether the connection was never established (refused, unknown host, connect timeout), as
    opposed to one that dropped mid-request. Checked by class name through the cause chain so it
    holds for whichever httpx flavour the SDK runs on."""
    seen: set[int] = set()
    cur: BaseException | None = err
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError) or type(cur).__name__ in {
            "ConnectError",
            "ConnectTimeout",
            "gaierror",
        }:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def _root_cause(err: BaseException) -> str:
    """The most telling cause: the innermost OS error (e.g. connection refused, unknown host),
    else the transport error right under the SDK's generic one."""
    chain: list[BaseException] = []
    cur: BaseException | None = err
    while cur is not None and cur not in chain:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    os_errors = [e for e in chain if isinstance(e, OSError)]
    best = os_errors[-1] if os_errors else chain[min(1, len(chain) - 1)]
    return f"{type(best).__name__}: {best}" if str(best) else type(best).__name__


class LLMClient:
    """Structured completions with our retry, re-ask, fail-fast, limiter and usage policy.

    One client may serve many concurrent coroutines; create it inside the event loop (or actor)
    that uses it and `await aclose()` when done.
    """

    def __init__(self, settings: LLMSettings, limiter: Limiter | None = None):
        self.settings = settings
        self.limiter = limiter
        self._openai = openai.AsyncOpenAI(
            base_url=settings.base_url,
            api_key=settings.api_key,
            timeout=settings.timeout_s,
            max_retries=0,
        )
        # Set once any HTTP response arrives: from then on a refused connection is a restart to
        # wait out, before that it means the URL is wrong.
        self._reached = False

    async def complete_json(
        self, messages: list[dict[str, str]], schema: type[T]
    ) -> tuple[T, Usage, str]:
        """One structured answer: (validated object, usage summed over all attempts, raw text).

        Use schemas with `extra="forbid"` and no optional fields when the endpoint enforces
        OpenAI strict mode. Raises FatalLLMError, BudgetExhausted or LLMError (after retries or
        `max_reasks` re-asks), each carrying the usage spent.
        """
        response_format = {
            "type": "json_schema",
            "json_schema": {
                "name": schema.__name__,
                "schema": schema.model_json_schema(),
                "strict": True,
            },
        }
        conversation = list(messages)
        total = Usage()
        problem = ""
        for _ in range(self.settings.max_reasks + 1):
            text, finish = await self._send(
                conversation, total, response_format, self.settings.max_tokens
            )
            try:
                return schema.model_validate_json(strip_fences(text)), total, text
            except ValidationError as err:
                problem = _validation_problem(err, text, finish, self.settings.max_tokens)
            conversation = [
                *conversation,
                {"role": "assistant", "content": text},
                {
                    "role": "user",
                    "content": f"Your previous reply could not be used: {problem}. Reply again "
                    "with only the JSON object that matches the schema: no prose, no code fences.",
                },
            ]
        raise LLMError(
            f"malformed output after {self.settings.max_reasks} re-asks: {problem}", total
        )

    async def check(self) -> Usage:
        """Fail fast before a big job: one minimal chat request. Raises FatalLLMError with a
        one-line reason for an unreachable base URL, a rejected key, an unknown model or path;
        LLMError if the endpoint keeps failing transiently through all retries; else returns what
        it cost (it is paid for like any request)."""
        usage = Usage()
        await self._send([{"role": "user", "content": "Reply with OK."}], usage, None, 8)
        return usage

    async def aclose(self) -> None:
        await self._openai.close()

    async def _send(
        self,
        conversation: list[dict[str, str]],
        total: Usage,
        response_format: dict[str, Any] | None,
        max_tokens: int,
    ) -> tuple[str, str | None]:
        """One request with retries: (message content, finish reason). Adds tokens, cost and
        requests to `total` as they happen, so a failure still reports what it cost."""
        s = self.settings
        kwargs: dict[str, Any] = {
            "model": s.model,
            "messages": conversation,
            "max_tokens": max_tokens,
            "temperature": s.temperature,
        }
        if response_format is not None:
            kwargs["response_format"] = response_format
        problem = ""
        for attempt in range(s.max_retries + 1):
            if self.limiter is not None:
                try:
                    await self.limiter.acquire()
                except BudgetExhausted as err:
                    raise BudgetExhausted(err.reason, total) from None
            total.requests += 1
            wait_hint: float | None = None
            try:
                try:
                    response = await self._openai.chat.completions.create(**kwargs)
                finally:
                    if self.limiter is not None:
                        await self.limiter.release()
            except openai.APIStatusError as err:
                self._reached = True
                self._raise_unless_retryable(err, total)
                problem = f"{err.status_code}: {_error_detail(err)}"
                wait_hint = retry_after_s(err.response.headers)
            except openai.APIConnectionError as err:  # APITimeoutError included
                # Refused, or a connect timeout, before anything ever answered: unreachable host.
                if not self._reached and _is_connect_failure(err):
                    raise FatalLLMError(
                        f"cannot reach {s.base_url}: {_root_cause(err)}", total
                    ) from None
                if isinstance(err, openai.APITimeoutError):
                    problem = f"timed out after {s.timeout_s} s"
                else:
                    problem = f"connection failed ({_root_cause(err)})"
            except (json.JSONDecodeError, UnicodeDecodeError) as err:
                self._reached = True
                problem = f"unreadable response body ({type(err).__name__}: {err})"
            else:
                self._reached = True
                answer = await self._account(response, total)
                if answer is not None:
                    return answer
                problem = "response without choices (not a chat completion)"
            if attempt == s.max_retries:
                break
            await asyncio.sleep(backoff_s(s, attempt, wait_hint))
        raise LLMError(f"gave up after {s.max_retries + 1} requests: {problem}", total)

    async def _account(self, response: object, total: Usage) -> tuple[str, str | None] | None:
        """Record the usage of a 200 response and return (content, finish reason), or None when
        the body was not a chat completion (a misbehaving proxy)."""
        if not isinstance(response, ChatCompletion):
            return None
        usage = response.usage
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        cost = (
            prompt * self.settings.price_in_per_mtok + completion * self.settings.price_out_per_mtok
        ) / 1e6
        total.add(Usage(prompt, completion, cost, 0))
        if usage is not None and self.limiter is not None:
            await self.limiter.spend(cost, prompt, completion)
        if not response.choices:
            return None
        choice = response.choices[0]
        return (choice.message.content or ""), choice.finish_reason

    def _raise_unless_retryable(self, err: openai.APIStatusError, total: Usage) -> None:
        s = self.settings
        status = err.status_code
        detail = _error_detail(err)
        code = str(err.code or "")
        if status in (401, 403):
            raise FatalLLMError(
                f"{status} {'unauthorized' if status == 401 else 'forbidden'} at {s.base_url}: "
                f"check the API key ({detail})",
                total,
            )
        if status == 404:
            if code == "model_not_found" or "model" in detail.lower():
                raise FatalLLMError(
                    f"model {s.model!r} not found at {s.base_url} (404: {detail})", total
                )
            raise FatalLLMError(
                f"404 not found at {s.base_url}: check base_url, which usually ends in /v1 "
                f"({detail})",
                total,
            )
        if status == 402 or code == "insufficient_quota":
            raise FatalLLMError(f"{status} no credit left at {s.base_url}: {detail}", total)
        if status == 400 and s.model in detail and not _PROMPT_PROBLEM.search(detail):
            raise FatalLLMError(
                f"model {s.model!r} rejected by {s.base_url} (400: {detail})", total
            )
        if status in _RETRY_STATUS or status >= 500:
            return
        raise LLMError(f"{status} from {s.base_url}: {detail}", total)


def _validation_problem(
    err: ValidationError, text: str, finish: str | None, max_tokens: int
) -> str:
    """One line saying what was wrong with an answer, for the re-ask and the final error."""
    if not text.strip():
        return "the reply was empty"
    first = err.errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "reply"
    line = f"{where}: {first.get('msg', str(err))}"
    if finish == "length":
        line += f" (the reply was cut off at max_tokens={max_tokens})"
    return line
