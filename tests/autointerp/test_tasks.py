"""Autointerp tasks and results: a result's row is the label store's line exactly as earlier
versions wrote it, tasks survive the JSON trip to the workers, and `run_task` turns every failure
but a fatal one into a failed result that keeps what was spent."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from spd_ray.autointerp.errors import BudgetExhausted, FatalLLMError, LLMError, Usage
from spd_ray.autointerp.prompt import LabelAnswer
from spd_ray.autointerp.scoring import Picks, Trial
from spd_ray.autointerp.tasks import (
    LABEL_RESULT,
    SCORE_RESULT,
    TASK,
    LabelFailed,
    Labelled,
    LabelTask,
    Scored,
    ScoreFailed,
    ScoreTask,
    TrialResult,
    row,
    run_task,
)

USAGE = Usage(prompt_tokens=120, completion_tokens=30, cost_usd=0.00125, requests=2)
USAGE_JSON = '{"prompt_tokens": 120, "completion_tokens": 30, "cost_usd": 0.00125, "requests": 2}'


def test_rows_are_the_store_lines_earlier_versions_wrote() -> None:
    cases = [
        (
            Labelled(key="a:1", label="x", confidence="high", reasoning="r", usage=USAGE),
            '{"key": "a:1", "status": "ok", "label": "x", "confidence": "high", '
            f'"reasoning": "r", "usage": {USAGE_JSON}}}',
        ),
        (
            LabelFailed(key="a:1", reason="429", usage=USAGE),
            f'{{"key": "a:1", "status": "failed", "reason": "429", "usage": {USAGE_JSON}}}',
        ),
        (
            Scored(
                key="a:1",
                kind="detection",
                score=0.75,
                trials=[TrialResult(truth=(True, False), selected=[1, 2], score=0.5)],
                usage=USAGE,
            ),
            '{"key": "a:1", "kind": "detection", "status": "ok", "score": 0.75, "trials": '
            '[{"truth": [true, false], "selected": [1, 2], "score": 0.5}], '
            f'"usage": {USAGE_JSON}}}',
        ),
        (  # trials that could not be built: no request, no usage
            ScoreFailed(key="a:1", kind="fuzzing", reason="cannot build fuzzing trials: few"),
            '{"key": "a:1", "kind": "fuzzing", "status": "failed", '
            '"reason": "cannot build fuzzing trials: few"}',
        ),
    ]
    for result, line in cases:
        assert json.dumps(row(result)) == line
        adapter = SCORE_RESULT if isinstance(result, Scored | ScoreFailed) else LABEL_RESULT
        back = adapter.validate_json(result.model_dump_json())
        assert type(back) is type(result) and json.dumps(row(back)) == line


def test_tasks_survive_the_json_trip() -> None:
    messages = [{"role": "user", "content": "which?"}]
    trial = Trial(kind="intruder", messages=messages, truth=(False, True, False))
    for task in (
        LabelTask(key="m:3", messages=messages),
        ScoreTask(key="m:3", kind="intruder", trials=[trial]),
    ):
        back = TASK.validate_json(task.model_dump_json())
        assert back == task and type(back) is type(task)
    score = TASK.validate_json(
        ScoreTask(key="k", kind="intruder", trials=[trial]).model_dump_json()
    )
    assert isinstance(score, ScoreTask) and score.trials[0].truth == (False, True, False)
    with pytest.raises(ValueError, match="kind"):
        TASK.validate_json('{"type": "score", "key": "k", "kind": "nope", "trials": []}')


class _Client:
    """Answers `complete_json` from a script: an answer (with its usage) or an error to raise."""

    def __init__(self, *script: Any):
        self.script = list(script)

    async def complete_json(self, messages: list[dict[str, str]], schema: type) -> Any:
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        assert isinstance(step, schema)
        return step, Usage(10, 5, 0.25, 1), "raw"


def _run(client: _Client, task: LabelTask | ScoreTask) -> Any:
    return asyncio.run(run_task(client, task))  # type: ignore[arg-type]


def test_run_task_labels_scores_and_keeps_the_cost_of_failures() -> None:
    label = LabelAnswer(label="commas", confidence="medium", reasoning="it fires on commas")
    got = _run(_Client(label), LabelTask(key="a:0", messages=[]))
    assert got == Labelled(
        key="a:0",
        label="commas",
        confidence="medium",
        reasoning="it fires on commas",
        usage=Usage(10, 5, 0.25, 1),
    )

    trials = [
        Trial(kind="detection", messages=[], truth=(True, False)),
        Trial(kind="detection", messages=[], truth=(True, True, False)),
    ]
    task = ScoreTask(key="a:0", kind="detection", trials=trials)
    picks = [Picks(selected=[1], reasoning=""), Picks(selected=[1, 3], reasoning="")]
    scored = _run(_Client(*picks), task)
    assert isinstance(scored, Scored)
    assert [t.score for t in scored.trials] == [1.0, 0.25]  # (1/1 + 1/1)/2, (1/2 + 0/1)/2
    assert scored.score == pytest.approx(0.625) and scored.usage == Usage(20, 10, 0.5, 2)

    # The second trial fails: the first one's usage and the failure's own are both kept.
    failed = _run(_Client(picks[0], LLMError("malformed", Usage(1, 1, 0.125, 3))), task)
    assert failed == ScoreFailed(
        key="a:0", kind="detection", reason="malformed", usage=Usage(11, 6, 0.375, 4)
    )
    spent = _run(_Client(BudgetExhausted("spent")), LabelTask(key="a:0", messages=[]))
    assert spent == LabelFailed(key="a:0", reason="budget: spent", usage=Usage())
    with pytest.raises(FatalLLMError):
        _run(_Client(FatalLLMError("bad key")), LabelTask(key="a:0", messages=[]))
