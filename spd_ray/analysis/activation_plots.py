"""Per-module scatter plots of each subcomponent's activations on the inputs where it fires: the
normalised activation (v_c^T a) ||U[c]|| (free of the V/U scale ambiguity), min-max normalised
per subcomponent, with subcomponents ordered by median and by firing count.

A subcomponent whose firing activations spread over [0, 1] reads its input with graded strength;
one bunched at the ends acts as an on/off switch (the by-count figure plots |x - 0.5| to show it).
The reference's `plot_component_activations`.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float
from matplotlib.figure import Figure
from torch import Tensor

from spd_ray.analysis.batches import run_batches
from spd_ray.core.model import ComponentModel
from spd_ray.errors import InputError
from spd_ray.io import atomic_write, safe_name
from spd_ray.loaded_run import load_run

FIGURES_SUBDIR = Path("figures") / "component-activations"
DPI = 100


@dataclass
class ModuleActivations:
    """One module's firing activations; lists run over `alive` (subcomponents that fired at
    least once), in index order."""

    path: str
    C: int
    alive: list[int]
    raw: list[np.ndarray]  # (v_c^T a) ||U[c]|| where CI > threshold
    scaled: list[np.ndarray]  # raw min-max normalised to [0, 1]; all 0.5 when raw is constant

    @property
    def counts(self) -> list[int]:
        return [len(r) for r in self.raw]


def min_max(x: np.ndarray) -> np.ndarray:
    """`x` mapped affinely onto [0, 1]; a constant (or single) value maps to 0.5."""
    lo, hi = float(x.min()), float(x.max())
    if hi == lo:
        return np.full_like(x, 0.5)
    return (x - lo) / (hi - lo)


@torch.no_grad()
def activation_points(
    model: ComponentModel,
    batches: Iterable[Tensor],
    n_batches: int,
    ci_threshold: float = 0.1,
) -> dict[str, ModuleActivations]:
    """Per module, every subcomponent's normalised activations on the inputs (positions, for
    sequences) of `n_batches` batches where its lower-leaky CI exceeds `ci_threshold`."""
    if n_batches < 1:
        raise InputError(f"n_batches must be >= 1, got {n_batches}")
    pieces: dict[str, list[list[np.ndarray]]] = {
        p: [[] for _ in range(model.C(p))] for p in model.module_paths
    }
    for _, batch in zip(range(n_batches), batches, strict=False):
        _, cache = model.clean_forward(batch)
        ci = model.ci_from_cache(cache).lower
        for path in model.module_paths:
            C = model.C(path)
            u_norm: Float[Tensor, " C"] = model.comps(path).get_U().norm(dim=1)
            acts = (cache.acts(path) * u_norm).reshape(-1, C)
            fired = ci[path].reshape(-1, C) > ci_threshold
            assert acts.shape == fired.shape, f"{path}: acts {acts.shape} vs CI {fired.shape}"
            rows, cols = torch.nonzero(fired, as_tuple=True)
            values = acts[rows, cols].float().cpu().numpy()
            cols_np = cols.cpu().numpy()
            order = np.argsort(cols_np, kind="stable")
            splits = np.searchsorted(cols_np[order], np.arange(C + 1))
            for c in range(C):
                if splits[c + 1] > splits[c]:
                    pieces[path][c].append(values[order[splits[c] : splits[c + 1]]])
    result = {}
    for path, per_c in pieces.items():
        alive = [c for c, ps in enumerate(per_c) if ps]
        raw = [np.concatenate(per_c[c]) for c in alive]
        result[path] = ModuleActivations(path, model.C(path), alive, raw, [min_max(r) for r in raw])
    return result


def order_by_median(acts: ModuleActivations) -> list[int]:
    """Positions into `acts.alive`, by ascending median of the scaled activations."""
    medians = [float(np.median(s)) for s in acts.scaled]
    return sorted(range(len(acts.alive)), key=lambda i: (medians[i], acts.alive[i]))


def order_by_count(acts: ModuleActivations) -> list[int]:
    """Positions into `acts.alive`, most firings first."""
    counts = acts.counts
    return sorted(range(len(acts.alive)), key=lambda i: (-counts[i], acts.alive[i]))


def _scatter(
    acts: ModuleActivations, order: list[int], fold: bool, title: str, xlabel: str
) -> Figure:
    n = len(order)
    fig = Figure(figsize=(min(max(6.0, 0.12 * n), 30.0), 4.0), dpi=DPI)
    ax = fig.add_subplot()
    for x, i in enumerate(order):
        y = np.abs(acts.scaled[i] - 0.5) if fold else acts.scaled[i]
        ax.scatter(np.full(len(y), x), y, s=3, alpha=0.3, color="tab:blue", linewidths=0)
    if n == 0:
        ax.text(0.5, 0.5, "no subcomponent fires", ha="center", va="center")
    elif n <= 40:
        ax.set_xticks(range(n), [str(acts.alive[i]) for i in order], fontsize=7, rotation=90)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("|x - 0.5|" if fold else "min-max normalised activation")
    ax.set_ylim(-0.02, 0.52 if fold else 1.02)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def activation_figures(acts: ModuleActivations, ci_threshold: float) -> dict[str, Figure]:
    """{"by-median": figure, "by-count": figure} for one module."""
    where = f"{acts.path}: {len(acts.alive)}/{acts.C} subcomponents with CI > {ci_threshold}"
    return {
        "by-median": _scatter(
            acts, order_by_median(acts), False, where, "subcomponent (by median)"
        ),
        "by-count": _scatter(
            acts, order_by_count(acts), True, where, "subcomponent (by firing count, most first)"
        ),
    }


def plot_activations(
    run: str | Path,
    out: str | Path | None = None,
    ci_threshold: float = 0.1,
    n_batches: int = 10,
    batch_size: int = 64,
    seed: int = 0,
) -> list[Path]:
    """Write `<run>/figures/component-activations/<module>-by-median.png` and `-by-count.png` for
    every decomposed module of the run, from `n_batches` batches of its own data; returns the
    paths."""
    loaded = load_run(run, out)
    points = activation_points(
        loaded.model, run_batches(loaded, batch_size, seed, out), n_batches, ci_threshold
    )
    folder = loaded.run_dir / FIGURES_SUBDIR
    folder.mkdir(parents=True, exist_ok=True)
    names = {path: safe_name(path) for path in points}
    assert len(set(names.values())) == len(names), f"module file names collide: {names}"
    paths = []
    for path, acts in points.items():
        for kind, fig in activation_figures(acts, ci_threshold).items():
            dest = folder / f"{names[path]}-{kind}.png"
            _save_png(fig, dest)
            paths.append(dest)
    return paths


def _save_png(fig: Figure, dest: Path) -> None:
    # The format is explicit: the temporary file's name ends in .tmp.
    atomic_write(dest, lambda p: fig.savefig(p, format="png"))
