"""A readable text summary of one subcomponent's harvest (`spd-ray harvest-show`), and the token
decoding that autointerp prompts share."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from spd_ray.harvest.measures import PAIR_MEASURES, TOKEN_MEASURES, Ranked
from spd_ray.harvest.store import Example, Harvest


@lru_cache(maxsize=4)
def _tokenizer(name: str) -> Any:
    from spd_ray.data.lm import load_tokenizer

    return load_tokenizer(name)


def token_text(h: Harvest, token_id: int) -> str:
    """A token as text (LM: decoded with the run's tokenizer; toy: `feature <i>`)."""
    if h.kind != "lm":
        return f"feature {token_id}"
    name = h.meta["source"].get("tokenizer")
    if name is None:
        return f"<{token_id}>"
    return str(_tokenizer(name).decode([token_id]))


def example_text(
    h: Harvest,
    ex: Example,
    mark: tuple[str, str] = ("[[", "]]"),
    min_ci: float | None = None,
    marked: int | None = None,
) -> str:
    """A window as text with the firing token (or the window position `marked`) marked, and,
    when `min_ci` is given, every other token of the window where this subcomponent's CI exceeds
    it."""
    if ex.tokens is None:
        assert ex.x is not None
        vec = ", ".join(f"{v:.2f}" for v in ex.x)
        return f"x=[{vec}]  ci={float(ex.ci):.3f} act={float(ex.act):+.3f}"  # type: ignore[arg-type]
    ci = ex.ci if isinstance(ex.ci, list) else [ex.ci]
    parts = []
    for j, tok in enumerate(ex.tokens):
        if tok < 0:
            continue
        text = token_text(h, tok)
        centre = ex.center if marked is None else marked
        hit = j == centre or (min_ci is not None and ci[j] > min_ci)
        parts.append(f"{mark[0]}{text}{mark[1]}" if hit else text)
    return "".join(parts).replace("\n", "\\n")


def _ranked_line(h: Harvest, r: Ranked, label: Any) -> str:
    items = [
        f"{label(int(i))} {v:.3g} (n={c:.3g})"
        for i, v, c in zip(r.index, r.value, r.count, strict=True)
    ]
    return ", ".join(items) if items else "-"


def _top_k_note(h: Harvest, s: dict[str, Any]) -> str:
    """How much of the predicted-token mass top-k left out (nothing for exact harvests)."""
    k = h.meta["settings"].get("output_top_k", 0)  # harvests before top-k: exact
    if not k:
        return ""
    left = s.get("output_dropped_per_firing", 0.0)
    return f" (top {k} per position; {left:.3g} of the mass per firing left out)"


def render_component(h: Harvest, key: str, n_examples: int = 5, k: int = 8) -> str:
    s = h.summary(key)
    lines = [
        f"{s['key']}  (module {s['module']}, index {s['c']})",
        f"  fires on {s['firing_count']} of {h.n_tokens} {'tokens' if h.kind == 'lm' else 'inputs'}"
        f" (density {s['firing_density']:.4g}); mean CI {s['mean_ci']:.4g};"
        f" mean |act| when firing {s['mean_abs_act_firing']:.4g}",
    ]
    if s["firing_count"] == 0:
        lines.append("  never fires in this harvest")
        return "\n".join(lines)
    side_names = [("input", "input tokens" if h.kind == "lm" else "active input features")]
    if h.kind == "lm":
        side_names.append(("output", f"predicted tokens{_top_k_note(h, s)}"))
    for side, title in side_names:
        lines.append(f"  {title}:")
        for m in TOKEN_MEASURES:
            r = h.tokens(key, side, m, k)
            lines.append(f"    {m:9s} {_ranked_line(h, r, lambda t: repr(token_text(h, t)))}")
    lines.append("  co-firing subcomponents:")
    for m in PAIR_MEASURES:
        r = h.correlated(key, m, k)
        lines.append(f"    {m:9s} {_ranked_line(h, r, lambda i: h.keys[i])}")
    examples = h.examples(key)
    for kind, title in (("top", "top-activating examples"), ("reservoir", "random examples")):
        chosen = [e for e in examples if e.kind == kind][:n_examples]
        lines.append(f"  {title} ({sum(e.kind == kind for e in examples)} kept):")
        for e in chosen:
            where = f"doc {e.doc} @{e.offset}" if h.kind == "lm" else f"input {e.doc}"
            ci = e.ci[e.center] if isinstance(e.ci, list) else e.ci
            act = e.act[e.center] if isinstance(e.act, list) else e.act
            lines.append(f"    [{where}, ci {ci:.3f}, act {act:+.3f}] {example_text(h, e)}")
    return "\n".join(lines)
