"""Compare two decompositions of the same target: for every subcomponent of run A that fires, the
best |cosine| of its rank-one weight against all of run B's subcomponents of the same module.

Near 1 everywhere means B found the same mechanisms as A (up to order and sign); the reference's
`compare_models`. Only A's firing subcomponents are scored: a dead one has an arbitrary weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float, Int
from torch import Tensor

from spd_ray.analysis.batches import run_batches
from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError
from spd_ray.io import write_json
from spd_ray.loaded_run import LoadedRun, load_run

COMPARISON_FILE = "comparison.json"


def best_abs_cosine(
    wa: Float[Tensor, "Ca d"], wb: Float[Tensor, "Cb d"]
) -> tuple[Float[Tensor, " Ca"], Int[Tensor, " Ca"]]:
    """For each row of `wa`, the largest |cosine| with any row of `wb` and that row's index (the
    first on ties). A zero row scores 0 (it points nowhere)."""
    assert wa.dim() == 2 and wb.dim() == 2, f"want [C, d] matrices, got {wa.shape}, {wb.shape}"
    assert wa.shape[1] == wb.shape[1], f"row lengths differ: {wa.shape[1]} vs {wb.shape[1]}"
    return _best(_unit_rows(wa) @ _unit_rows(wb).T)


def rank_one_abs_cosines(
    va: Float[Tensor, "d_in Ca"],
    ua: Float[Tensor, "Ca d_out"],
    vb: Float[Tensor, "d_in Cb"],
    ub: Float[Tensor, "Cb d_out"],
) -> Float[Tensor, "Ca Cb"]:
    """|cosine| between every flattened rank-one matrix V[:, c] U[c, :] of A and of B, without
    forming them (an LM's [C, d_out, d_in] would not fit): <v u^T, v' u'^T>_F = (v.v')(u.u'),
    so the cosine is cos(v, v') cos(u, u')."""
    assert va.shape[0] == vb.shape[0] and ua.shape[1] == ub.shape[1], (
        f"shapes differ: V {tuple(va.shape)} vs {tuple(vb.shape)}, "
        f"U {tuple(ua.shape)} vs {tuple(ub.shape)}"
    )
    assert va.shape[1] == ua.shape[0] and vb.shape[1] == ub.shape[0], "V and U disagree on C"
    cos_v = _unit_rows(va.T) @ _unit_rows(vb.T).T
    cos_u = _unit_rows(ua) @ _unit_rows(ub).T
    return (cos_v * cos_u).abs()


def _unit_rows(w: Tensor) -> Tensor:
    w = w.detach().double()
    return w / w.norm(dim=1, keepdim=True).clamp_min(1e-300)


def _best(cos: Float[Tensor, "Ca Cb"]) -> tuple[Tensor, Tensor]:
    assert cos.shape[1] >= 1, "nothing to compare against"
    scores, idx = cos.abs().max(dim=1)
    return scores.clamp(max=1.0), idx


@torch.no_grad()
def firing_density(
    model: ComponentModel, batches: Iterable[Tensor], n_batches: int, ci_threshold: float = 0.0
) -> dict[str, Float[Tensor, " C"]]:
    """Per module, the fraction of inputs (positions, for sequences) where each subcomponent's
    lower-leaky CI exceeds `ci_threshold`, over `n_batches` batches from `batches`."""
    if n_batches < 1:
        raise InputError(f"n_batches must be >= 1, got {n_batches}")
    counts = {path: torch.zeros(model.C(path), dtype=torch.int64) for path in model.module_paths}
    total = 0
    for _, batch in zip(range(n_batches), batches, strict=False):
        ci = model.causal_importances(batch)
        rows = set()
        for path in model.module_paths:
            flat = ci[path].reshape(-1, model.C(path))
            counts[path] += (flat > ci_threshold).sum(0).cpu()
            rows.add(flat.shape[0])
        assert len(rows) == 1, f"modules saw different numbers of positions: {rows}"
        total += rows.pop()
    assert total > 0, "no batches were read"
    return {path: c.double() / total for path, c in counts.items()}


def _stats(scores: list[float]) -> dict[str, Any]:
    if not scores:
        return {"n_kept": 0, "mean": None, "std": None, "min": None, "max": None}
    t = torch.tensor(scores, dtype=torch.float64)
    return {
        "n_kept": len(scores),
        "mean": t.mean().item(),
        "std": t.std(unbiased=False).item(),  # population std: defined for one subcomponent too
        "min": t.min().item(),
        "max": t.max().item(),
    }


def _factors(model: ComponentModel, path: str) -> tuple[Tensor, Tensor]:
    comps = model.comps(path)
    return comps.get_V(), comps.get_U()


def shared_modules(model_a: ComponentModel, model_b: ComponentModel) -> list[str]:
    """Module paths decomposed in both models, in A's order; an error when there are none, or
    when a shared module's weight has different shapes in the two (C may differ)."""
    shared = [p for p in model_a.module_paths if p in model_b.module_paths]
    if not shared:
        raise InputError(
            f"the runs share no decomposed module: A has {model_a.module_paths}, "
            f"B has {model_b.module_paths}"
        )
    for path in shared:
        (va, ua), (vb, ub) = _factors(model_a, path), _factors(model_b, path)
        sa, sb = (ua.shape[1], va.shape[0]), (ub.shape[1], vb.shape[0])
        if sa != sb:
            raise InputError(
                f"module '{path}' has weight shape (d_out, d_in) {sa} in run A but {sb} in run B"
            )
    return shared


@torch.no_grad()
def compare_models(
    model_a: ComponentModel,
    model_b: ComponentModel,
    density: dict[str, Tensor],
    density_threshold: float,
) -> dict[str, Any]:
    """Per shared module, A's subcomponents with `density` above `density_threshold` scored by
    their best |cosine| against B's: {"modules": {path: stats + "subcomponents"}, "overall":
    stats over every kept subcomponent}."""
    modules: dict[str, Any] = {}
    every: list[float] = []
    for path in shared_modules(model_a, model_b):
        dens = density[path]
        assert dens.shape == (model_a.C(path),), f"{path}: density shape {tuple(dens.shape)}"
        kept = torch.nonzero(dens > density_threshold).flatten()
        rows: list[dict[str, Any]] = []
        if len(kept):
            va, ua = _factors(model_a, path)
            scores, idx = _best(
                rank_one_abs_cosines(va[:, kept], ua[kept], *_factors(model_b, path))
            )
            for c, s, j in zip(kept.tolist(), scores.tolist(), idx.tolist(), strict=True):
                rows.append({"index": c, "density": dens[c].item(), "best": s, "match": j})
        best = [r["best"] for r in rows]
        every += best
        modules[path] = {
            "C_a": model_a.C(path),
            "C_b": model_b.C(path),
            **_stats(best),
            "subcomponents": rows,
        }
    return {"modules": modules, "overall": _stats(every)}


def compare_loaded(
    a: LoadedRun,
    b: LoadedRun,
    density_threshold: float = 0.001,
    n_batches: int = 5,
    batch_size: int = 32,
    seed: int = 0,
    ci_threshold: float = 0.0,
    out: str | Path | None = None,
) -> dict[str, Any]:
    """`compare_models` of two loaded runs, the density measured on `n_batches` batches of A's
    own data; the result also names the runs and the settings. Writes nothing."""
    if not 0.0 <= density_threshold <= 1.0:
        raise InputError(f"density threshold must be in [0, 1], got {density_threshold}")
    batches = run_batches(a, batch_size, seed, out)
    density = firing_density(a.model, batches, n_batches, ci_threshold)
    return {
        "run_a": str(a.run_dir),
        "run_b": str(b.run_dir),
        "step_a": a.step,
        "step_b": b.step,
        "settings": {
            "density_threshold": density_threshold,
            "n_batches": n_batches,
            "batch_size": batch_size,
            "seed": seed,
            "ci_threshold": ci_threshold,
        },
        **compare_models(a.model, b.model, density, density_threshold),
    }


def compare_runs(
    run_a: str | Path,
    run_b: str | Path,
    out: str | Path | None = None,
    density_threshold: float = 0.001,
    n_batches: int = 5,
    batch_size: int = 32,
    seed: int = 0,
    ci_threshold: float = 0.0,
) -> dict[str, Any]:
    """Load both runs (directories or names under `out`), compare them and write
    `<run A>/comparison.json` atomically; returns what it wrote."""
    a, b = load_run(run_a, out), load_run(run_b, out)
    result = compare_loaded(a, b, density_threshold, n_batches, batch_size, seed, ci_threshold, out)
    write_json(a.run_dir / COMPARISON_FILE, result)
    return result


def _num(x: float | None) -> str:
    return "-" if x is None or math.isnan(x) else f"{x:.4f}"


def format_table(result: dict[str, Any]) -> str:
    """The runs, then one line per module and one overall: kept subcomponents of A (of its C) and
    the mean/std/min/max of their best |cos| against B."""
    header = ("module", "kept", "mean", "std", "min", "max")
    rows = [
        (path, f"{m['n_kept']}/{m['C_a']}", *(_num(m[k]) for k in ("mean", "std", "min", "max")))
        for path, m in result["modules"].items()
    ]
    o = result["overall"]
    rows.append(("overall", str(o["n_kept"]), *(_num(o[k]) for k in ("mean", "std", "min", "max"))))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(r: tuple[str, ...]) -> str:
        pairs = enumerate(zip(r, widths, strict=True))
        cells = (s.ljust(w) if i == 0 else s.rjust(w) for i, (s, w) in pairs)
        return "  ".join(cells).rstrip()

    head = f"A: {result['run_a']}\nB: {result['run_b']}\nbest |cos| of A's firing subcomponents"
    return "\n".join([head, line(header), *(line(r) for r in rows)])
