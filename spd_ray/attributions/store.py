"""The on-disk attributions under `<run>/attributions/`, and queries that read only what they need.

```
attributions/
  meta.json      the layout (inputs, outputs, alive subcomponents, connectivity), tokens, batches
  attr.npy       [n_targets, n_sources] mean grad x activation per token (memory-mapped)
  unembed.npy    [d_model, vocab] W_U (language models): token t's row is W_U[:, t] . residual rows
```

Rows are targets (the alive subcomponents, then the output: the pre-unembedding residual for
language models, the output features for toy models); columns are sources (the inputs: one per
vocabulary id or input feature, then the alive subcomponents). A target range is a contiguous run
of rows, so merge tasks write their shard with `write_state` into a matrix that `create_matrix`
sized, and `finish` marks the folder complete (meta.json last). `save_attributions` does all of it
for one whole state, built beside the old folder and swapped in (`spd_ray.io.building_dir`).

Keys: components `<module path>:<c>`; sources `wte:<token id>` (toy: `input:<feature>`); output
targets `output:<token id>` (toy: `output:<feature>`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from torch import Tensor

from spd_ray.attributions.exact import state_means
from spd_ray.attributions.layout import OUTPUT, Layout
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import building_dir, fsync_path, write_json

FORMAT = 1
ATTRIBUTIONS_DIR = "attributions"
MATRIX = "attr.npy"
UNEMBED = "unembed.npy"

Sign = Literal["positive", "negative"]
TargetKinds = Literal["all", "components", "output"]


def attributions_dir(run_dir: Path) -> Path:
    return run_dir / ATTRIBUTIONS_DIR


# -- writing -------------------------------------------------------------------------------------


def create_matrix(folder: Path, layout: Layout, dtype: type[np.floating] = np.float32) -> None:
    """Pre-size `attr.npy` [n_targets, n_sources] (zeros) for the shards to fill."""
    shape = (layout.n_targets, layout.n_sources)
    np.lib.format.open_memmap(folder / MATRIX, "w+", dtype, shape).flush()


def write_rows(folder: Path, lo: int, rows: np.ndarray) -> None:
    """Write target rows [lo, lo + len(rows)) of `attr.npy`."""
    arr = np.load(folder / MATRIX, mmap_mode="r+")
    assert rows.ndim == 2 and rows.shape[1] == arr.shape[1], f"rows {rows.shape} vs {arr.shape}"
    assert lo >= 0 and lo + len(rows) <= arr.shape[0], f"rows [{lo}, {lo + len(rows)}) outside"
    arr[lo : lo + len(rows)] = rows.astype(arr.dtype)
    arr.flush()
    del arr


def write_state(folder: Path, state: dict[str, Any]) -> None:
    """Write a merged state's rows (the means over its tokens) at its target range."""
    write_rows(folder, state["targets"][0], state_means(state).numpy())


def write_unembed(folder: Path, w_unembed: Tensor) -> None:
    np.save(folder / UNEMBED, w_unembed.detach().double().cpu().numpy())


def finish(
    folder: Path, layout: Layout, n_tokens: int, n_batches: int, info: dict[str, Any]
) -> None:
    """Make every file durable, then write meta.json (the mark of a complete folder). `info`:
    whatever the caller records besides (alive filter, data, timing)."""
    for name in os.listdir(folder):
        fsync_path(folder / name)
    arr = np.load(folder / MATRIX, mmap_mode="r")
    assert arr.shape == (layout.n_targets, layout.n_sources), f"{MATRIX} {arr.shape} vs layout"
    assert (folder / UNEMBED).exists() == (layout.kind == "lm"), "unembed.npy iff language model"
    meta = {
        "format": FORMAT,
        "layout": layout.to_json(),
        "n_tokens": n_tokens,
        "n_batches": n_batches,
        "dtype": str(arr.dtype),
        **info,
    }
    write_json(folder / "meta.json", meta, indent=1)


def save_attributions(
    run_dir: Path,
    layout: Layout,
    state: dict[str, Any],
    w_unembed: Tensor | None,
    info: dict[str, Any],
    dtype: type[np.floating] = np.float32,
) -> Path:
    """Write one whole state as `<run>/attributions/`, replacing any earlier one in one step."""
    assert state["targets"] == (0, layout.n_targets), "save_attributions needs every target row"
    final = attributions_dir(run_dir)
    with building_dir(final) as tmp:
        create_matrix(tmp, layout, dtype)
        write_state(tmp, state)
        if w_unembed is not None:
            write_unembed(tmp, w_unembed)
        finish(tmp, layout, state["n_tokens"], state["n_batches"], info)
    return final


# -- reading -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Attribution:
    key: str  # the other end: a source or target key
    value: float  # mean grad x activation per token


