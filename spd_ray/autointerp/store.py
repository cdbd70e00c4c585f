"""Labels and scores of a run, per labelling model, under `<run>/autointerp/<model>/`:

- `labels.jsonl`: one line per attempt outcome, `{key, status: ok|failed, label, confidence,
  reasoning, reason, usage, time}`;
- `scores.jsonl`: `{key, kind, status, score, trials, reason, usage, time}`.

Append-only, written by the driver alone as results stream in, so an interrupted run keeps every
finished line; the latest line of a key is its state. A rerun skips keys whose latest line is
`ok` and retries the failed ones, so no key is ever sent twice after success and none is lost.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any

AUTOINTERP_DIR = "autointerp"


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"


def _latest(path: Path, key_of: Any) -> dict[Any, dict[str, Any]]:
    out: dict[Any, dict[str, Any]] = {}
    if not path.exists():
        return out
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                # A line cut by a kill mid-write: the only line that can be partial is the last.
                if f.readline():
                    raise ValueError(f"{path}:{n} is not valid JSON") from None
                break
            out[key_of(row)] = row
    return out


class LabelStore:
    def __init__(self, run_dir: Path, model: str):
        self.dir = run_dir / AUTOINTERP_DIR / model_slug(model)
        self.labels_path = self.dir / "labels.jsonl"
        self.scores_path = self.dir / "scores.jsonl"

    def labels(self) -> dict[str, dict[str, Any]]:
        return _latest(self.labels_path, lambda r: r["key"])

    def scores(self) -> dict[tuple[str, str], dict[str, Any]]:
        return _latest(self.scores_path, lambda r: (r["key"], r["kind"]))

    def _append(self, path: Path, row: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        _repair_tail(path)
        with path.open("a") as f:
            f.write(json.dumps({**row, "time": round(time.time(), 3)}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def add_label(self, row: dict[str, Any]) -> None:
        self._append(self.labels_path, row)

    def add_score(self, row: dict[str, Any]) -> None:
        self._append(self.scores_path, row)

    def write_settings(self, settings: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "settings.json").write_text(json.dumps(settings, indent=1))


def _repair_tail(path: Path) -> None:
    """Cut a partial last line (a kill mid-write) so the next line starts clean."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        data = path.read_bytes()
        f.truncate(data.rfind(b"\n") + 1)


def stores_of(run_dir: Path) -> list[Path]:
    root = run_dir / AUTOINTERP_DIR
    return (
        sorted(p for p in root.iterdir() if (p / "labels.jsonl").exists()) if root.exists() else []
    )
