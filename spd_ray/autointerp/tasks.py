"""The units of work of an autointerp run, what each one returns, and how a worker runs one.

A task is one subcomponent's label request, or one of its scores over several trials; it travels
to the Ray Data workers as JSON. Its result is a line of the label store (store.py), field for
field: `row(result)` is the dict that `LabelStore.add_label` / `add_score` append.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from spd_ray.autointerp.client import LLMClient
from spd_ray.autointerp.errors import BudgetExhausted, FatalLLMError, LLMError, Usage
from spd_ray.autointerp.prompt import LabelAnswer
from spd_ray.autointerp.scoring import Picks, ScoreKind, Trial, mean_score, trial_score


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LabelTask(_Record):
    """Ask for one subcomponent's label."""

    type: Literal["label"] = "label"
    key: str
    messages: list[dict[str, str]]


class ScoreTask(_Record):
    """Ask one score's trials about one subcomponent's label."""

    type: Literal["score"] = "score"
    key: str
    kind: ScoreKind
    trials: list[Trial]


Task = Annotated[LabelTask | ScoreTask, Field(discriminator="type")]
TASK: TypeAdapter[LabelTask | ScoreTask] = TypeAdapter(Task)

# The results below declare their fields in the order of the store's lines.


class Labelled(_Record):
    key: str
    status: Literal["ok"] = "ok"
    label: str
    confidence: Literal["low", "medium", "high"]
    reasoning: str
    usage: Usage


class LabelFailed(_Record):
    key: str
    status: Literal["failed"] = "failed"
    reason: str
    usage: Usage


class TrialResult(_Record):
    """One trial of a score: which shown items were positive, which the LLM picked, the score."""

    truth: tuple[bool, ...]
    selected: list[int]
    score: float


class Scored(_Record):
    key: str
    kind: ScoreKind
    status: Literal["ok"] = "ok"
    score: float
    trials: list[TrialResult]
    usage: Usage


class ScoreFailed(_Record):
    key: str
    kind: ScoreKind
    status: Literal["failed"] = "failed"
    reason: str
    usage: Usage | None = None  # None: it failed before any request (its trials could not be built)


LabelResult = Annotated[Labelled | LabelFailed, Field(discriminator="status")]
ScoreResult = Annotated[Scored | ScoreFailed, Field(discriminator="status")]
LABEL_RESULT: TypeAdapter[Labelled | LabelFailed] = TypeAdapter(LabelResult)
SCORE_RESULT: TypeAdapter[Scored | ScoreFailed] = TypeAdapter(ScoreResult)
Result = Labelled | LabelFailed | Scored | ScoreFailed


def row(result: Result) -> dict[str, Any]:
    """The label store's line of a result (a failure without requests has no usage)."""
    return result.model_dump(exclude_none=True)


async def run_task(client: LLMClient, task: LabelTask | ScoreTask) -> Result:
    """One component's label, or one component's score over its trials; fatal errors propagate
    (they end the pipeline), every other failure is a result with its reason and its cost."""
    spent = Usage()  # what the requests that came back cost, before any failure
    try:
        match task:
            case LabelTask():
                return await _label(client, task)
            case ScoreTask():
                return await _score(client, task, spent)
    except FatalLLMError:
        raise
    except LLMError as err:
        spent.add(err.usage)
        reason = f"budget: {err.reason}" if isinstance(err, BudgetExhausted) else err.reason
        if isinstance(task, LabelTask):
            return LabelFailed(key=task.key, reason=reason, usage=spent)
        return ScoreFailed(key=task.key, kind=task.kind, reason=reason, usage=spent)


async def _label(client: LLMClient, task: LabelTask) -> Labelled:
    answer, usage, _ = await client.complete_json(task.messages, LabelAnswer)
    return Labelled(key=task.key, **answer.model_dump(), usage=usage)


async def _score(client: LLMClient, task: ScoreTask, spent: Usage) -> Scored:
    """Ask every trial in turn; `spent` sums their usage as the answers come."""
    answers: list[Picks] = []
    for trial in task.trials:
        picks, usage, _ = await client.complete_json(trial.messages, Picks)
        spent.add(usage)
        answers.append(picks)
    trials = [
        TrialResult(truth=t.truth, selected=a.selected, score=trial_score(t, a))
        for t, a in zip(task.trials, answers, strict=True)
    ]
    return Scored(
        key=task.key,
        kind=task.kind,
        score=mean_score(task.trials, answers),
        trials=trials,
        usage=spent,
    )
