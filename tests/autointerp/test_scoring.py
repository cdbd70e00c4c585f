"""Label scoring: balanced accuracy by hand, oracle and random answerers against the three trial
builders, trial determinism and contents, input checks and the answer schema."""

from __future__ import annotations

import itertools
import random
import re

import pytest
from pydantic import ValidationError

from spd_ray.autointerp.scoring import (
    SCORE_KINDS,
    Picks,
    Trial,
    balanced_accuracy,
    detection_trials,
    fuzzing_trials,
    intruder_trials,
    mean_score,
    strip_marks,
    trial_score,
)

LABEL = "fires on the token 'the' after a verb"
NUMBERED = re.compile(r"^(\d+)\. (.*)$")


def pool(prefix: str, n: int = 50) -> list[str]:
    """Distinct digit-free strings with one marked token each."""
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta", "eta", "theta", "iota", "kappa"]
    return [f"{prefix} {words[i // 10]} <<{words[i % 10]}>> end" for i in range(n)]


def build(kind: str, n_trials: int, seed: int = 0) -> list[Trial]:
    if kind == "detection":
        return detection_trials(LABEL, pool("pos"), pool("neg"), n_trials=n_trials, seed=seed)
    if kind == "fuzzing":
        return fuzzing_trials(LABEL, pool("ok"), pool("bad"), n_trials=n_trials, seed=seed)
    return intruder_trials(pool("own"), pool("other"), n_trials=n_trials, seed=seed)


def shown(trial: Trial) -> list[str]:
    lines = trial.messages[1]["content"].splitlines()
    return [m.group(2) for m in map(NUMBERED.match, lines) if m]


def oracle(trial: Trial) -> Picks:
    return Picks(selected=[i for i, t in enumerate(trial.truth, 1) if t], reasoning="truth")


@pytest.mark.parametrize(
    ("truth", "selected", "expected"),
    [
        ([True, True, False, False, False], [1, 2], 1.0),
        ([True, True, False, False, False], [1, 2, 3, 4, 5], 0.5),
        ([True, True, False, False, False], [], 0.5),
        ([True, True, False, False, False], [3, 4, 5], 0.0),
        ([True, True, False, False, False], [1, 3], (1 / 2 + 2 / 3) / 2),
        ([True, True, False, False, False], [1, 1, 3, 0, 6, -1], (1 / 2 + 2 / 3) / 2),
        ([False, True, False, False, False], [2], 1.0),  # intruder found
        ([False, True, False, False, False], [4], (0 + 3 / 4) / 2),  # wrong single pick
    ],
)
def test_balanced_accuracy_by_hand(truth, selected, expected):
    assert balanced_accuracy(truth, selected) == pytest.approx(expected, abs=1e-12)


def test_balanced_accuracy_needs_both_classes():
    with pytest.raises(ValueError, match="truth"):
        balanced_accuracy([True, True], [1])
    with pytest.raises(ValueError, match="truth"):
        balanced_accuracy([False, False], [1])


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_oracle_scores_one(kind):
    trials = build(kind, 20)
    assert {t.kind for t in trials} == {kind}
    assert mean_score(trials, [oracle(t) for t in trials]) == 1.0


def test_blind_answers_average_exactly_half():
    """Over every subset (detection/fuzzing) or every single pick (intruder) of one trial, the
    mean is exactly 0.5: balanced accuracy has chance 0.5 whatever the class balance."""
    for kind in ("detection", "fuzzing"):
        trial = build(kind, 1)[0]
        n = len(trial.truth)
        subsets = [
            Picks(selected=list(c), reasoning="")
            for r in range(n + 1)
            for c in itertools.combinations(range(1, n + 1), r)
        ]
        assert mean_score([trial] * len(subsets), subsets) == pytest.approx(0.5, abs=1e-12)
    trial = build("intruder", 1)[0]
    picks = [Picks(selected=[i], reasoning="") for i in range(1, len(trial.truth) + 1)]
    assert mean_score([trial] * len(picks), picks) == pytest.approx(0.5, abs=1e-12)


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_random_answerer_scores_half(kind):
    """400 trials, answers blind to the truth (fixed seed). Tolerance 0.05: the per-trial std of
    balanced accuracy is at most 0.25 (detection 5+5 items: 0.16; fuzzing 5+2: 0.21; intruder
    4+1: 0.25), so the std of a 400-trial mean is at most 0.0125 and 0.05 is >= 4 standard
    deviations; a pass is not a lucky seed, and the exact test above pins the expectation."""
    trials = build(kind, 400, seed=7)
    rng = random.Random(123)
    answers = []
    for t in trials:
        n = len(t.truth)
        if kind == "intruder":
            selected = [rng.randint(1, n)]
        else:
            selected = [i for i in range(1, n + 1) if rng.random() < 0.5]
        answers.append(Picks(selected=selected, reasoning="guess"))
    assert abs(mean_score(trials, answers) - 0.5) < 0.05


