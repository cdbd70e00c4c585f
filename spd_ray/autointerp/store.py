"""Labels and scores of a run, per labelling model, under `<run>/autointerp/<model>/`:

- `labels.jsonl`: one line per attempt outcome, `{key, status: ok|failed, label, confidence,
  reasoning, reason, usage, time}`;
- `scores.jsonl`: `{key, kind, status, score, trials, reason, usage, time}`;
- `checks.jsonl`: `{what, usage, time}` of each endpoint check;
- `settings.json`: the endpoint, model and harvest of the latest run;
- `workers.json`: where the latest run's workers ran, `{workers: [{actor, node_id, hostname,
  node_ip, pid, results}]}` (one entry per worker process, so a restarted actor shows twice).

Append-only, written by the driver alone as results stream in, so an interrupted run keeps every
finished line; the latest line of a key is its state. A rerun skips keys whose latest line is
`ok` and retries the failed ones, so no key is ever sent twice after success and none is lost.
The usage on every line is what the store has spent, which a rerun counts against its budget.
One labelling run per store at a time (`LabelStore.lock`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

from spd_ray.io import Lock, append_jsonl, read_jsonl, repair_tail, write_json

AUTOINTERP_DIR = "autointerp"
WORKERS_FILE = "workers.json"
_SPEND_FILES = ("labels.jsonl", "scores.jsonl", "checks.jsonl")


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def _latest(path: Path, key_of: Callable[[dict[str, Any]], Hashable]) -> dict[Any, dict[str, Any]]:
    """The last row of each key (a torn last line is skipped, as `read_jsonl` does)."""
    return {key_of(row): row for row in read_jsonl(path)}


class LabelStore:
    def __init__(self, run_dir: Path, model: str):
        self.dir = run_dir / AUTOINTERP_DIR / model_slug(model)
        self.labels_path = self.dir / "labels.jsonl"
        self.scores_path = self.dir / "scores.jsonl"
        # Endpoint checks: paid requests that belong to no subcomponent.
        self.checks_path = self.dir / "checks.jsonl"

    def lock(self) -> Lock:
        """Held by a labelling run: two runs on one store would send every request twice."""
        return Lock(self.dir / ".lock", f"the label store {self.dir}")

    def labels(self) -> dict[str, dict[str, Any]]:
        return _latest(self.labels_path, lambda r: r["key"])

    def scores(self) -> dict[tuple[str, str], dict[str, Any]]:
        return _latest(self.scores_path, lambda r: (r["key"], r["kind"]))

    def spent(self) -> dict[str, float]:
        """What every request recorded in this store cost, over all runs and every line (a retried
        key paid for each attempt): usd, prompt_tokens, completion_tokens, requests. Exact up to
        the requests in flight when a run was killed, whose lines were never written."""
        total = {"usd": 0.0, "prompt_tokens": 0, "completion_tokens": 0, "requests": 0}
        for name in _SPEND_FILES:
            for row in read_jsonl(self.dir / name):
                usage = row.get("usage") or {}
                total["usd"] += usage.get("cost_usd", 0.0)
                for field in ("prompt_tokens", "completion_tokens", "requests"):
                    total[field] += usage.get(field, 0)
        return total

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        repair_tail(path)  # a line torn by a kill would swallow the start of this one
        append_jsonl(path, {**row, "time": round(time.time(), 3)}, sync=True)

    def add_label(self, row: dict[str, Any]) -> None:
        self._append(self.labels_path, row)

    def add_score(self, row: dict[str, Any]) -> None:
        self._append(self.scores_path, row)

    def add_check(self, usage: dict[str, Any]) -> None:
        self._append(self.checks_path, {"what": "endpoint check", "usage": usage})

    def write_settings(self, settings: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / "settings.json", settings, indent=1)

    def write_workers(self, workers: list[dict[str, Any]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json(self.dir / WORKERS_FILE, {"workers": workers}, indent=1)


def stores_of(run_dir: Path) -> list[Path]:
    root = run_dir / AUTOINTERP_DIR
    return (
        sorted(p for p in root.iterdir() if (p / "labels.jsonl").exists()) if root.exists() else []
    )
