"""The on-disk harvest under `<run>/harvest/`, and lookups that read only what they need.

```
harvest/
  meta.json            what was harvested (run, data, settings, tokens, modules, shard ranges)
  components.parquet   one row per subcomponent: key, module, index, counts, density, mean CI
  cofiring.npy         [N, N] int64 co-firing counts (memory-mapped: one row per lookup)
  input_counts.npy     [N, V] int64 firings per input token (toy: per active input feature)
  input_totals.npy     [V] int64
  output_mass.npy      [N, V] float64 predicted-probability mass while firing (language models;
                       each position's top settings.output_top_k tokens, all when it is 0)
  output_totals.npy    [V] float64
  examples/shard-XXXXX.parquet   the examples of one component range, sorted by component
```

A harvest is written into `harvest.partial/`, made durable, marked complete by its `meta.json` and
swapped in for `harvest/` in one step, so a reader never sees a half-written one and an interrupted
harvest leaves nothing to mix with. A complete harvest is never lost: one that an interrupted swap
left aside (no `harvest/`, but a complete `harvest.partial/` or an old copy) is put back by the
next harvest. One harvest at a time per run: `run_harvest` holds `harvest_lock(run_dir)`.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spd_ray.errors import InputError, NotFoundError
from spd_ray.harvest.keep import KeepTable
from spd_ray.harvest.measures import Ranked, top_correlated, top_tokens
from spd_ray.io import Lock, fsync_path, replace_dir, write_json

FORMAT = 1
HARVEST_DIR = "harvest"
PARTIAL_DIR = "harvest.partial"


def harvest_dir(run_dir: Path) -> Path:
    return run_dir / HARVEST_DIR


def harvest_lock(run_dir: Path) -> Lock:
    return Lock(run_dir / ".harvest.lock", f"the harvest of {run_dir}")


def _set_aside(run_dir: Path, name: str = HARVEST_DIR) -> list[Path]:
    """Old harvests that a swap moved aside (`replace_dir`'s `.harvest.old-*`, and the
    `harvest.old-*` of earlier versions), newest first. `name`: another folder built the same
    way (the attributions)."""
    found = [*run_dir.glob(f".{name}.old-*"), *run_dir.glob(f"{name}.old-*")]
    return sorted((p for p in found if p.is_dir()), key=lambda p: -p.stat().st_mtime)


def recover(run_dir: Path, name: str = HARVEST_DIR) -> Path | None:
    """Put back the newest complete harvest when an interrupted swap left none in `harvest/`:
    a complete `harvest.partial/` (killed between its meta.json and the swap) is newer than any
    copy set aside. Then remove the copies set aside. Returns what was put back, if anything.
    `name`: another folder built the same way, `<name>.partial/` swapped in as `<name>/`."""
    final, partial = run_dir / name, run_dir / f"{name}.partial"
    aside = _set_aside(run_dir, name)
    restored = None
    if not final.exists():
        complete = [p for p in (partial, *aside) if (p / "meta.json").exists()]
        if complete:
            restored = complete[0]
            restored.rename(final)
            fsync_path(run_dir)
    for old in aside:
        if old.exists():
            shutil.rmtree(old)
    return restored


def start_partial(
    run_dir: Path, name: str = HARVEST_DIR, subdirs: tuple[str, ...] = ("examples",)
) -> tuple[Path, bool]:
    """A fresh `harvest.partial/` (removing an unfinished one: returns True when it did), after
    putting back a complete harvest that an interrupted swap left aside. Call under
    `harvest_lock`: the partial of a live harvest is not unfinished. `name`, `subdirs`: another
    folder built the same way (`<name>.partial/`, with these empty subfolders)."""
    recover(run_dir, name)
    partial = run_dir / f"{name}.partial"
    stale = partial.exists()
    if stale:
        shutil.rmtree(partial)
    partial.mkdir()
    for sub in subdirs:
        (partial / sub).mkdir()
    return partial, stale


def finish_partial(run_dir: Path, meta: dict[str, Any]) -> Path:
    """Make every file of `harvest.partial/` durable, mark it complete with `meta.json`, and swap
    it in as `harvest/` in one step (the old harvest is deleted only once the new one is in)."""
    partial, final = run_dir / PARTIAL_DIR, harvest_dir(run_dir)
    for root, _, files in os.walk(partial):
        for name in files:
            fsync_path(Path(root) / name)
        fsync_path(Path(root))
    write_json(partial / "meta.json", meta, indent=1)
    replace_dir(partial, final)
    return final


def create_arrays(partial: Path, N: int, V: int, lm: bool) -> None:
    """Pre-size the memory-mapped matrices that the merge tasks fill by component range."""
    np.lib.format.open_memmap(partial / "cofiring.npy", "w+", np.int64, (N, N)).flush()
    np.lib.format.open_memmap(partial / "input_counts.npy", "w+", np.int64, (N, V)).flush()
    if lm:
        np.lib.format.open_memmap(partial / "output_mass.npy", "w+", np.float64, (N, V)).flush()


def write_rows(partial: Path, name: str, lo: int, rows: np.ndarray) -> None:
    arr = np.load(partial / f"{name}.npy", mmap_mode="r+")
    arr[lo : lo + len(rows)] = rows
    arr.flush()
    del arr


def example_table(table: KeepTable, kind: str, lo: int) -> pa.Table:
    """Rows of one keep table as a parquet table (components renumbered to global indices)."""
    comp = table.comp.numpy() + lo
    rank = np.zeros(len(comp), dtype=np.int32)
    if len(comp):
        starts = np.r_[0, np.flatnonzero(np.diff(comp)) + 1]
        lengths = np.diff(np.r_[starts, len(comp)])
        rank = (np.arange(len(comp)) - np.repeat(starts, lengths)).astype(np.int32)
    uid = table.uid.numpy()
    cols: dict[str, Any] = {
        "component": pa.array(comp, pa.int32()),
        "kind": pa.array([kind] * len(comp), pa.string()),
        "rank": pa.array(rank),
        "key": pa.array(table.key.numpy()),
        "uid": pa.array(uid),
    }
    for name, t in table.payload.items():
        values = t.numpy()
        cols[name] = pa.array(list(values)) if values.ndim > 1 else pa.array(values)
    return pa.table(cols)


def write_examples(partial: Path, shard: int, tables: list[pa.Table]) -> None:
    tables = [t for t in tables if t.num_rows]
    path = partial / "examples" / f"shard-{shard:05d}.parquet"
    if not tables:
        return
    merged = pa.concat_tables(tables, promote_options="default").sort_by(
        [("component", "ascending"), ("kind", "descending"), ("rank", "ascending")]
    )
    pq.write_table(merged, path, row_group_size=4096)


# -- reading -------------------------------------------------------------------------------------


@dataclass
class Example:
    component: str
    kind: str  # "top" | "reservoir"
    rank: int
    doc: int  # language models: document index in the split; toy: input index
    offset: int  # language models: offset of the firing token in its document
    tokens: list[int] | None  # window, -1 = outside the document (language models)
    ci: list[float] | float
    act: list[float] | float
    x: list[float] | None  # toy input vector

    @property
    def center(self) -> int:
        return len(self.tokens) // 2 if self.tokens is not None else 0


class Harvest:
    """A finished harvest, opened lazily: matrices are memory-mapped and one component's examples
    are read from its shard file alone."""

    def __init__(self, run_dir: str | Path):
        from spd_ray.runs import resolve_run_dir

        self.run_dir = resolve_run_dir(run_dir)
        self.path = harvest_dir(self.run_dir)
        if not (self.path / "meta.json").exists():
            # A complete harvest that an interrupted swap left aside (the next harvest puts it
            # back): still the run's harvest.
            aside = [self.run_dir / PARTIAL_DIR, *_set_aside(self.run_dir)]
            self.path = next((p for p in aside if (p / "meta.json").exists()), self.path)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            hint = (
                " (an unfinished one is in harvest.partial/)"
                if (self.run_dir / PARTIAL_DIR).exists()
                else ""
            )
            raise NotFoundError(
                f"run {self.run_dir} has no harvest{hint}; run `spd-ray harvest {self.run_dir}`"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.keys: list[str] = self.meta["component_keys"]
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.n_tokens: int = self.meta["n_tokens"]
        self.kind: str = self.meta["kind"]

    # -- tables --------------------------------------------------------------------------------

    @cached_property
    def components(self) -> pa.Table:
        return pq.read_table(self.path / "components.parquet")

    def _array(self, name: str) -> np.ndarray:
        return np.load(self.path / f"{name}.npy", mmap_mode="r")

    def index(self, key: str | int) -> int:
        if isinstance(key, int):
            if not 0 <= key < len(self.keys):
                raise InputError(f"component index {key} is out of range (0..{len(self.keys) - 1})")
            return key
        if key not in self._index:
            module = key.rpartition(":")[0]
            modules = [m["path"] for m in self.meta["modules"]]
            if module not in modules:
                raise InputError(f"no module {module!r} in this harvest; modules: {modules}")
            raise InputError(f"no component {key!r}; {module} has {self.C(module)} subcomponents")
        return self._index[key]

    def C(self, module: str) -> int:
        return next(m["C"] for m in self.meta["modules"] if m["path"] == module)

    def summary(self, key: str | int) -> dict[str, Any]:
        i = self.index(key)
        row = self.components.slice(i, 1).to_pylist()[0]
        return row

    def cofiring_row(self, key: str | int) -> np.ndarray:
        """Co-firing counts [N] of one subcomponent with every subcomponent (one row read)."""
        return np.asarray(self._array("cofiring")[self.index(key)])

    def firing_counts(self) -> np.ndarray:
        return self.components.column("firing_count").to_numpy()

    # -- examples ------------------------------------------------------------------------------

    def examples(self, key: str | int, kind: str | None = None) -> list[Example]:
        """The component's examples (top-k first, best first; then the reservoir)."""
        i = self.index(key)
        shard = next(s for s, (lo, hi) in enumerate(self.meta["shards"]) if lo <= i < hi)
        path = self.path / "examples" / f"shard-{shard:05d}.parquet"
        if not path.exists():
            return []
        filters: list[Any] = [("component", "=", i)]
        if kind is not None:
            filters.append(("kind", "=", kind))
        rows = pq.read_table(path, filters=filters).to_pylist()
        out = []
        for r in rows:
            uid = int(r["uid"])
            lm = self.kind == "lm"
            out.append(
                Example(
                    component=self.keys[i],
                    kind=r["kind"],
                    rank=int(r["rank"]),
                    doc=uid >> 32 if lm else uid,
                    offset=uid & 0xFFFFFFFF if lm else 0,
                    tokens=r.get("tokens"),
                    ci=r["ci"],
                    act=r["act"],
                    x=r.get("x"),
                )
            )
        out.sort(key=lambda e: (e.kind != "top", e.rank))
        return out

    # -- measures ------------------------------------------------------------------------------

    def correlated(
        self, key: str | int, measure: str = "pmi", k: int = 10, largest: bool = True
    ) -> Ranked:
        """Other subcomponents ranked by a co-firing measure (precision, recall, jaccard, pmi,
        lift): reads one row of the co-firing matrix."""
        i = self.index(key)
        counts = self.firing_counts()
        row = self.cofiring_row(i)
        return top_correlated(row, int(counts[i]), counts, self.n_tokens, i, measure, k, largest)

    def tokens(
        self,
        key: str | int,
        side: str = "input",
        measure: str = "precision",
        k: int = 10,
        largest: bool = True,
    ) -> Ranked:
        """Input tokens (toy: input features) or output tokens ranked by a measure (precision,
        recall, lift, pmi): reads one row."""
        i = self.index(key)
        n_fire = int(self.firing_counts()[i])
        if side == "input":
            counts = np.asarray(self._array("input_counts")[i])
            totals = self._array("input_totals")
        elif side == "output":
            if self.kind != "lm":
                raise InputError("output-token measures exist only for language-model harvests")
            counts = np.asarray(self._array("output_mass")[i])
            totals = self._array("output_totals")
        else:
            raise InputError(f"side must be 'input' or 'output', got {side!r}")
        return top_tokens(counts, n_fire, np.asarray(totals), self.n_tokens, measure, k, largest)