def test_intruder_multiple_or_no_picks_scored_as_selection():
    trial = build("intruder", 1)[0]
    n = len(trial.truth)
    assert trial_score(trial, Picks(selected=list(range(1, n + 1)), reasoning="")) == 0.5
    assert trial_score(trial, Picks(selected=[], reasoning="")) == 0.5


@pytest.mark.parametrize("kind", SCORE_KINDS)
def test_trials_deterministic_and_varied(kind):
    a, b = build(kind, 6), build(kind, 6)
    assert a == b
    assert len({tuple(shown(t)) for t in a}) == 6
    assert [shown(t) for t in build(kind, 6, seed=1)] != [shown(t) for t in a]


@pytest.mark.parametrize(
    ("kind", "n_pos", "n_neg"), [("detection", 5, 5), ("fuzzing", 5, 2), ("intruder", 1, 4)]
)
def test_trial_contents(kind, n_pos, n_neg):
    for t in build(kind, 10):
        items = shown(t)
        assert len(items) == len(t.truth) == n_pos + n_neg
        assert sum(t.truth) == n_pos
        assert len(set(items)) == len(items)
        assert [m["role"] for m in t.messages] == ["system", "user"]
        assert "JSON" in t.messages[0]["content"]
        user = t.messages[1]["content"]
        assert (LABEL in user) == (kind != "intruder")
        assert "<<token>>" in user
        # Outside the numbered list, the total is stated but not the positive count.
        rest = "\n".join(line for line in user.splitlines() if not NUMBERED.match(line))
        assert str(n_pos + n_neg) in rest
        assert not re.search(rf"\b{n_pos}\b", rest)
        assert not re.search(rf"\b{n_neg}\b", rest)
        prefixes = {"detection": "pos", "fuzzing": "ok", "intruder": "other"}
        for item, positive in zip(items, t.truth, strict=True):
            assert item.startswith(prefixes[kind]) == positive
            assert ("<<" in item) == (kind != "detection")  # detection strips the marks


def test_small_pools_use_what_there_is():
    trials = detection_trials(LABEL, ["a <<x>>", "b"], ["c"], n_trials=3)
    assert all(len(t.truth) == 3 and sum(t.truth) == 2 for t in trials)
    trials = intruder_trials(["a", "b"], ["c"], n_trials=2)
    assert all(len(t.truth) == 3 and sum(t.truth) == 1 for t in trials)


def test_multiline_items_stay_one_number():
    t = detection_trials(LABEL, ["first\n2. line"], ["other"], n_trials=1)[0]
    assert len(shown(t)) == 2


@pytest.mark.parametrize(
    ("call", "name"),
    [
        (lambda: detection_trials(LABEL, [], ["x"]), "activating"),
        (lambda: detection_trials(LABEL, ["x"], []), "non_activating"),
        (lambda: fuzzing_trials(LABEL, [], ["a <<b>>"]), "correct"),
        (lambda: fuzzing_trials(LABEL, ["a <<b>>"], []), "wrong"),
        (lambda: fuzzing_trials(LABEL, ["a <<b>>"], ["no mark"]), "wrong"),
        (lambda: intruder_trials(["x"], ["y"]), "own"),
        (lambda: intruder_trials(["x", "z"], []), "intruders"),
        (lambda: detection_trials("", ["x"], ["y"]), "label"),
        (lambda: detection_trials(LABEL, ["x"], ["y"], n_trials=0), "n_trials"),
        (lambda: fuzzing_trials(LABEL, ["<<a>>"], ["<<b>>"], n_neg=0), "n_neg"),
        (lambda: intruder_trials(["x", "z"], ["y"], n_real=1), "n_real"),
        (lambda: mean_score([], []), "trials"),
        (lambda: mean_score(build("intruder", 2), []), "answers"),
    ],
)
def test_bad_inputs_name_the_argument(call, name):
    with pytest.raises(ValueError, match=name):
        call()


def test_picks_schema():
    picks = Picks.model_validate_json('{"selected":[1,3],"reasoning":"x"}')
    assert picks.selected == [1, 3] and picks.reasoning == "x"
    with pytest.raises(ValidationError):
        Picks.model_validate_json('{"selected":[1],"reasoning":"x","confidence":0.9}')
    with pytest.raises(ValidationError):
        Picks.model_validate_json('{"selected":[1]}')
    schema = Picks.model_json_schema()
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"selected", "reasoning"}


def test_strip_marks():
    assert strip_marks("a <<b>> c <<d e>>") == "a b c d e"
