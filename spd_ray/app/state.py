"""What the viewer serves: the runs it was given, each opened lazily through the analyses' own
stores (the harvest memory-mapped, one component's examples read from its shard, labels and
scores as their latest lines, attributions memory-mapped, the newest cluster mapping) and its
decomposed model loaded once, on first use, behind a lock (a forward is not re-entrant)."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from spd_ray.attributions.layout import Kind, model_kind
from spd_ray.autointerp.store import stores_of
from spd_ray.config import Config
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import read_jsonl
from spd_ray.runs import RunDir, resolve_run_dir

FIGURE_SUFFIXES = (".png", ".svg", ".jpg", ".jpeg")
DEFAULT_PROMPTS = ("Once upon a time, there was a little", "The cat sat on the")


class Missing(NotFoundError):
    """An analysis the run does not have yet: what it is and the command that makes it."""

    def __init__(self, what: str, command: str, detail: str):
        super().__init__(detail)
        self.what, self.command = what, command


def _mtime_size(path: Path) -> tuple[float, int] | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_mtime, st.st_size)


@dataclass
class Labels:
    """The latest labels and scores of the run's newest label store."""

    model: str
    labels: dict[str, dict[str, Any]]  # key -> latest ok row
    scores: dict[str, dict[str, float]]  # key -> {kind: score}

    def label_of(self, key: str) -> str | None:
        row = self.labels.get(key)
        return row.get("label") if row else None

    def score(self, key: str) -> float | None:
        s = self.scores.get(key)
        return float(np.mean(list(s.values()))) if s else None


