"""Sweep results: one row per trial -> Pareto fronts, a CSV/parquet table, the best configs as
runnable YAML, objective plots and the text table of `spd-ray sweep-status`. Pure functions of
rows; no Ray.

A row is a `TrialRow`: trial id, status, the trial's flat params, its numeric metrics (final or
last reported), iterations, run folder and, once the trial has started, where it ran (Ray node id
and host name, from its run's `workers.json`). Objectives are `(metric, "min" | "max")`; a row
whose objective metric is missing or not finite (a failed trial) takes no part in rankings.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, NotRequired, TypedDict

import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from spd_ray.config import Config, save_config
from spd_ray.errors import InputError
from spd_ray.io import atomic_write
from spd_ray.sweep.trials import short_key, trial_config

Direction = Literal["min", "max"]
Objective = tuple[str, Direction]


class TrialRow(TypedDict):
    trial_id: str
    status: str
    params: dict[str, Any]
    metrics: dict[str, float]
    iterations: int
    run_dir: str | None
    # Where the trial's (last start of its) workers ran, comma-separated in rank order when
    # several nodes: absent for a trial that never started.
    node_id: NotRequired[str]
    hostname: NotRequired[str]


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def make_row(
    trial_id: str | int,
    status: str,
    params: dict[str, Any],
    metrics: dict[str, Any],
    iterations: int = 0,
    run_dir: str | None = None,
    node_id: str | None = None,
    hostname: str | None = None,
) -> TrialRow:
    """A row; only the numeric entries of `metrics` are kept (a Tune result also holds dates,
    hostnames and the config)."""
    kept = {k: float(v) for k, v in metrics.items() if _is_number(v)}
    row = TrialRow(
        trial_id=str(trial_id),
        status=status,
        params=dict(params),
        metrics=kept,
        iterations=int(iterations),
        run_dir=run_dir,
    )
    if node_id is not None:
        row["node_id"] = node_id
    if hostname is not None:
        row["hostname"] = hostname
    return row


def parse_objective(text: str) -> Objective:
    """`eval/loss/StochasticReconLoss:min` -> ("eval/loss/StochasticReconLoss", "min")."""
    metric, sep, direction = text.rpartition(":")
    if not sep or not metric or direction not in ("min", "max"):
        raise InputError(f"objective {text!r}: expected <metric>:min or <metric>:max")
    return metric, "min" if direction == "min" else "max"


# ---------------------------------------------------------------------------------------------
# Rankings
# ---------------------------------------------------------------------------------------------


def _check(objectives: Sequence[Objective]) -> None:
    if not objectives:
        raise InputError("at least one objective is needed")
    for metric, direction in objectives:
        if direction not in ("min", "max"):
            raise InputError(f"objective {metric}: direction must be 'min' or 'max'")


def _signed(row: TrialRow, objectives: Sequence[Objective]) -> tuple[float, ...] | None:
    """The row's objective values, negated where maximised; None if one is missing/not finite."""
    out = []
    for metric, direction in objectives:
        value = row["metrics"].get(metric)
        if value is None or not _is_number(value) or not math.isfinite(value):
            return None
        out.append(float(value) if direction == "min" else -float(value))
    return tuple(out)


def _dominates(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """a is no worse than b everywhere and strictly better somewhere (all minimised)."""
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def _front(points: dict[int, tuple[float, ...]]) -> list[int]:
    return [
        i
        for i, p in points.items()
        if not any(_dominates(q, p) for j, q in points.items() if j != i)
    ]


def _points(
    rows: Sequence[TrialRow], objectives: Sequence[Objective]
) -> dict[int, tuple[float, ...]]:
    _check(objectives)
    signed = {i: _signed(r, objectives) for i, r in enumerate(rows)}
    return {i: p for i, p in signed.items() if p is not None}


def pareto_front(rows: Sequence[TrialRow], objectives: Sequence[Objective]) -> list[int]:
    """Ascending indices of the rows no other row dominates; equal rows are all kept."""
    return _front(_points(rows, objectives))


def pareto_ranks(rows: Sequence[TrialRow], objectives: Sequence[Objective]) -> list[int | None]:
    """0 for the front, 1 for the front of the rest, ...; None for rows missing an objective."""
    points = _points(rows, objectives)
    ranks: list[int | None] = [None] * len(rows)
    rank = 0
    while points:
        for i in _front(points):
            ranks[i] = rank
            del points[i]
        rank += 1
    return ranks


def ranked(rows: Sequence[TrialRow], objectives: Sequence[Objective]) -> list[int]:
    """Row indices best first: by Pareto rank, then the first objective, then trial order; rows
    missing an objective last, in trial order."""
    ranks = pareto_ranks(rows, objectives)
    done = [i for i, r in enumerate(ranks) if r is not None]
    first = {i: _signed(rows[i], objectives[:1]) for i in done}
    done.sort(key=lambda i: (ranks[i], first[i], i))
    return done + [i for i, r in enumerate(ranks) if r is None]


def best_rows(rows: Sequence[TrialRow], objectives: Sequence[Objective]) -> list[int]:
    """The best row (one objective; the first on ties) or the Pareto front sorted by the first
    objective (several). Raises when no row has every objective."""
    front = set(pareto_front(rows, objectives))
    if not front:
        names = ", ".join(m for m, _ in objectives)
        raise InputError(f"no trial reported {names}")
    order = ranked(rows, objectives)
    return order[:1] if len(objectives) == 1 else [i for i in order if i in front]


# ---------------------------------------------------------------------------------------------
# Table
# ---------------------------------------------------------------------------------------------


def _ordered_keys(dicts: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for d in dicts for k in d))


