"""Scoring the labels an LLM gives SPD subcomponents: trial prompts, the answer schema, the scores.

Three scores, each a set of trials that an LLM answers with `Picks` (the 1-based numbers of the
examples it chooses):

- detection: the label plus a shuffled list of examples where the component activates and
  examples borrowed from other components; the LLM lists those it thinks activate it. Examples
  are shown as plain text: the `<<token>>` marks are stripped, since marks on the activating
  examples alone would give the answer away.
- fuzzing: the label plus examples with one token marked `<<token>>`; in some the mark sits on a
  token where the component fires, in the others on one where it does not. The LLM lists the
  correctly marked ones.
- intruder (label-free): several examples of one component and one of another, shuffled; the LLM
  names the odd one out.

Every trial is scored by balanced accuracy over its shown items, (TPR + TNR) / 2, where item i is
positive when `truth[i]` holds (activating, correctly marked, or the intruder). Plain accuracy
would reward a trivial answer in proportion to the class balance (five positives and two negatives
make "select all" 71 % accurate); balanced accuracy is 0.5 for any answer chosen without looking
at the truth, whatever the balance: select all, select none, a random subset, a random single
pick. So chance is 0.5 for every score and scores are comparable across kinds and trial sizes;
only an oracle reaches 1.0. An intruder answer that picks several items or none is not rejected
but scored the same way, which again gives no free lunch: a blind guess of any size averages 0.5.

Trials are deterministic: trial k of a call draws its items, without replacement, from a
`random.Random` seeded with the kind, `seed` and k. Pool strings should be distinct, or a trial may
show the same text twice. No I/O here: the pipeline renders examples and calls the LLM.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field

from spd_ray.errors import InputError

ScoreKind = Literal["detection", "fuzzing", "intruder"]
SCORE_KINDS: tuple[str, ...] = ("detection", "fuzzing", "intruder")

_MARK = re.compile(r"<<(.+?)>>", re.DOTALL)


class Picks(BaseModel, extra="forbid"):
    """The LLM's answer to one trial; no optional fields, so it suits strict structured output."""

    selected: list[int] = Field(
        description="1-based numbers of the chosen examples (for the odd one out: exactly one)"
    )
    reasoning: str = Field(description="one or two sentences explaining the choice")


@dataclass(frozen=True)
class Trial:
    """One question: chat messages (system + user) and, for shown item i+1, whether it is positive
    (activating / correctly highlighted / the intruder)."""

    kind: ScoreKind
    messages: list[dict[str, str]]
    truth: tuple[bool, ...]


_SYSTEM = (
    "You evaluate explanations of subcomponents of a neural network (small parts of its weights "
    "that activate on particular tokens). Answer with a JSON object matching this schema, and "
    "nothing else: {schema}. `selected` holds the numbers of the examples you choose, as shown "
    "in the list; `reasoning` is one or two sentences."
)


def _system_message() -> dict[str, str]:
    schema = json.dumps(Picks.model_json_schema(), separators=(",", ":"))
    return {"role": "system", "content": _SYSTEM.format(schema=schema)}


def _numbered(items: Sequence[str]) -> str:
    """'1. text' per item; continuation lines of a multi-line item are indented."""
    return "\n".join(f"{i}. " + text.replace("\n", "\n   ") for i, text in enumerate(items, 1))


