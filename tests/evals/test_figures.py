from pathlib import Path

import numpy as np
import pytest
import torch
from matplotlib.figure import Figure

from spd_ray.evals import figures


def _saved(fig: Figure, tmp_path: Path, name: str) -> Path:
    (path,) = figures.save_figures({name: fig}, tmp_path / "figs", step=7)
    assert path == tmp_path / "figs" / f"{name}_7.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size > 1000
    return path


def test_ci_histograms(tmp_path):
    g = torch.Generator().manual_seed(0)
    values = {"a": torch.rand(8, 4, 5, generator=g), "b": torch.zeros(8, 3)}  # b: constant values
    _saved(figures.ci_histograms(values, "lower CI"), tmp_path, "ci_histograms")


def test_permuted_ci_heatmaps(tmp_path):
    ci = {"in": torch.eye(4)[:, [3, 1, 0, 2]], "out": torch.rand(4, 6)}
    fig = figures.permuted_ci_heatmaps(ci, None, ["out"], cmap="Reds")
    _saved(fig, tmp_path, "causal_importances")


def test_uv_heatmaps(tmp_path):
    V = {"b": torch.randn(4, 3), "a": torch.randn(5, 2)}
    U = {"b": torch.randn(3, 6), "a": torch.zeros(2, 5)}
    perms = {"b": torch.tensor([2, 0, 1]), "a": np.array([1, 0])}
    _saved(figures.uv_heatmaps(V, U, perms), tmp_path, "uv")
    with pytest.raises(AssertionError, match="same modules"):
        figures.uv_heatmaps(V, U, {"b": perms["b"]})


def test_activation_density_and_mean(tmp_path):
    d = {"a": torch.rand(10), "b": torch.zeros(4)}
    _saved(figures.activation_density_hist(d), tmp_path, "density")
    _saved(figures.ci_mean_per_component(d), tmp_path, "ci_mean")


def test_save_figures_many_and_bad_name(tmp_path):
    figs = {"one": Figure(), "two": Figure()}
    paths = figures.save_figures(figs, tmp_path / "x" / "y", step=0)
    assert [p.name for p in paths] == ["one_0.png", "two_0.png"]
    assert all(p.exists() for p in paths)
    with pytest.raises(ValueError, match="figure name"):
        figures.save_figures({"a/b": Figure()}, tmp_path, step=0)
