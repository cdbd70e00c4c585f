"""Eval figures: functions of tensors that return matplotlib Figures, and a helper saving them.

Figures are built as `matplotlib.figure.Figure` objects, never through pyplot: they are not
registered with any GUI backend, so nothing leaks between evals and no `plt.close` is needed; the
garbage collector frees each figure once dropped, and `savefig` renders PNGs with Agg.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from jaxtyping import Float, Int
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import Tensor

from spd_ray.errors import InputError
from spd_ray.evals.target_solutions import permute_by_pattern

DPI = 100
N_BINS = 100


def _np(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, np.ndarray):
        return x
    return x.detach().to(device="cpu", dtype=torch.float32).numpy()


def _grid(
    n: int, ncols: int, panel: tuple[float, float], title: str | None = None
) -> tuple[Figure, list[Axes]]:
    """A figure with n panels in rows of at most `ncols`; surplus axes are hidden."""
    assert n > 0, "no layers to plot"
    ncols = min(n, ncols)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(panel[0] * ncols, panel[1] * nrows), dpi=DPI, layout="constrained")
    axes = list(fig.subplots(nrows, ncols, squeeze=False).flat)
    for ax in axes[n:]:
        ax.set_visible(False)
    if title is not None:
        fig.suptitle(title)
    return fig, axes[:n]


def _histogram(values: Tensor, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts, edges) computed on the values' device, so only `bins` numbers are copied."""
    v = values.detach().flatten().float()
    lo, hi = v.min().item(), v.max().item()
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    counts = torch.histc(v, bins=bins, min=lo, max=hi)
    return _np(counts), np.linspace(lo, hi, bins + 1)


def ci_histograms(values: dict[str, Float[Tensor, "... C"]], title: str) -> Figure:
    """100-bin log-y histogram of every value per layer (lower CI or pre-sigmoid values)."""
    fig, axes = _grid(len(values), ncols=3, panel=(4.0, 3.0), title=title)
    for ax, (path, v) in zip(axes, values.items(), strict=True):
        counts, edges = _histogram(v, N_BINS)
        ax.hist(edges[:-1], bins=list(edges), weights=counts, log=True)
        ax.set_title(path, fontsize=9)
        ax.set_xlabel("value")
        ax.set_ylabel("count")
    return fig


def permuted_ci_heatmaps(
    ci: dict[str, Float[Tensor, "n_features C"]],
    identity_patterns: list[str] | None,
    dense_patterns: list[str] | None,
    cmap: str = "Blues",
) -> Figure:
    """Single-feature CI matrices, columns permuted to the identity (dense-sorted for layers
    matching `dense_patterns`), one panel with a colorbar per layer."""
    permuted = permute_by_pattern(ci, identity_patterns, dense_patterns)
    fig, axes = _grid(len(ci), ncols=1, panel=(7.0, 3.0))
    for ax, (path, (m, _)) in zip(axes, permuted.items(), strict=True):
        im = ax.imshow(_np(m), aspect="auto", cmap=cmap, vmin=0.0, vmax=1.0, interpolation="none")
        fig.colorbar(im, ax=ax)
        ax.set_title(path, fontsize=9)
        ax.set_xlabel("subcomponent (permuted)")
        ax.set_ylabel("input feature")
    return fig


def uv_heatmaps(
    V: dict[str, Float[Tensor, "d_in C"]],
    U: dict[str, Float[Tensor, "C d_out"]],
    perms: dict[str, Int[Tensor, " C"] | np.ndarray],
) -> Figure:
    """V and U of each module (sorted by name), subcomponents ordered by `perms[path]`."""
    assert set(V) == set(U) == set(perms), (
        f"V, U and perms must have the same modules: {sorted(V)}, {sorted(U)}, {sorted(perms)}"
    )
    paths = sorted(V)
    fig = Figure(figsize=(10.0, 3.0 * len(paths)), dpi=DPI, layout="constrained")
    axes = fig.subplots(len(paths), 2, squeeze=False)
    for (ax_v, ax_u), path in zip(axes, paths, strict=True):
        perm = _np(perms[path]).astype(np.int64)
        v, u = _np(V[path])[:, perm], _np(U[path])[perm, :]
        for ax, mat, name, xlabel, ylabel in (
            (ax_v, v, "V", "subcomponent", "d_in"),
            (ax_u, u, "U", "d_out", "subcomponent"),
        ):
            lim = float(np.abs(mat).max()) or 1.0
            im = ax.imshow(mat, aspect="auto", cmap="RdBu", vmin=-lim, vmax=lim)
            fig.colorbar(im, ax=ax)
            ax.set_title(f"{path} {name}", fontsize=9)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
    return fig


def activation_density_hist(density: dict[str, Float[Tensor, " C"]]) -> Figure:
    """Per layer, a log-y histogram over subcomponents of their activation density."""
    fig, axes = _grid(len(density), ncols=3, panel=(4.0, 3.0), title="activation density")
    for ax, (path, d) in zip(axes, density.items(), strict=True):
        ax.hist(_np(d), bins=50, range=(0.0, 1.0), log=True)
        ax.set_title(path, fontsize=9)
        ax.set_xlabel("fraction of positions active")
        ax.set_ylabel("subcomponents")
    return fig


def ci_mean_per_component(means: dict[str, Float[Tensor, " C"]]) -> Figure:
    """Per layer, the mean CI of each subcomponent sorted descending, on linear and log y."""
    fig = Figure(figsize=(9.0, 2.8 * len(means)), dpi=DPI, layout="constrained")
    fig.suptitle("mean CI per subcomponent")
    axes = fig.subplots(len(means), 2, squeeze=False)
    for (ax_lin, ax_log), (path, m) in zip(axes, means.items(), strict=True):
        y = np.sort(_np(m))[::-1]
        x = np.arange(len(y))
        ax_lin.scatter(x, y, s=4)
        positive = y > 0  # a log axis has no place for subcomponents that are never important
        ax_log.scatter(x[positive], y[positive], s=4)
        if positive.any():
            ax_log.set_yscale("log")
        for ax, scale in ((ax_lin, "linear"), (ax_log, "log")):
            ax.set_title(f"{path} ({scale})", fontsize=9)
            ax.set_xlabel("subcomponent (sorted)")
            ax.set_ylabel("mean CI")
    return fig


def save_figures(figs: dict[str, Figure], out_dir: Path, step: int) -> list[Path]:
    """Write each figure to `out_dir/<name>_<step>.png` (creating the folder); returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figs.items():
        if not re.fullmatch(r"[\w.-]+", name):
            raise InputError(f"figure name {name!r} must be letters, digits, '_', '.' or '-'")
        path = out_dir / f"{name}_{step}.png"
        fig.savefig(path, dpi=DPI)
        paths.append(path)
    return paths
