"""Sweep results: Pareto fronts against hand-computed ones, the table round trip, best configs
that load as run configs, plots and the status table."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from spd_ray.config import load_config
from spd_ray.registry import load_experiment
from spd_ray.sweep import trial_config
from spd_ray.sweep.results import (
    Objective,
    TrialRow,
    best_rows,
    format_table,
    make_row,
    pareto_front,
    pareto_ranks,
    parse_objective,
    plot_objectives,
    ranked,
    read_table,
    write_best_configs,
    write_table,
)

IMP = "loss_metric_configs.ImportanceMinimalityLoss"


def point(x: float | None, y: float | None) -> TrialRow:
    metrics = {k: v for k, v in (("x", x), ("y", y)) if v is not None}
    return make_row("t", "TERMINATED", {}, metrics)


# index:   0       1       2 (dominated by 1)  3 (= 1)  4       5        6 (failed)   7        8
POINTS = [(1, 5), (2, 3), (3, 3), (2, 3), (4, 1), (5, 5), (None, None), (1, 6), (math.nan, 0)]
ROWS = [point(x, y) for x, y in POINTS]


def test_pareto_front_min_min():
    assert pareto_front(ROWS, [("x", "min"), ("y", "min")]) == [0, 1, 3, 4]  # ties both kept
    assert pareto_ranks(ROWS, [("x", "min"), ("y", "min")]) == [0, 0, 1, 0, 0, 2, None, 1, None]


def test_pareto_front_directions_and_single_objective():
    assert pareto_front(ROWS, [("x", "min"), ("y", "max")]) == [7]
    assert pareto_front(ROWS, [("x", "max"), ("y", "max")]) == [5, 7]
    assert pareto_front(ROWS, [("x", "min")]) == [0, 7]  # tied minimum
    assert best_rows(ROWS, [("x", "min")]) == [0]  # the first of a tie
    assert best_rows(ROWS, [("y", "max")]) == [7]
    # Front sorted by the first objective, then trial order.
    assert best_rows(ROWS, [("y", "min"), ("x", "min")]) == [4, 1, 3, 0]
    assert ranked(ROWS, [("x", "min"), ("y", "min")]) == [0, 1, 3, 4, 7, 2, 5, 6, 8]


def test_pareto_front_three_objectives_and_edge_cases():
    rows = [
        make_row(str(i), "T", {}, dict(zip("abc", v, strict=True)))
        for i, v in enumerate([(1, 1, 1), (0, 2, 2), (2, 2, 2), (1, 1, 1), (2, 0, 3)])
    ]
    assert pareto_front(rows, [("a", "min"), ("b", "min"), ("c", "min")]) == [0, 1, 3, 4]
    assert pareto_front([], [("a", "min")]) == []
    with pytest.raises(ValueError, match="direction"):
        pareto_front(rows, [("a", "lowest")])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="no trial reported y"):
        best_rows([point(1, None)], [("y", "min")])


def test_make_row_and_parse_objective():
    row = make_row(3, "ERROR", {"seed": 1}, {"loss": 1, "date": "today", "done": True})
    assert row == {
        "trial_id": "3",
        "status": "ERROR",
        "params": {"seed": 1},
        "metrics": {"loss": 1.0},
        "iterations": 0,
        "run_dir": None,
    }
    assert parse_objective("eval/loss/StochasticReconLoss:min") == (
        "eval/loss/StochasticReconLoss",
        "min",
    )
    assert parse_objective("a:b:max") == ("a:b", "max")
    with pytest.raises(ValueError, match="<metric>:min"):
        parse_objective("loss")


def trials() -> list[TrialRow]:
    rows = []
    scores = [(1e-4, 0.01, 9.0), (1e-3, 0.02, 4.0), (1e-2, 0.2, 2.0)]
    for i, (coeff, recon, l0) in enumerate(scores):
        params = {
            f"{IMP}.coeff": coeff,
            "seed": i,
            "lr_schedule.fn_type": ["cosine", "linear", "cosine"][i],
            "ci_fn_hidden_dims": [8 * (i + 1)],
            "use_delta_component": i != 1,
        }
        metrics = {"eval/recon": recon, "eval/l0": l0, "train/lr": 1e-3 * (i + 1)}
        rows.append(make_row(f"{i:05d}", "TERMINATED", params, metrics, 100 * (i + 1), f"/r/{i}"))
    failed_params = {**rows[0]["params"], "seed": 7}
    rows.append(make_row("00003", "ERROR", failed_params, {}, 0, None))
    return rows


def test_table_round_trip(tmp_path):
    rows = trials()
    written = write_table(rows, tmp_path / "trials.csv")
    assert written == [tmp_path / "trials.csv", tmp_path / "trials.parquet"]
    header = (tmp_path / "trials.csv").read_text().splitlines()[0].split(",")
    assert header == [
        "trial_id",
        "status",
        f"param/{IMP}.coeff",
        "param/seed",
        "param/lr_schedule.fn_type",
        "param/ci_fn_hidden_dims",
        "param/use_delta_component",
        "metric/eval/recon",
        "metric/eval/l0",
        "metric/train/lr",
        "iterations",
        "run_dir",
    ]
    for path in written:
        assert read_table(path) == rows, path
    frame = pd.read_parquet(tmp_path / "trials.parquet")
    assert frame[f"param/{IMP}.coeff"].dtype == "float64"  # numbers stay numbers
    assert frame["param/seed"].dtype == "int64"


def test_best_configs_load_as_run_configs(tmp_path):
    base = load_experiment("tms_5-2", [])[1]
    rows = trials()
    (tmp_path / "pareto_9.yaml").write_text("stale")
    paths = write_best_configs(rows, [("eval/recon", "min")], base, tmp_path)
    assert paths == [tmp_path / "best.yaml"]
    assert load_config(paths[0]) == trial_config(base, rows[0]["params"])
    assert load_config(paths[0]).loss_metric_configs[0].coeff == 1e-4
    assert paths[0].read_text().startswith("# Best trial 00000")

    objectives: list[Objective] = [("eval/recon", "min"), ("eval/l0", "min")]
    paths = write_best_configs(rows, objectives, base, tmp_path)
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == [
        "pareto_0.yaml",
        "pareto_1.yaml",
        "pareto_2.yaml",
    ]
    for path, i in zip(paths, [0, 1, 2], strict=True):
        assert load_config(path) == trial_config(base, rows[i]["params"])


def test_plots_are_pngs(tmp_path):
    rows = trials()
    cases: tuple[list[Objective], ...] = (
        [("eval/recon", "min")],
        [("eval/recon", "min"), ("eval/l0", "min")],
        [("eval/recon", "min"), ("eval/l0", "min"), ("train/lr", "max")],
    )
    for objectives in cases:
        path = plot_objectives(rows, objectives, tmp_path / f"plot_{len(objectives)}.png")
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_format_table_best_first():
    rows = trials()
    text = format_table(rows, [("eval/l0", "min")])
    lines = text.splitlines()
    assert len(lines) == 5
    assert lines[0].split()[:5] == ["trial", "status", "iter", "eval/l0", "ImpMin.coeff"]
    col = lines[0].index("trial")
    assert [line[col:].split()[0] for line in lines[1:]] == ["00002", "00001", "00000", "00003"]
    assert lines[1].startswith("*") and not lines[2].startswith("*")
    assert lines[4][col:].split()[3] == "-"  # the failed trial has no metric
    starts = {line.index("ERROR") for line in lines if "ERROR" in line}
    assert starts == {lines[1].index("TERMINATED")}  # columns aligned
    assert format_table(rows, max_rows=2).splitlines()[-1] == "... 2 more"
