"""The trials of one score for one subcomponent, drawn from its harvest: its own examples rendered
as text, and examples borrowed from subcomponents that seldom fire with it (scoring.py builds the
prompts and scores the answers)."""

from __future__ import annotations

import random

import numpy as np

from spd_ray.autointerp.scoring import (
    Trial,
    detection_trials,
    fuzzing_trials,
    intruder_trials,
)
from spd_ray.harvest.show import example_text, token_text
from spd_ray.harvest.store import Example, Harvest


def score_trials(
    h: Harvest, key: str, label: str, kind: str, rng: random.Random, threshold: float
) -> list[Trial]:
    """The trials of one score (detection, fuzzing or intruder) for one component. Raises
    ValueError when the harvest holds too few examples for them."""
    i = h.index(key)
    own = h.examples(key)
    apart = _apart(h, i)
    seed = rng.randrange(1 << 30)
    if kind == "detection":
        others = _borrow(h, apart, rng, 20, own)
        return detection_trials(label, [_render(h, e) for e in own], others, seed=seed)
    if kind == "fuzzing":
        correct, wrong = _fuzzed(h, own, rng, threshold)
        return fuzzing_trials(label, correct, wrong, seed=seed)
    counts = h.firing_counts()
    density = counts / max(h.n_tokens, 1)
    similar = sorted(apart, key=lambda j: abs(density[j] - density[i]))[:10]
    return intruder_trials(
        [_render(h, e) for e in own], _borrow(h, similar, rng, 10, own), seed=seed
    )


def _apart(h: Harvest, i: int) -> list[int]:
    """Subcomponents that never fire together with subcomponent i: at their firing token it is
    certainly silent. Where every subcomponent co-fires with it (an undertrained decomposition),
    the ones that co-fire least, up to 10."""
    counts = h.firing_counts()
    co = h.cofiring_row(i)
    alive = [j for j in np.flatnonzero(counts > 0).tolist() if j != i]
    apart = [j for j in alive if co[j] == 0]
    if len(apart) < 10:
        rate = {j: co[j] / counts[j] for j in alive}
        apart += sorted((j for j in alive if co[j] > 0), key=lambda j: (rate[j], j))[
            : 10 - len(apart)
        ]
    return apart


def _fuzzed(
    h: Harvest, own: list[Example], rng: random.Random, threshold: float
) -> tuple[list[str], list[str]]:
    """(examples marked at their firing token, examples marked at a token of the same window
    where the subcomponent is quiet: CI <= threshold)."""
    correct, wrong = [], []
    for e in own:
        correct.append(_render(h, e))
        if e.tokens is not None and isinstance(e.ci, list):
            quiet = [
                j
                for j, (t, c) in enumerate(zip(e.tokens, e.ci, strict=True))
                if t >= 0 and c <= threshold
            ]
            if quiet:
                wrong.append(_render(h, e, rng.choice(quiet)))
    return correct, wrong


def _render(h: Harvest, e: Example, position: int | None = None) -> str:
    """An example with the firing token (or another `position` of the window) marked."""
    if e.tokens is None:
        return example_text(h, e)
    if position is None:
        return example_text(h, e, ("<<", ">>"))
    text = []
    for j, tok in enumerate(e.tokens):
        if tok < 0:
            continue
        piece = token_text(h, tok)
        text.append(f"<<{piece}>>" if j == position else piece)
    return "".join(text).replace("\n", "\\n")


def _borrow(
    h: Harvest, components: list[int], rng: random.Random, n: int, own: list[Example]
) -> list[str]:
    """Up to `n` examples of other subcomponents (one each), never a window this subcomponent
    has among its own examples (the same firing position, or the same text)."""
    own_uids = {(e.doc, e.offset) for e in own}
    own_text = {_plain(_render(h, e)) for e in own}
    out = []
    for j in rng.sample(components, len(components)):
        ex = [
            e
            for e in (h.examples(j, "reservoir") or h.examples(j))
            if (e.doc, e.offset) not in own_uids and _plain(_render(h, e)) not in own_text
        ]
        if ex:
            out.append(_render(h, rng.choice(ex)))
        if len(out) == n:
            break
    return out


def _plain(text: str) -> str:
    return text.replace("<<", "").replace(">>", "")