def _check_count(name: str, value: int, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_pool(name: str, pool: Sequence[str], minimum: int = 1) -> None:
    if len(pool) < minimum:
        raise InputError(f"{name} needs at least {minimum} example(s), got {len(pool)}")
    if not all(isinstance(s, str) for s in pool):
        raise InputError(f"{name} must hold only strings")


def _check_label(label: str) -> None:
    if not isinstance(label, str) or not label.strip():
        raise InputError(f"label must be a non-empty string, got {label!r}")


def _rng(kind: str, seed: int, index: int) -> random.Random:
    # A string seed keeps (seed, index) pairs apart: seed 0 trial 1 differs from seed 1 trial 0.
    return random.Random(f"{kind}/{seed}/{index}")


def _draw(
    rng: random.Random, pos: Sequence[str], n_pos: int, neg: Sequence[str], n_neg: int
) -> tuple[list[str], tuple[bool, ...]]:
    shown = [(s, True) for s in rng.sample(list(pos), min(n_pos, len(pos)))]
    shown += [(s, False) for s in rng.sample(list(neg), min(n_neg, len(neg)))]
    rng.shuffle(shown)
    return [s for s, _ in shown], tuple(t for _, t in shown)


def _trial(kind: ScoreKind, user: str, truth: tuple[bool, ...]) -> Trial:
    return Trial(kind, [_system_message(), {"role": "user", "content": user}], truth)


def strip_marks(text: str) -> str:
    """`a <<b>> c` -> `a b c`."""
    return _MARK.sub(r"\1", text)


def detection_trials(
    label: str,
    activating: list[str],
    non_activating: list[str],
    n_trials: int = 5,
    n_pos: int = 5,
    n_neg: int = 5,
    seed: int = 0,
) -> list[Trial]:
    """Trials where the LLM lists the examples on which the labelled component activates."""
    _check_label(label)
    _check_pool("activating", activating)
    _check_pool("non_activating", non_activating)
    for name, value in (("n_trials", n_trials), ("n_pos", n_pos), ("n_neg", n_neg)):
        _check_count(name, value)
    trials = []
    for k in range(n_trials):
        items, truth = _draw(_rng("detection", seed, k), activating, n_pos, non_activating, n_neg)
        user = (
            f'Explanation of a subcomponent: "{label}"\n\n'
            f"Below are {len(items)} text examples, shown as plain text: no tokens are marked "
            "as <<token>>, so decide from the text itself. "
            "The subcomponent activates on some of them; any number, from none to all, may be "
            "activating.\n\n"
            f"{_numbered([strip_marks(s) for s in items])}\n\n"
            "Task: using the explanation, list the numbers of the examples on which you believe "
            "the subcomponent activates."
        )
        trials.append(_trial("detection", user, truth))
    return trials


def fuzzing_trials(
    label: str,
    correct: list[str],
    wrong: list[str],
    n_trials: int = 5,
    n_pos: int = 5,
    n_neg: int = 2,
    seed: int = 0,
) -> list[Trial]:
    """Trials where the LLM lists the examples whose `<<marked>>` token is one where the labelled
    component fires. Every example must carry a mark."""
    _check_label(label)
    for name, pool in (("correct", correct), ("wrong", wrong)):
        _check_pool(name, pool)
        if not all(_MARK.search(s) for s in pool):
            raise InputError(f"{name}: every example must mark a token as <<token>>")
    for name, value in (("n_trials", n_trials), ("n_pos", n_pos), ("n_neg", n_neg)):
        _check_count(name, value)
    trials = []
    for k in range(n_trials):
        items, truth = _draw(_rng("fuzzing", seed, k), correct, n_pos, wrong, n_neg)
        user = (
            f'Explanation of a subcomponent: "{label}"\n\n'
            f"Below are {len(items)} text examples. In each, a token is highlighted as "
            "<<token>>. In some examples the highlight is correct: the subcomponent activates on "
            "that token, as the explanation describes. In the others it was put on a token where "
            "the subcomponent does not activate. Any number, from none to all, may be correct.\n\n"
            f"{_numbered(items)}\n\n"
            "Task: list the numbers of the examples whose highlighted token is correct."
        )
        trials.append(_trial("fuzzing", user, truth))
    return trials


def intruder_trials(
    own: list[str], intruders: list[str], n_trials: int = 10, n_real: int = 4, seed: int = 0
) -> list[Trial]:
    """Label-free trials: examples of one component plus one of another; the LLM names the odd one
    out. An odd one out needs a majority, so `own` must hold at least two examples."""
    _check_pool("own", own, minimum=2)
    _check_pool("intruders", intruders)
    _check_count("n_trials", n_trials)
    _check_count("n_real", n_real, minimum=2)
    trials = []
    for k in range(n_trials):
        items, truth = _draw(_rng("intruder", seed, k), intruders, 1, own, n_real)
        user = (
            f"Below are {len(items)} text examples. Tokens where a subcomponent activates are "
            "marked as <<token>>. All examples but one come from the same subcomponent and share "
            "a pattern; exactly one comes from a different subcomponent.\n\n"
            f"{_numbered(items)}\n\n"
            "Task: find the odd one out. Put exactly one number in `selected`: the example that "
            "does not fit the pattern of the others."
        )
        trials.append(_trial("intruder", user, truth))
    return trials


def balanced_accuracy(truth: Sequence[bool], selected: Iterable[int]) -> float:
    """(TPR + TNR) / 2 of selecting the 1-based numbers `selected` among items with `truth`.
    Duplicates and out-of-range numbers are ignored: they select nothing, so they cannot help."""
    truth = tuple(bool(t) for t in truth)
    n_pos = sum(truth)
    if n_pos == 0 or n_pos == len(truth):
        raise InputError("truth needs at least one positive and one negative item")
    chosen = {i for i in selected if isinstance(i, int) and 1 <= i <= len(truth)}
    tp = sum(1 for i in chosen if truth[i - 1])
    tn = sum(1 for i, t in enumerate(truth, 1) if not t and i not in chosen)
    return (tp / n_pos + tn / (len(truth) - n_pos)) / 2


def trial_score(trial: Trial, answer: Picks) -> float:
    """Balanced accuracy of one answer. An intruder answer with several picks or none is scored
    the same way (e.g. all or none -> 0.5), so hedging earns nothing on average."""
    if not isinstance(answer, Picks):
        raise InputError(f"answer must be a Picks, got {type(answer).__name__}")
    return balanced_accuracy(trial.truth, answer.selected)


def mean_score(trials: list[Trial], answers: list[Picks]) -> float:
    """Mean balanced accuracy over trials, answers[i] answering trials[i]."""
    if not trials:
        raise InputError("trials must not be empty")
    if len(answers) != len(trials):
        raise InputError(f"answers has {len(answers)} entries, trials has {len(trials)}")
    return sum(trial_score(t, a) for t, a in zip(trials, answers, strict=True)) / len(trials)
