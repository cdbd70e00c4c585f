"""The labelling prompt for one subcomponent, built from its harvest: what SPD subcomponents are,
where this one sits, how often it fires, its input and output tokens with their measures, and its
examples with the firing tokens marked `<<...>>`. The order of these parts and the answer schema
(a 3-10 word label, a confidence, 2-4 sentences of reasoning) follow the reference SPD library's
autointerp prompt, reworded."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from spd_ray.harvest.show import example_text, token_text
from spd_ray.harvest.store import Example, Harvest

MARK = ("<<", ">>")
SYSTEM = (
    "You are an interpretability researcher. You explain what individual subcomponents of a "
    "neural network do, from statistics and examples of when they are active. Answer only with "
    "JSON matching the given schema."
)


class LabelAnswer(BaseModel):
    """The LLM's label for one subcomponent (strict-schema friendly: every field required)."""

    model_config = ConfigDict(extra="forbid")
    label: str = Field(description="3-10 words: what the subcomponent detects or does")
    confidence: Literal["low", "medium", "high"]
    reasoning: str = Field(description="2-4 sentences: the evidence for the label")


@dataclass(frozen=True)
class PromptSettings:
    n_examples: int = 20  # examples shown (top-activating first, then uniform ones)
    n_tokens: int = 10  # entries per token list
    mark_ci: float = 0.3  # also mark other tokens of a window where this CI exceeds this


def location(h: Harvest, module: str) -> str:
    """'layer i+1 of n, <role>' from a module path, when the path has a layer index."""
    modules = [m["path"] for m in h.meta["modules"]]
    numbers = [int(m.group(1)) for p in modules if (m := re.search(r"\.(\d+)\.", p))]
    found = re.search(r"\.(\d+)\.", module)
    role = module.rsplit(".", 1)[-1]
    if found and numbers:
        return (
            f"'{role}' in block {int(found.group(1)) + 1} of {max(numbers) + 1} (module {module})"
        )
    return f"module {module}"


def _token_list(h: Harvest, key: str, side: str, measure: str, k: int, pct: bool) -> str:
    r = h.tokens(key, side, measure, k)
    items = []
    for t, v in zip(r.index.tolist(), r.value.tolist(), strict=True):
        value = f"{100 * v:.0f}%" if pct else f"{v:.2f}"
        items.append(f"{token_text(h, int(t))!r} ({value})")
    return ", ".join(items) if items else "(none)"


def label_messages(
    h: Harvest, key: str, examples: list[Example], s: PromptSettings = PromptSettings()
) -> list[dict[str, str]]:
    """The chat messages that ask for one subcomponent's label."""
    summary = h.summary(key)
    density = summary["firing_density"]
    lm = h.kind == "lm"
    unit = "tokens" if lm else "inputs"
    lines = [
        "Stochastic Parameter Decomposition splits every weight matrix of a network into rank-one "
        "subcomponents. For each input, a causal-importance (CI) value in [0, 1] says how much a "
        "subcomponent is needed there; a subcomponent is active (fires) where its CI is above a "
        "small threshold, and most subcomponents fire rarely.",
        "",
        f"Subcomponent {key}: {location(h, summary['module'])}.",
        f"It fires on {100 * density:.3g}% of {unit} (about 1 in {max(1, round(1 / density))}) "
        f"over {h.n_tokens} harvested {unit}; mean CI {summary['mean_ci']:.3g}.",
    ]
    if lm:
        src = h.meta["source"]
        lines.append(f"The dataset is {src['dataset']!r} (split {src['split']!r}).")
    heading = "Input tokens where it fires:" if lm else "Input features active when it fires:"
    lines += ["", heading]

    def tokens(side: str, measure: str, pct: bool) -> str:
        return _token_list(h, key, side, measure, s.n_tokens, pct)

    lines.append(f"- most of its firings (recall): {tokens('input', 'recall', True)}")
    lines.append(f"- most reliably firing (precision): {tokens('input', 'precision', True)}")
    lines.append(f"- most specific (PMI): {tokens('input', 'pmi', False)}")
    if lm:
        lines += ["", "Tokens the model predicts next where it fires:"]
        lines.append(
            "- precision (share of that token's predicted mass): "
            f"{tokens('output', 'precision', True)}"
        )
        lines.append(f"- most specific (PMI): {tokens('output', 'pmi', False)}")
    shown = examples[: s.n_examples]
    lines += [
        "",
        f"Examples ({len(shown)}; the firing token is marked {MARK[0]}like this{MARK[1]}):",
    ]
    for i, e in enumerate(shown, 1):
        lines.append(f"{i}. {example_text(h, e, MARK, min_ci=s.mark_ci)}")
    lines += [
        "",
        "What does this subcomponent respond to, and what does it do to the prediction? Give a "
        "short label (3-10 words). If the evidence is unclear or noisy, say so in the label "
        "rather than forcing one, and set confidence accordingly.",
    ]
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "\n".join(lines)}]