_MISSING = object()  # a trial without this param: an empty cell
PLACEMENT_KEYS = ("node_id", "hostname")


def _native(values: list[Any]) -> bool:
    """A param column stays a plain column when every trial has a number (or every one a bool);
    other columns hold JSON text."""
    if any(v is _MISSING for v in values):
        return False
    return all(_is_number(v) for v in values) or all(isinstance(v, bool) for v in values)


def table_frame(rows: Sequence[TrialRow]) -> pd.DataFrame:
    """Columns trial_id, status, param/<key>..., metric/<key>..., iterations, run_dir, and
    node_id, hostname when some trial has them."""
    param_keys = _ordered_keys([r["params"] for r in rows])
    metric_keys = _ordered_keys([r["metrics"] for r in rows])
    columns: dict[str, list[Any]] = {
        "trial_id": [str(r["trial_id"]) for r in rows],
        "status": [r["status"] for r in rows],
    }
    for key in param_keys:
        values = [r["params"].get(key, _MISSING) for r in rows]
        native = _native(values)
        columns[f"param/{key}"] = [
            v if native else (None if v is _MISSING else json.dumps(v)) for v in values
        ]
    for key in metric_keys:
        columns[f"metric/{key}"] = [float(r["metrics"].get(key, math.nan)) for r in rows]
    columns["iterations"] = [int(r["iterations"]) for r in rows]
    columns["run_dir"] = [r["run_dir"] for r in rows]
    for key in PLACEMENT_KEYS:
        if any(key in r for r in rows):
            columns[key] = [r.get(key) for r in rows]
    return pd.DataFrame(columns)


def write_table(rows: Sequence[TrialRow], path: Path) -> list[Path]:
    """`path` (.csv) and, when pyarrow is installed, the same table beside it as .parquet."""
    assert path.suffix == ".csv", f"{path}: the table is written as .csv"
    frame = table_frame(rows)
    # Replaced whole: `sweep-status` reads the table while the sweep rewrites it.
    atomic_write(path, lambda p: frame.to_csv(p, index=False))
    written = [path]
    if importlib.util.find_spec("pyarrow") is not None:
        parquet = path.with_suffix(".parquet")
        atomic_write(parquet, lambda p: frame.to_parquet(p, index=False))
        written.append(parquet)
    return written


def _cell(value: Any) -> Any:
    return value.item() if hasattr(value, "item") else value


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def read_table(path: Path) -> list[TrialRow]:
    """Rows from a table written by `write_table` (.csv or .parquet); empty cells are absent."""
    if path.suffix == ".parquet":
        frame = pd.read_parquet(path)
    else:
        as_text = {"trial_id": str, "status": str, "run_dir": str, "node_id": str, "hostname": str}
        frame = pd.read_csv(
            path, dtype=as_text, keep_default_na=False, na_values=[""], float_precision="round_trip"
        )
    plain = pd.api.types.is_numeric_dtype  # bool columns count as numeric too
    json_columns = {c for c in frame.columns if c.startswith("param/") and not plain(frame[c])}
    rows: list[TrialRow] = []
    for rec in frame.to_dict("records"):
        params: dict[str, Any] = {}
        metrics: dict[str, float] = {}
        for col, raw in rec.items():
            value = _cell(raw)
            if _absent(value):
                continue
            kind, _, key = str(col).partition("/")
            if kind == "param":
                is_json = col in json_columns and isinstance(value, str)
                params[key] = json.loads(value) if is_json else value
            elif kind == "metric":
                metrics[key] = float(value)
        run_dir = _cell(rec["run_dir"])
        row = TrialRow(
            trial_id=str(rec["trial_id"]),
            status=str(rec["status"]),
            params=params,
            metrics=metrics,
            iterations=int(rec["iterations"]),
            run_dir=None if _absent(run_dir) else str(run_dir),
        )
        for key in PLACEMENT_KEYS:
            value = _cell(rec.get(key))
            if not _absent(value):
                row[key] = str(value)  # type: ignore[literal-required]
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Best configs
# ---------------------------------------------------------------------------------------------


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return json.dumps(value) if isinstance(value, list | dict) else str(value)


