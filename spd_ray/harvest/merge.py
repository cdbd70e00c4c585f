"""The exact merge of a harvest: the actors' states summed component range by component range,
each range by one Ray task that writes its rows of the memory-mapped matrices and its examples
file, so no process ever holds the full merged state; then the totals and the components table.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from spd_ray.harvest.accumulate import HarvestSettings, merge_shards
from spd_ray.harvest.records import ModelInfo, ShardColumns
from spd_ray.harvest.sources import LMSource, Source, ToySource
from spd_ray.harvest.store import create_arrays, example_table, write_examples, write_rows

MERGE_BYTES = 256 << 20  # target size of one merge shard (all actors' slices together)


@dataclass(frozen=True)
class Merged:
    """What the merge wrote: the tokens harvested and the component range of each shard."""

    n_tokens: int
    shards: list[tuple[int, int]]  # component ranges [lo, hi), one examples file each
    output_dropped_total: float  # the output mass top-k left out (0 for toys and the exact path)
    output_dropped_per_firing_max: float  # its max over components per firing


def merge_all(
    actors: list[Any], info: ModelInfo, source: Source, partial: Path, settings: HarvestSettings
) -> Merged:
    """Merge the actors' states shard by shard into `partial`, then write the totals and the
    components table."""
    lm = isinstance(source, LMSource)
    N, V = len(info.keys), info.n_classes
    s = settings
    window = (
        2 * s.context + 1 if lm else (source.n_features if isinstance(source, ToySource) else 1)
    )
    per_component = 8 * (N + V * (2 if lm else 1)) + (s.top_k + s.reservoir) * (24 + 12 * window)
    shards = _shards(N, per_component, len(actors))
    create_arrays(partial, N, V, lm)
    results = _merge_shards(actors, shards, partial, lm)
    T = results[0].n_tokens
    np.save(partial / "input_totals.npy", results[0].input_totals)
    if lm:
        np.save(partial / "output_totals.npy", results[0].output_totals)
    pq.write_table(_components_table(info.keys, results, T), partial / "components.parquet")
    dropped = np.concatenate([r.output_dropped for r in results])
    per_firing = _per_firing(dropped, np.concatenate([r.firing_counts for r in results]))
    return Merged(
        int(T), shards, float(dropped.sum()), float(per_firing.max()) if len(dropped) else 0.0
    )


def _per_firing(total: np.ndarray, firing_counts: np.ndarray) -> np.ndarray:
    return np.where(firing_counts > 0, total / np.maximum(firing_counts, 1), 0.0)


def _merge_shards(
    actors: list[Any], shards: list[tuple[int, int]], partial: Path, lm: bool
) -> list[ShardColumns]:
    return shard_tasks(actors, shards, _merge_shard, str(partial), lm)


def shard_tasks(
    actors: list[Any], shards: list[tuple[int, int]], task: Callable[..., Any], *args: Any
) -> list[Any]:
    """One Ray task per range [lo, hi), `task(*args, j, lo, hi, *parts)` with `parts` every
    actor's `shard(lo, hi)`, at most two in flight (each holds every actor's slice of its
    range); their results in range order. The attributions merge the same way."""
    import ray

    remote = ray.remote(num_cpus=0)(task)
    results: list[Any] = []
    in_flight: list[Any] = []
    for j, (lo, hi) in enumerate(shards):
        parts = [a.shard.remote(lo, hi) for a in actors]
        in_flight.append(remote.remote(*args, j, lo, hi, *parts))
        if len(in_flight) >= 2:
            results.append(ray.get(in_flight.pop(0)))
    results.extend(ray.get(in_flight))
    return results


def _components_table(keys: list[str], shards: list[ShardColumns], T: int) -> pa.Table:
    """`components.parquet`: one row per subcomponent, in component order."""
    N = len(keys)
    fc = np.concatenate([r.firing_counts for r in shards])
    ci_sums = np.concatenate([r.ci_sums for r in shards])
    act_sums = np.concatenate([r.act_sums for r in shards])
    dropped = np.concatenate([r.output_dropped for r in shards])
    return pa.table(
        {
            "index": pa.array(np.arange(N, dtype=np.int32)),
            "key": pa.array(keys),
            "module": pa.array([k.rpartition(":")[0] for k in keys]),
            "c": pa.array([int(k.rpartition(":")[2]) for k in keys], pa.int32()),
            "firing_count": pa.array(fc),
            "firing_density": pa.array(fc / max(T, 1)),
            "mean_ci": pa.array(ci_sums / max(T, 1)),
            "mean_abs_act_firing": pa.array(_per_firing(act_sums, fc)),
            "n_top": pa.array(np.concatenate([r.n_top for r in shards])),
            "n_reservoir": pa.array(np.concatenate([r.n_reservoir for r in shards])),
            # Output mass per firing that top-k left out: bounds this row's output measures.
            "output_dropped_per_firing": pa.array(_per_firing(dropped, fc)),
        }
    )


def _shards(
    N: int, per_component_bytes: int, actors: int, budget: int = MERGE_BYTES
) -> list[tuple[int, int]]:
    """Ranges of [0, N) whose slices from all actors take about `budget` bytes together."""
    size = max(1, budget // max(1, per_component_bytes * actors))
    return [(lo, min(N, lo + size)) for lo in range(0, N, size)]


def _merge_shard(
    partial: str, lm: bool, shard: int, lo: int, hi: int, *parts: dict[str, Any]
) -> ShardColumns:
    """Sum one component range over all actors and write it; returns the per-component columns."""
    merged = merge_shards(list(parts))
    p = Path(partial)
    write_rows(p, "cofiring", lo, merged["cofiring"].numpy())
    write_rows(p, "input_counts", lo, merged["input_counts"].numpy())
    if lm:
        write_rows(p, "output_mass", lo, merged["output_mass"].numpy())
    write_examples(
        p,
        shard,
        [
            example_table(merged["top"], "top", lo),
            example_table(merged["reservoir"], "reservoir", lo),
        ],
    )
    return ShardColumns(
        firing_counts=merged["firing_counts"].numpy(),
        ci_sums=merged["ci_sums"].numpy(),
        act_sums=merged["act_sums"].numpy(),
        n_top=merged["top"].counts().numpy(),
        n_reservoir=merged["reservoir"].counts().numpy(),
        output_dropped=merged["output_dropped"].numpy(),
        n_tokens=merged["n_tokens"],
        input_totals=merged["input_totals"].numpy(),
        output_totals=merged["output_totals"].numpy(),
    )