class AppRun:
    def __init__(self, rid: str, path: Path, device: str = "cpu", out: str | Path | None = None):
        self.id = rid
        self.device = device
        self.out = out  # where `@tiny-lm/` names resolve (else the folder above holding assets/)
        self.path = path
        self.rundir = RunDir(path)
        self.config: Config = self.rundir.read_config()
        try:
            self.kind: str = model_kind(self.config)  # "lm" or "toy"
        except InputError:  # ih: browsing only, no prompts
            self.kind = self.config.task_config.task_name
        self.lock = threading.Lock()  # one forward at a time: the model's plan is shared state
        self._cache: dict[str, tuple[Any, Any]] = {}
        self._load_lock = threading.Lock()
        self._loaded: Any = None

    # -- the model -----------------------------------------------------------------------------

    @property
    def loaded(self) -> Any:
        """The run's model at its newest checkpoint, loaded on first use (once)."""
        with self._load_lock:
            if self._loaded is None:
                from spd_ray.loaded_run import load_run

                self._loaded = load_run(self.path, out=self.out, device=self.device)
            return self._loaded

    @cached_property
    def tokenizer(self) -> Any:
        if self.kind != "lm" or not self.config.tokenizer_name:
            return None
        from spd_ray.data.lm import load_tokenizer
        from spd_ray.runs import assets_root
        from spd_ray.targets.hf import resolve_name

        name = resolve_name(
            self.config.tokenizer_name, "tokenizer_name", assets_root(self.path, self.out), False
        )
        return load_tokenizer(name)

    def token_text(self, token_id: int) -> str:
        if self.kind != "lm":
            return f"x[{token_id}]"
        tok = self.tokenizer
        return str(tok.decode([int(token_id)])) if tok is not None else str(token_id)

    def modules(self) -> list[tuple[str, int]]:
        """(module path, C) of every decomposed module: from the harvest when there is one (no
        model load), else from the model."""
        try:
            return [(m["path"], int(m["C"])) for m in self.harvest().meta["modules"]]
        except Missing:
            model = self.loaded.model
            return [(p, int(model.C(p))) for p in model.module_paths]

    def n_inputs(self) -> int:
        """A toy run's input features (the length of a prompt's x)."""
        from spd_ray.attributions.compute import n_inputs

        return n_inputs(self.loaded.model, "toy")

    def prompt_kind(self) -> Kind:
        """The run's kind for prompts ("lm" or "toy"); other runs (ih) have none."""
        if self.kind == "lm":
            return "lm"
        if self.kind == "toy":
            return "toy"
        raise InputError(f"prompts are not supported for {self.kind} runs")

    # -- cached stores (reopened when their files change) --------------------------------------

    def _cached(self, name: str, stamp: Any, make: Any) -> Any:
        hit = self._cache.get(name)
        if hit is not None and hit[0] == stamp:
            return hit[1]
        value = make()
        self._cache[name] = (stamp, value)
        return value

    def harvest(self) -> Any:
        from spd_ray.harvest.store import Harvest, harvest_dir

        stamp = _mtime_size(harvest_dir(self.path) / "meta.json")
        if stamp is None:
            try:  # an interrupted swap can leave a complete harvest aside: Harvest finds it
                return Harvest(self.path)
            except NotFoundError as err:
                raise Missing("harvest", f"spd-ray harvest {self.path}", str(err)) from None
        return self._cached("harvest", stamp, lambda: Harvest(self.path))

    def has_harvest(self) -> bool:
        try:
            self.harvest()
        except Missing:
            return False
        return True

    def labels(self) -> Labels | None:
        found = stores_of(self.path)
        if not found:
            return None
        newest = max(found, key=lambda p: (p / "labels.jsonl").stat().st_mtime)
        stamp = (
            newest,
            _mtime_size(newest / "labels.jsonl"),
            _mtime_size(newest / "scores.jsonl"),
        )
        return self._cached("labels", stamp, lambda: _read_labels(newest))

    def attributions(self) -> Any | None:
        from spd_ray.attributions.store import Attributions, attributions_dir

        stamp = _mtime_size(attributions_dir(self.path) / "meta.json")
        if stamp is None:
            return None
        return self._cached("attributions", stamp, lambda: Attributions(self.path))

    def clusterings(self) -> list[str]:
        root = self.path / "clustering"
        if not root.is_dir():
            return []
        return sorted(p.name for p in root.iterdir() if (p / "meta.json").exists())

    def cluster_mapping(self) -> dict[str, Any] | None:
        """The newest mapping written by `spd-ray cluster-mapping` under any clustering."""
        files = sorted(
            (self.path / "clustering").glob("*/mappings/*.json"), key=lambda p: p.stat().st_mtime
        )
        if not files:
            return None
        newest = files[-1]
        return self._cached(
            "mapping", (newest, _mtime_size(newest)), lambda: json.loads(newest.read_text())
        )

    # -- run files -----------------------------------------------------------------------------

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        return self._cached("metrics", _mtime_size(path), lambda: read_jsonl(path))

    def figures(self) -> list[str]:
        root = self.path / "figures"
        if not root.is_dir():
            return []
        return sorted(
            str(p.relative_to(self.path))
            for p in root.rglob("*")
            if p.is_file() and p.suffix.lower() in FIGURE_SUFFIXES
        )

    def figure_path(self, rel: str) -> Path:
        """A figure file inside the run's figures folder (`rel` relative to the run or to the
        figures folder); anything else, including a path that leaves it, is not found."""
        root = (self.path / "figures").resolve()
        for base in (root, self.path.resolve()):
            candidate = (base / rel).resolve()
            if (
                candidate.is_relative_to(root)
                and candidate.suffix.lower() in FIGURE_SUFFIXES
                and candidate.is_file()
            ):
                return candidate
        raise NotFoundError(f"no figure {rel!r} in run {self.id}")


def label_text(labels: Labels | None, key: str) -> str | None:
    """A subcomponent's label, if the run has labels and this one is labelled."""
    return labels.label_of(key) if labels else None


def _read_labels(store: Path) -> Labels:
    labels = {r["key"]: r for r in read_jsonl(store / "labels.jsonl")}
    ok = {k: r for k, r in labels.items() if r.get("status") == "ok"}
    scores: dict[str, dict[str, float]] = {}
    for r in read_jsonl(store / "scores.jsonl"):
        if r.get("status") == "ok" and r.get("score") is not None:
            scores.setdefault(r["key"], {})[r["kind"]] = float(r["score"])
    return Labels(store.name, ok, scores)


def open_runs(
    paths: list[str | Path], device: str = "cpu", out: str | Path | None = None
) -> dict[str, AppRun]:
    """Every run given, by id (its folder name, made unique); each must exist (checked first)."""
    if not paths:
        raise InputError("give at least one run directory")
    resolved = [resolve_run_dir(p, out) for p in paths]
    runs: dict[str, AppRun] = {}
    for path in resolved:
        rid, n = path.name, 2
        while rid in runs:
            rid, n = f"{path.name}-{n}", n + 1
        runs[rid] = AppRun(rid, path, device, out)
    return runs
