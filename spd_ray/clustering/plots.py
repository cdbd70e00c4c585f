"""A clustering's figures (matplotlib Figures, no pyplot; PNGs written atomically under plots/):
cluster sizes and MDL over iterations, member 0's co-activation and merge matrices, and the
distances between members over iterations."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from spd_ray.clustering import store
from spd_ray.clustering.merge import MergeHistory
from spd_ray.io import atomic_write

DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=DPI, format="png"))
    return path


def group_sizes(ids: np.ndarray) -> np.ndarray:
    """Sizes of the groups of one row, largest first."""
    return np.sort(np.bincount(ids))[::-1]


def sizes_figure(histories: list[MergeHistory]) -> Figure:
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_max, ax_multi = fig.subplots(1, 2)
    for m, h in enumerate(histories):
        rows = range(h.group_idxs.shape[0])
        largest = [int(group_sizes(h.group_idxs[t])[0]) for t in rows]
        multi = [int((group_sizes(h.group_idxs[t]) > 1).sum()) for t in rows]
        ax_max.plot(list(rows), largest, label=f"member {m}", lw=1)
        ax_multi.plot(list(rows), multi, lw=1)
    ax_max.set(xlabel="iteration", ylabel="largest group", title="cluster sizes")
    ax_multi.set(xlabel="iteration", ylabel="groups of 2 or more", title="merged groups")
    if len(histories) <= 10:
        ax_max.legend(fontsize=7)
    return fig


def mdl_figure(histories: list[MergeHistory]) -> Figure:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for m, h in enumerate(histories):
        ax.plot(h.k_groups, h.mdl, lw=1, label=f"member {m}")
    ax.set(xlabel="groups k", ylabel="MDL (bits per sample)", title="MDL over the merge")
    ax.invert_xaxis()
    if len(histories) <= 10:
        ax.legend(fontsize=7)
    return fig


def matrix_figure(matrix: np.ndarray, title: str, labels: list[str] | None = None) -> Figure:
    fig = Figure(figsize=(7, 6), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(matrix, aspect="auto", interpolation="nearest", cmap="viridis")
    fig.colorbar(im, ax=ax)
    ax.set_title(title)
    if labels is not None and len(labels) <= 64:
        ax.set_yticks(range(len(labels)), labels, fontsize=6)
    return fig


def merge_matrix(ids: np.ndarray) -> np.ndarray:
    """[n, k] one-hot group membership, rows ordered by group."""
    order = np.argsort(ids, kind="stable")
    k = int(ids.max()) + 1
    out = np.zeros((ids.size, k), dtype=np.int8)
    out[np.arange(ids.size), ids[order]] = 1
    return out


def distances_figure(method: str, d: np.ndarray, n: int) -> Figure:
    fig = Figure(figsize=(10, 4), layout="constrained")
    ax_line, ax_hist = fig.subplots(1, 2)
    lower = np.tril_indices(d.shape[1], -1)
    values = d[:, lower[0], lower[1]] / max(n, 1)  # [T + 1, pairs]
    rows = np.arange(values.shape[0])
    mean, std = values.mean(axis=1), values.std(axis=1)
    ax_line.plot(rows, mean, lw=1)
    ax_line.fill_between(rows, mean - std, mean + std, alpha=0.3)
    ax_line.set(xlabel="iteration", ylabel=f"{method} / n", title="distance between members")
    for frac in (0.25, 0.5, 0.75, 1.0):
        t = min(values.shape[0] - 1, int(frac * (values.shape[0] - 1)))
        ax_hist.hist(values[t], bins=20, alpha=0.5, label=f"iteration {t}")
    ax_hist.set(xlabel=f"{method} / n", ylabel="member pairs", title="distribution")
    ax_hist.legend(fontsize=7)
    return fig


def write_plots(
    root: Path,
    histories: list[MergeHistory],
    array: np.ndarray,
    distances: dict[str, np.ndarray],
) -> list[Path]:
    out = root / "plots"
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        _save(sizes_figure(histories), out / "cluster_sizes.png"),
        _save(mdl_figure(histories), out / "mdl.png"),
    ]
    coact = store.member_path(root, 0).with_suffix(".coact.npz")
    first = histories[0]
    if coact.exists():
        with np.load(coact) as z:
            co = z["coactivation"]
        paths.append(
            _save(matrix_figure(co, "co-activation (member 0)", first.labels), out / "coact.png")
        )
    half = first.group_idxs[first.group_idxs.shape[0] // 2]
    paths.append(
        _save(
            matrix_figure(merge_matrix(half), f"merge matrix at k = {int(half.max()) + 1}"),
            out / "merge_matrix.png",
        )
    )
    for method, d in distances.items():
        if d.shape[1] >= 2:
            paths.append(
                _save(distances_figure(method, d, array.shape[2]), out / f"distances_{method}.png")
            )
    return paths