def write_best_configs(
    rows: Sequence[TrialRow],
    objectives: Sequence[Objective],
    base_config: Config,
    out_dir: Path,
) -> list[Path]:
    """`best.yaml` (one objective) or `pareto_<i>.yaml` for each Pareto trial (several, sorted by
    the first objective): `base_config` with the trial's params, runnable by `spd-ray run`.

    `base_config` must be the config the trials started from (launch overrides included).
    Each file is replaced atomically; earlier best/pareto files that are not part of this front
    are removed only after the new ones are in place, so a crash never leaves no best config.
    """
    best = best_rows(rows, objectives)  # raises before any file is touched
    out_dir.mkdir(parents=True, exist_ok=True)
    names = ", ".join(f"{m} ({d})" for m, d in objectives)
    written = []
    for n, i in enumerate(best):
        row = rows[i]
        name = "best.yaml" if len(objectives) == 1 else f"pareto_{n}.yaml"
        path = out_dir / name
        config = trial_config(base_config, row["params"], f"trial {row['trial_id']}")
        scores = ", ".join(f"{m}={_fmt(row['metrics'][m])}" for m, _ in objectives)
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in row["params"].items())
        kind = "Best trial" if len(objectives) == 1 else f"Pareto trial {n + 1}/{len(best)}"
        header = (
            f"# {kind} {row['trial_id']} of a sweep over {names}: {scores}\n"
            f"# Params:   {params}\n"
            f"# Launch:   spd-ray run {path}\n"
        )

        def write(tmp: Path, config: Config = config, header: str = header) -> None:
            save_config(config, tmp)
            tmp.write_text(header + tmp.read_text())

        atomic_write(path, write)
        written.append(path)
    for old in [*out_dir.glob("pareto_*.yaml"), *out_dir.glob("best.yaml")]:
        if old not in written:
            old.unlink()
    return written


# ---------------------------------------------------------------------------------------------
# Plots and text
# ---------------------------------------------------------------------------------------------


def _label(objective: Objective) -> str:
    return f"{objective[0]} ({objective[1]})"


def plot_objectives(rows: Sequence[TrialRow], objectives: Sequence[Objective], path: Path) -> Path:
    """One objective: its value per trial with the running best. Two or more: the first two as
    a scatter, the Pareto front (over all objectives) highlighted; connected when there are two.
    """
    _check(objectives)
    fig = Figure(figsize=(6.4, 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    done = [i for i, r in enumerate(rows) if _signed(r, objectives) is not None]
    if len(objectives) == 1:
        metric, direction = objectives[0]
        ys = [rows[i]["metrics"][metric] for i in done]
        pick = min if direction == "min" else max
        running = [pick(ys[: n + 1]) for n in range(len(ys))]
        ax.plot(done, ys, "o", color="tab:blue", alpha=0.7, label="trial")
        ax.step(done, running, where="post", color="tab:red", label="best so far")
        ax.set_xlabel("trial (launch order)")
        ax.set_ylabel(_label(objectives[0]))
    else:
        (mx, _), (my, _) = objectives[0], objectives[1]
        xs = [rows[i]["metrics"][mx] for i in done]
        ys = [rows[i]["metrics"][my] for i in done]
        ax.scatter(xs, ys, color="tab:gray", alpha=0.6, label="trial")
        front = sorted(pareto_front(rows, objectives), key=lambda i: rows[i]["metrics"][mx])
        fx = [rows[i]["metrics"][mx] for i in front]
        fy = [rows[i]["metrics"][my] for i in front]
        style = "o-" if len(objectives) == 2 else "o"
        what = "Pareto front" if len(objectives) == 2 else f"Pareto front ({len(objectives)}-D)"
        ax.plot(fx, fy, style, color="tab:red", label=what)
        ax.set_xlabel(_label(objectives[0]))
        ax.set_ylabel(_label(objectives[1]))
    failed = len(rows) - len(done)
    ax.set_title(f"{len(done)} trials" + (f" ({failed} without objectives)" if failed else ""))
    ax.legend()
    fig.tight_layout()
    # The format is explicit: the temporary file's name ends in .tmp.
    atomic_write(path, lambda p: fig.savefig(p, format="png"))
    return path


def format_table(
    rows: Sequence[TrialRow],
    objectives: Sequence[Objective] | None = None,
    max_rows: int | None = None,
) -> str:
    """Aligned text, best first when `objectives` are given (`*`: best or Pareto), else in trial
    order; objective metrics (else every metric), then params by short key."""
    if objectives:
        order = ranked(rows, objectives)
        marked = set(best_rows(rows, objectives)) if pareto_front(rows, objectives) else set()
        metric_keys = [m for m, _ in objectives]
    else:
        order, marked = list(range(len(rows))), set()
        metric_keys = _ordered_keys([r["metrics"] for r in rows])
    param_keys = _ordered_keys([r["params"] for r in rows])
    header = ["", "trial", "status", "iter", *metric_keys, *map(short_key, param_keys)]
    lines = [header]
    for i in order[:max_rows]:
        row = rows[i]
        lines.append(
            [
                "*" if i in marked else "",
                row["trial_id"],
                row["status"],
                str(row["iterations"]),
                *(_fmt(row["metrics"][m]) if m in row["metrics"] else "-" for m in metric_keys),
                *(_fmt(row["params"][k]) if k in row["params"] else "-" for k in param_keys),
            ]
        )
    widths = [max(len(line[c]) for line in lines) for c in range(len(header))]
    text = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    ]
    hidden = len(order) - len(order[:max_rows])
    return "\n".join(text + ([f"... {hidden} more"] if hidden else []))
