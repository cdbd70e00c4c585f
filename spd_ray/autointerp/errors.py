"""What LLM requests cost (`Usage`) and how they fail: the errors carry the usage they spent.

A leaf of the autointerp package: the client raises these errors, the limiter refuses with
`BudgetExhausted`, and the pipeline records the usage of every outcome.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class Usage:
    """Tokens, cost and HTTP requests (failed ones included) of one or more attempts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    requests: int = 0

    def add(self, other: Usage) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.completion_tokens += other.completion_tokens
        self.cost_usd += other.cost_usd
        self.requests += other.requests

    def __add__(self, other: Usage) -> Usage:
        total = Usage(**vars(self))
        total.add(other)
        return total


class LLMError(Exception):
    """A request that failed after its retries and re-asks; `usage` is what it cost anyway."""

    def __init__(self, reason: str, usage: Usage | None = None):
        super().__init__(reason)
        self.reason = reason
        self.usage = usage if usage is not None else Usage()

    def __reduce__(self) -> tuple[Any, ...]:
        # Errors cross Ray process boundaries; keep the usage, not just the message.
        return (type(self), (self.reason, self.usage))


class FatalLLMError(LLMError):
    """The endpoint is unusable (unreachable, bad key, unknown model or path, no credit)."""


class BudgetExhausted(LLMError):
    """The shared budget is spent; no request was sent."""
