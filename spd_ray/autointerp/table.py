"""`spd-ray labels RUN`: a table of labels and scores."""

from __future__ import annotations

from pathlib import Path

from spd_ray.autointerp.store import LabelStore, stores_of
from spd_ray.errors import NotFoundError


def _store(run_dir: Path, model: str | None) -> LabelStore:
    if model is not None:
        store = LabelStore(run_dir, model)
        if not store.labels_path.exists():
            raise NotFoundError(f"run {run_dir} has no labels by model {model!r}")
        return store
    found = stores_of(run_dir)
    if not found:
        raise NotFoundError(
            f"run {run_dir} has no labels; run `spd-ray autointerp {run_dir} --base-url ... "
            "--model ...`"
        )
    latest = max(found, key=lambda p: (p / "labels.jsonl").stat().st_mtime)
    return LabelStore(run_dir, latest.name)  # a folder name is a slug: it maps to itself


def labels_table(run_dir: Path, model: str | None = None, failed: bool = False) -> str:
    store = _store(run_dir, model)
    labels = store.labels()
    scores = store.scores()
    kinds = sorted({kind for (_, kind), row in scores.items() if row["status"] == "ok"})
    rows = []
    for key, row in labels.items():
        if row["status"] != "ok" and not failed:
            continue
        cells = [key, row.get("confidence", "-") if row["status"] == "ok" else "FAILED"]
        for kind in kinds:
            s = scores.get((key, kind))
            cells.append(f"{s['score']:.2f}" if s and s["status"] == "ok" else "-")
        text = row["label"] if row["status"] == "ok" else row.get("reason", "")
        cells.append(text)
        rows.append(cells)
    header = ["component", "confidence", *kinds, "label"]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header) - 1)]
    lines = [
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=False)) + "  " + str(r[-1])
        for r in [header, *rows]
    ]
    n_ok = sum(r["status"] == "ok" for r in labels.values())
    lines.append(f"({n_ok} labelled, {len(labels) - n_ok} failed; {store.dir})")
    return "\n".join(lines)
