"""The label store's files: a line torn by a kill is skipped by readers and cut by the next
append, a bad line elsewhere is an error naming the file and line, the latest line of a key is
its state, and the spend sums every line of every file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spd_ray.autointerp.store import LabelStore


def _usage(usd: float) -> dict[str, float | int]:
    return {"prompt_tokens": 10, "completion_tokens": 2, "cost_usd": usd, "requests": 1}


def test_torn_last_line_is_skipped_then_cut_and_spend_counts_every_line(tmp_path: Path) -> None:
    store = LabelStore(tmp_path, "org/model:v1")
    assert store.dir == tmp_path / "autointerp" / "org_model_v1"
    assert store.labels() == {} and store.spent()["usd"] == 0.0
    store.add_label({"key": "a:0", "status": "failed", "reason": "429", "usage": _usage(0.25)})
    store.add_label({"key": "a:0", "status": "ok", "label": "x", "usage": _usage(0.5)})
    store.add_check(_usage(0.125))
    with store.labels_path.open("a") as f:  # a kill in the middle of an append
        f.write('{"key": "a:1", "status": "ok", "usage": {"cost_usd": 9')
    labels = store.labels()
    assert list(labels) == ["a:0"] and labels["a:0"]["label"] == "x"
    assert store.spent() == {
        "usd": 0.875,
        "prompt_tokens": 30,
        "completion_tokens": 6,
        "requests": 3,
    }
    store.add_label({"key": "a:1", "status": "ok", "label": "y", "usage": _usage(1.0)})
    lines = store.labels_path.read_text().splitlines()
    assert len(lines) == 3 and all(json.loads(line) for line in lines)
    assert store.labels()["a:1"]["label"] == "y" and store.spent()["usd"] == 1.875

    store.add_score({"key": "a:0", "kind": "detection", "status": "ok", "score": 0.5})
    assert store.scores()[("a:0", "detection")]["score"] == 0.5
    store.write_settings({"model": "org/model:v1"})
    assert json.loads((store.dir / "settings.json").read_text()) == {"model": "org/model:v1"}
    assert sorted(p.name for p in store.dir.iterdir()) == [
        "checks.jsonl",
        "labels.jsonl",
        "scores.jsonl",
        "settings.json",
    ]

    lines.insert(1, "{not json")
    store.labels_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"labels.jsonl:2 is not valid JSON"):
        store.labels()
