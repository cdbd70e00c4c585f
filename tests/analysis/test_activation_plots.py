"""`spd-ray plot-activations`: per-subcomponent normalised activations where CI fires."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_args import spd_ray_cmd

from spd_ray.analysis.activation_plots import (
    FIGURES_SUBDIR,
    activation_points,
    min_max,
    order_by_count,
    order_by_median,
    plot_activations,
)
from spd_ray.analysis.batches import run_batches
from spd_ray.loaded_run import load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
N_BATCHES, BATCH_SIZE, THRESHOLD = 4, 64, 0.1


@pytest.fixture(scope="module")
def tms_run(short_tms: Path) -> Path:
    """A short tms_5-2 decomposition (a checkpoint, not a good one), shared by the session."""
    return short_tms


def test_min_max() -> None:
    np.testing.assert_allclose(min_max(np.array([2.0, -1.0, 0.5])), [1.0, 0.0, 0.5])
    np.testing.assert_array_equal(min_max(np.array([3.0, 3.0])), [0.5, 0.5])
    np.testing.assert_array_equal(min_max(np.array([-7.0])), [0.5])


def test_points_are_the_normalised_activations_where_ci_fires(tms_run: Path) -> None:
    run = load_run(tms_run)
    model = run.model
    points = activation_points(
        model, run_batches(run, BATCH_SIZE, seed=0), N_BATCHES, ci_threshold=THRESHOLD
    )
    assert list(points) == ["linear1", "linear2"]
    # By hand: the module input times V, times ||U[c]||, where CI > threshold, batch by batch.
    hand: dict[str, list[list[np.ndarray]]] = {p: [[] for _ in range(20)] for p in points}
    batches = run_batches(run, BATCH_SIZE, seed=0)
    with torch.no_grad():
        for _ in range(N_BATCHES):
            _, cache = model.clean_forward(next(batches))
            ci = model.ci_from_cache(cache).lower
            for path in points:
                comps = model.comps(path)
                acts = (cache.inputs[path] @ comps.get_V()) * comps.get_U().norm(dim=1)
                for c in range(20):
                    hand[path][c].append(acts[ci[path][:, c] > THRESHOLD, c].numpy())
    n_alive = 0
    for path, acts in points.items():
        expect = {c: np.concatenate(h) for c, h in enumerate(hand[path]) if sum(map(len, h))}
        assert acts.alive == sorted(expect), path
        assert acts.counts == [len(expect[c]) for c in acts.alive]
        for c, raw, scaled in zip(acts.alive, acts.raw, acts.scaled, strict=True):
            np.testing.assert_allclose(raw, expect[c], rtol=1e-5, atol=1e-6)
            assert scaled.min() >= 0.0 and scaled.max() <= 1.0
            if np.ptp(raw) > 0:
                assert scaled.min() == 0.0 and scaled.max() == pytest.approx(1.0, abs=1e-6)
                np.testing.assert_allclose(
                    scaled, (raw - raw.min()) / np.ptp(raw), rtol=1e-5, atol=1e-6
                )
        n_alive += len(acts.alive)
        medians = [np.median(acts.scaled[i]) for i in order_by_median(acts)]
        assert all(x <= y for x, y in zip(medians, medians[1:], strict=False)), path
        counts = [acts.counts[i] for i in order_by_count(acts)]
        assert all(x >= y for x, y in zip(counts, counts[1:], strict=False)), path
        assert sorted(order_by_median(acts)) == sorted(order_by_count(acts))
        assert sorted(order_by_count(acts)) == list(range(len(acts.alive)))
    assert n_alive > 5  # enough alive subcomponents for the checks above to mean something


def test_plot_writes_pngs_under_the_run(tms_run: Path) -> None:
    paths = plot_activations(tms_run, n_batches=2, batch_size=64)
    folder = tms_run / FIGURES_SUBDIR
    assert paths == [
        folder / f"{m}-{kind}.png"
        for m in ("linear1", "linear2")
        for kind in ("by-median", "by-count")
    ]
    for path in paths:
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, path
    assert sorted(p.name for p in folder.iterdir()) == sorted(p.name for p in paths)  # no temps


@pytest.mark.slow  # CI keeps the compare CLI test
def test_cli_prints_the_png_paths(tms_run: Path) -> None:
    folder = tms_run / FIGURES_SUBDIR
    for old in folder.glob("*.png"):
        old.unlink()
    argv = spd_ray_cmd("plot-activations", "tms", "--out", str(tms_run.parent))
    res = subprocess.run(
        [*argv, "--batches", "2", "--ci-threshold", "0.2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    printed = [Path(line) for line in res.stdout.split()]
    assert len(printed) == 4 and all(p.parent == folder and p.exists() for p in printed)
    bad = subprocess.run(
        [*argv, "--ci-threshold", "-1"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and "--ci-threshold" in bad.stderr