class Attributions:
    """Finished attributions of a run, memory-mapped: a target's sources read one row, a source's
    targets one column."""

    def __init__(self, run: str | Path, out: str | Path | None = None):
        from spd_ray.runs import resolve_run_dir

        self.run_dir = resolve_run_dir(run, out)
        self.path = attributions_dir(self.run_dir)
        meta_path = self.path / "meta.json"
        if not meta_path.exists():
            raise NotFoundError(
                f"run {self.run_dir} has no attributions; run `spd-ray attributions {self.run_dir}`"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        if self.meta.get("format") != FORMAT:
            raise InputError(f"{meta_path}: format {self.meta.get('format')}, expected {FORMAT}")
        self.layout = Layout.from_json(self.meta["layout"])
        self.n_tokens: int = self.meta["n_tokens"]
        self.keys = self.layout.component_keys()
        self._index = {k: i for i, k in enumerate(self.keys)}
        self.attr: np.ndarray = np.load(self.path / MATRIX, mmap_mode="r")
        lm = self.layout.kind == "lm"
        self.unembed: np.ndarray | None = (
            np.load(self.path / UNEMBED, mmap_mode="r") if lm else None
        )

    # -- keys ----------------------------------------------------------------------------------

    @property
    def n_output_classes(self) -> int:
        """Output tokens (vocabulary) or output features."""
        return self.unembed.shape[1] if self.unembed is not None else self.layout.n_outputs

    def _component(self, key: str) -> int:
        if key in self._index:
            return self._index[key]
        module, _, c = key.rpartition(":")
        if module not in self.layout.alive:
            special = [self.layout.input_layer, OUTPUT]
            raise InputError(
                f"no layer {module!r} in these attributions; layers: "
                f"{[*special, *self.layout.alive]}"
            )
        raise InputError(
            f"component {key!r} is not among the attributions' alive subcomponents "
            f"({len(self.layout.alive[module])} alive in {module})"
        )

    def _numbered(self, key: str, n: int) -> int:
        _, _, i = key.rpartition(":")
        if not i.isdigit() or not 0 <= int(i) < n:
            raise InputError(f"{key!r}: the index must be in 0..{n - 1}")
        return int(i)

    def source_index(self, key: str) -> int:
        """The column of a source key."""
        if key.rpartition(":")[0] == self.layout.input_layer:
            return self._numbered(key, self.layout.n_inputs)
        if key.rpartition(":")[0] == OUTPUT:
            raise InputError(f"{key!r} is a target, not a source")
        return self.layout.n_inputs + self._component(key)

    def source_key(self, i: int) -> str:
        n_in = self.layout.n_inputs
        return f"{self.layout.input_layer}:{i}" if i < n_in else self.keys[i - n_in]

    # -- rows and columns ----------------------------------------------------------------------

    def _output_rows(self) -> np.ndarray:
        lo, hi = self.layout.target_span(OUTPUT)
        return np.asarray(self.attr[lo:hi], dtype=np.float64)

    def target_row(self, target: str) -> np.ndarray:
        """Attributions [n_sources] from every source into one target (float64)."""
        layer = target.rpartition(":")[0]
        if layer == OUTPUT:
            i = self._numbered(target, self.n_output_classes)
            if self.unembed is None:
                return np.asarray(self.attr[self.layout.n_components + i], dtype=np.float64)
            w = np.asarray(self.unembed[:, i], dtype=np.float64)
            return w @ self._output_rows()
        if layer == self.layout.input_layer:
            raise InputError(f"{target!r} is a source, not a target")
        return np.asarray(self.attr[self._component(target)], dtype=np.float64)

    def source_column(self, source: str) -> tuple[np.ndarray, np.ndarray]:
        """Attributions from one source into (the alive subcomponents, the output tokens or
        features), float64."""
        col = np.asarray(self.attr[:, self.source_index(source)], dtype=np.float64)
        n = self.layout.n_components
        out = col[n:]
        if self.unembed is not None:
            out = out @ np.asarray(self.unembed, dtype=np.float64)
        return col[:n], out

    # -- queries -------------------------------------------------------------------------------

    def top_sources(self, target: str, k: int = 10, sign: Sign = "positive") -> list[Attribution]:
        """The k sources with the largest positive (or most negative) attribution into `target`;
        values of the other sign (and zeros) are left out."""
        row = self.target_row(target)
        return [Attribution(self.source_key(int(i)), float(row[i])) for i in _top(row, k, sign)]

    def top_targets(
        self, source: str, k: int = 10, sign: Sign = "positive", targets: TargetKinds = "all"
    ) -> list[Attribution]:
        """The k targets (subcomponents, output tokens / features, or both) that `source` drives
        most positively (or negatively)."""
        comp, out = self.source_column(source)
        keys: list[str] = []
        parts: list[np.ndarray] = []
        if targets in ("all", "components"):
            keys += self.keys
            parts.append(comp)
        if targets in ("all", "output"):
            keys += [f"{OUTPUT}:{i}" for i in range(len(out))]
            parts.append(out)
        if not parts:
            raise InputError(f"targets must be 'all', 'components' or 'output', got {targets!r}")
        values = np.concatenate(parts)
        return [Attribution(keys[i], float(values[i])) for i in _top(values, k, sign)]

    def between(self, source: str, target: str) -> float:
        """The attribution from one source into one target."""
        s = self.source_index(source)
        layer = target.rpartition(":")[0]
        if layer == OUTPUT and self.unembed is not None:
            t = self._numbered(target, self.n_output_classes)
            lo, hi = self.layout.target_span(OUTPUT)
            col = np.asarray(self.attr[lo:hi, s], dtype=np.float64)
            return float(np.asarray(self.unembed[:, t], dtype=np.float64) @ col)
        if layer == OUTPUT:
            i = self._numbered(target, self.n_output_classes)
            return float(self.attr[self.layout.n_components + i, s])
        if layer == self.layout.input_layer:
            raise InputError(f"{target!r} is a source, not a target")
        return float(self.attr[self._component(target), s])


def _top(values: np.ndarray, k: int, sign: Sign) -> np.ndarray:
    """Indices of the k largest values > 0 (sign "positive") or smallest < 0 ("negative")."""
    if sign not in ("positive", "negative"):
        raise InputError(f"sign must be 'positive' or 'negative', got {sign!r}")
    if k < 1:
        raise InputError(f"k must be at least 1, got {k}")
    v = values if sign == "positive" else -values
    idx = np.flatnonzero(v > 0)
    order = idx[np.argsort(-v[idx], kind="stable")]
    return order[:k]
