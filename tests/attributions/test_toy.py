"""Attributions of toy runs: the input features are the sources, the output features the output
targets. On a short real tms_5-2 run the computation equals brute force and the alive filter
follows the harvest (the fully trained run is checked in tests/test_ground_truth.py)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from attr_models import brute_force, dense_from_brute

from spd_ray.analysis.batches import run_batches
from spd_ray.attributions.compute import (
    Accumulator,
    make_layout,
)
from spd_ray.attributions.exact import (
    state_sums,
)
from spd_ray.attributions.layout import (
    Layout,
    alive_components,
    model_kind,
)
from spd_ray.loaded_run import load_run


def test_short_tms_run_equals_brute_force(short_tms: Path) -> None:
    loaded = load_run(short_tms)
    model = loaded.model.double()
    alive = alive_components(model, loaded.run_dir, 0.0)
    assert (
        alive.source == "all"
        and "no harvest" in alive.message
        and "40 subcomponents" in alive.message
    )
    layout = make_layout(model, model_kind(loaded.config), alive.indices)
    assert (layout.n_inputs, layout.n_outputs, layout.n_components) == (5, 5, 40)
    x = next(run_batches(loaded, 64, seed=1)).double()
    acc = Accumulator(model, layout, targets_per_backward=8)
    acc.add(x)
    expected = dense_from_brute(brute_force(model, "toy", x)[0], layout, model)
    torch.testing.assert_close(state_sums(acc.state()), expected, rtol=1e-6, atol=1e-12)
    assert expected.abs().sum() > 0


def _fake_harvest(run_dir: Path, mean_ci: dict[str, float]) -> None:
    """A harvest folder with just what the alive filter reads (meta.json and mean CIs)."""
    h = run_dir / "harvest"
    h.mkdir()
    keys = list(mean_ci)
    (h / "meta.json").write_text(
        json.dumps({"component_keys": keys, "n_tokens": 100, "kind": "toy"})
    )
    pq.write_table(
        pa.table({"key": keys, "mean_ci": list(mean_ci.values())}), h / "components.parquet"
    )


def test_alive_filter_reads_the_harvest(short_tms: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "tms"
    shutil.copytree(short_tms, run_dir)
    loaded = load_run(run_dir)
    keys = [f"{p}:{c}" for p in loaded.model.module_paths for c in range(loaded.model.C(p))]
    _fake_harvest(run_dir, {k: (0.2 if i % 3 == 0 else 0.01) for i, k in enumerate(keys)})
    alive = alive_components(loaded.model, run_dir, 0.05)
    assert alive.source == "harvest"
    assert alive.indices == {
        "linear1": [c for c in range(20) if c % 3 == 0],
        "linear2": [c for c in range(20) if (20 + c) % 3 == 0],
    }
    assert alive.message == "14/40 subcomponents alive (harvest mean CI > 0.05)"
    layout: Layout = make_layout(loaded.model, "toy", alive.indices)
    assert layout.n_components == 14 and layout.n_sources == 5 + 14
