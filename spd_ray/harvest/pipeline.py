"""`spd-ray harvest`: one Ray Data pipeline over a dataset, K long-lived actors, an exact merge.

Shape (analysis.md section 7): rows are produced by Ray Data (sources.py) and handed out with
`Dataset.streaming_split(K)`, so every row reaches exactly one actor and no actor reads rows
another one processes. Each `HarvestActor` holds the decomposed model and an `Accumulator` for the
whole run. When the data is exhausted, the component range is cut into shards; one Ray task per
shard pulls that range from every actor, sums it (exact for counts) and writes its rows of the
memory-mapped matrices and its examples file. No process ever holds the full merged state.

The harvest is written into `harvest.partial/` and swapped in at the end; an interrupted harvest
is removed and started over by the next run (the partial state of live actors cannot be resumed
exactly, and two partial results are never mixed). One harvest of a run at a time: a second one
fails at once naming the first one's process.

On a multi-node cluster the actors and merge tasks land on any node, so the run directory must be
one every node sees (checked before any work); `meta.json` records each actor's node. An actor
that dies with its node holds rows no other actor saw, so its share cannot be redone alone: the
harvest stops with `HarvestFailedError`, naming the lost actor and what to rerun, and writes
nothing (never a harvest with rows missing).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm import tqdm

from spd_ray.config import LMTaskConfig
from spd_ray.harvest.accumulate import HarvestSettings, merge_shards
from spd_ray.harvest.sources import (
    TOY_DATA_TYPES,
    LMSource,
    Source,
    ToySource,
    build_dataset,
    lm_source,
)
from spd_ray.harvest.store import (
    FORMAT,
    create_arrays,
    example_table,
    finish_partial,
    harvest_lock,
    recover,
    start_partial,
    write_examples,
    write_rows,
)

MERGE_BYTES = 256 << 20  # target size of one merge shard (all actors' slices together)
LOST_PROBE_S = 30.0  # how long a live actor may take to answer when another one was lost


class HarvestFailedError(RuntimeError):
    """A harvest that lost one of its actors (its node left the cluster, or the process died)."""


@dataclass(frozen=True)
class HarvestOptions:
    dataset: str | None = None  # LM: name or path (default: the run's); toy: a data_generation_type
    split: str | None = None
    column: str | None = None
    tokens: int | None = None  # token positions to read (toy: inputs)
    batches: int | None = None  # or this many batches of batch_size rows
    batch_size: int = 32
    actors: int = 1
    gpu: bool = False
    settings: HarvestSettings = HarvestSettings()
    out: str | None = None  # output root (resolves @tiny-lm names); default: the run's
    progress: bool = True

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"--actors must be at least 1, got {self.actors}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.tokens is not None and self.batches is not None:
            raise ValueError("give --tokens or --batches, not both")
        for name in ("tokens", "batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name} must be at least 1, got {value}")


# -- the actor -----------------------------------------------------------------------------------


class HarvestActor:
    """Holds the decomposed model and one Accumulator; consumes one split of the rows."""

    def __init__(
        self,
        run_dir: str,
        out: str | None,
        settings: HarvestSettings,
        index: int,
        threads: int,
        device: str,
    ):
        from spd_ray.api import load_run
        from spd_ray.harvest.accumulate import Accumulator, component_keys
        from spd_ray.targets.hf import vocab_size

        torch.set_num_threads(threads)
        loaded = load_run(run_dir, out=out, device=device)
        config = loaded.config
        self.kind = "lm" if isinstance(config.task_config, LMTaskConfig) else "toy"
        if self.kind == "lm":
            n_classes = vocab_size(loaded.target)
            assert n_classes is not None, "the target has no vocab_size"
        else:
            n_classes = int(config.target_model.n_features)  # type: ignore[union-attr]
        self.acc = Accumulator(loaded.model, settings, self.kind, n_classes, index, device)  # type: ignore[arg-type]
        self.rows = 0
        self.keys = component_keys(loaded.model)
        self.modules = [{"path": p, "C": loaded.model.C(p)} for p in loaded.model.module_paths]
        self.n_classes = n_classes
        self.step = loaded.step
        self.index = index

    def placement(self) -> dict[str, Any]:
        """Where this actor runs: {actor, node_id, hostname, node_ip, pid}."""
        from spd_ray.ray_session import here

        return {"actor": self.index, **here()}

    def describe(self) -> dict[str, Any]:
        return {
            "keys": self.keys,
            "modules": self.modules,
            "n_classes": self.n_classes,
            "step": self.step,
        }

    def consume(self, split: Any, batch_size: int) -> tuple[float, float, float]:
        """Process this actor's rows; returns (wall time of its first batch, of its end, seconds
        spent in the model and accumulators)."""
        first, busy = None, 0.0
        for batch in split.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=2
        ):
            t0 = time.time()
            first = first if first is not None else t0
            # Ray hands out read-only arrays: copy (torch wants writable memory).
            uid = torch.tensor(batch["uid"])
            if self.kind == "lm":
                self.acc.add_tokens(
                    torch.tensor(batch["tokens"]), torch.tensor(batch["n_valid"]), uid
                )
            else:
                self.acc.add_inputs(torch.tensor(batch["x"]), uid)
            self.rows += len(uid)
            busy += time.time() - t0
        now = time.time()
        return (first if first is not None else now), now, busy

    def progress(self) -> tuple[int, int, int, int]:
        """(rows, valid tokens, bytes of harvest state, peak resident bytes of this actor)."""
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return self.rows, self.acc.n_tokens, self.acc.nbytes(), peak

    def shard(self, lo: int, hi: int) -> dict[str, Any]:
        return self.acc.shard(lo, hi)


def _merge_shard(
    partial: str, shard: int, lo: int, hi: int, lm: bool, *parts: dict[str, Any]
) -> dict[str, Any]:
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
    return {
        "firing_counts": merged["firing_counts"].numpy(),
        "ci_sums": merged["ci_sums"].numpy(),
        "act_sums": merged["act_sums"].numpy(),
        "n_top": merged["top"].counts().numpy(),
        "n_reservoir": merged["reservoir"].counts().numpy(),
        "n_tokens": merged["n_tokens"],
        "input_totals": merged["input_totals"].numpy(),
        "output_totals": merged["output_totals"].numpy(),
    }


# -- the driver ----------------------------------------------------------------------------------


def make_source(run_dir: Path, opts: HarvestOptions) -> tuple[Source, int | None]:
    """The data source and the number of rows to read (None: all), validated before Ray starts."""
    from spd_ray.api import _root_for
    from spd_ray.train.rundir import RunDir

    rd = RunDir(run_dir)
    if not rd.checkpoint_path.exists():
        raise FileNotFoundError(
            f"run {run_dir} has no checkpoint ({rd.checkpoint_path.name} missing): harvest a run "
            "that has saved one"
        )
    config = rd.read_config()
    task = config.task_config
    if isinstance(task, LMTaskConfig):
        root = _root_for(run_dir, opts.out)
        src: Source = lm_source(config, task, root, opts.dataset, opts.split, opts.column)
        n_rows = None
        if opts.tokens is not None:
            n_rows = math.ceil(opts.tokens / task.max_seq_len)
        elif opts.batches is not None:
            n_rows = opts.batches * opts.batch_size
        return src, n_rows
    if task.task_name not in ("tms", "resid_mlp"):
        raise ValueError(
            f"harvest supports language-model and tms/resid_mlp runs, not {task.task_name!r}"
        )
    for name in ("split", "column"):
        if getattr(opts, name) is not None:
            raise ValueError(
                f"--{name} applies to language-model runs only (this is a {task.task_name} run)"
            )
    task_dict = task.model_dump()
    if opts.dataset is not None:
        if opts.dataset not in TOY_DATA_TYPES:
            raise ValueError(
                "--dataset for a toy run names a data_generation_type: one of "
                f"{list(TOY_DATA_TYPES)}, got {opts.dataset!r}"
            )
        task_dict["data_generation_type"] = opts.dataset
    n_features = int(config.target_model.n_features)  # type: ignore[union-attr]
    n_rows = opts.tokens if opts.tokens is not None else (opts.batches or 100) * opts.batch_size
    return ToySource(task_dict, n_features, config.seed), n_rows


def _plan_resources(opts: HarvestOptions) -> tuple[float, float, int]:
    """(CPUs per harvest actor, CPUs of the document reader, torch threads per actor)."""
    import ray

    from spd_ray.ray_session import alive_nodes, is_local_cluster

    reader = 0.25
    if not is_local_cluster():
        # An actor leaves room for a reader on its node: on nodes of one CPU, actors of a whole
        # CPU each would hold every CPU of the cluster and starve the reads they wait on.
        sizes = [float(n["Resources"].get("CPU", 0.0)) for n in alive_nodes()]
        smallest = min((c for c in sizes if c > 0), default=1.0 + reader)
        return max(0.1, min(1.0, smallest - reader)), reader, 1
    cpus = float(ray.cluster_resources().get("CPU", 1.0))
    # Leave one CPU free beside the actors: actors that hold every CPU starve the Ray Data
    # work (reads, the split) they wait on.
    per_actor = max(0.1, min(1.0, (cpus - 1.0 - reader) / opts.actors))
    threads = max(1, int(cpus // opts.actors))
    return per_actor, reader, threads


def _shards(N: int, per_component_bytes: int, actors: int) -> list[tuple[int, int]]:
    size = max(1, MERGE_BYTES // max(1, per_component_bytes * actors))
    return [(lo, min(N, lo + size)) for lo in range(0, N, size)]


def run_harvest(run: str | Path, opts: HarvestOptions) -> Path:
    """Harvest a run; returns the harvest directory."""
    from spd_ray.api import resolve_run_dir
    from spd_ray.ray_session import connect_ray, require_gpus
    from spd_ray.storage import check_shared_root
    from spd_ray.sync import run_uri, sync_up

    uri = run_uri(run, opts.out)  # a run in a bucket: harvested in its staging folder, then sent
    run_dir = resolve_run_dir(run, opts.out)
    source, n_rows = make_source(run_dir, opts)
    with harvest_lock(run_dir):
        connect_ray()
        if opts.gpu:  # else Ray queues the actors forever, waiting for GPUs that never come
            require_gpus(opts.actors, f"harvest with --actors {opts.actors}")
        # Actors read the run and merge tasks write the harvest on whichever node they land.
        check_shared_root(run_dir, "the run directory")
        harvest_dir = _harvest(run_dir, source, n_rows, opts)
        if uri is not None:
            sync_up(run_dir, uri)
        return harvest_dir


def _harvest(run_dir: Path, source: Source, n_rows: int | None, opts: HarvestOptions) -> Path:
    """The harvest itself, under the run's harvest lock and on a connected Ray."""
    import ray

    from spd_ray.ray_session import say

    per_actor, reader_cpus, threads = _plan_resources(opts)
    restored = recover(run_dir)
    if restored is not None:
        say(f"[harvest] put back the complete harvest that an interrupted swap left in {restored}")
    partial, stale = start_partial(run_dir)
    if stale:
        say(f"[harvest] removed an unfinished harvest in {run_dir}; starting over")
    actor_cls: Any = ray.remote(HarvestActor)
    device = "cuda" if opts.gpu else "cpu"
    actors: list[Any] = [
        actor_cls.options(
            num_cpus=per_actor, num_gpus=1 if opts.gpu else 0, max_concurrency=2
        ).remote(str(run_dir), opts.out, opts.settings, i, threads, device)
        for i in range(opts.actors)
    ]
    t0 = time.perf_counter()
    placements: list[dict[str, Any]] = [{"actor": i} for i in range(opts.actors)]
    try:
        placements = ray.get([a.placement.remote() for a in actors])
        nodes = sorted({p["node_id"] for p in placements})
        say(
            f"[harvest] {opts.actors} actor(s) on {len(nodes)} node(s): "
            + ", ".join(f"{p['actor']}@{p['node_id'][:12]} ({p['hostname']})" for p in placements)
        )
        info: dict[str, Any] = ray.get(actors[0].describe.remote())
        ds = build_dataset(source, n_rows, reader_cpus)
        splits = ds.streaming_split(opts.actors, equal=False)
        running = [
            a.consume.remote(s, opts.batch_size) for a, s in zip(actors, splits, strict=True)
        ]
        _watch(actors, running, n_rows, source, opts.progress)
        elapsed = time.perf_counter() - t0
        spans = ray.get(running)
        final_stats = ray.get([a.progress.remote() for a in actors])
        streaming_s = max(e for _, e, _ in spans) - min(f for f, _, _ in spans)
        n_tokens, shards = _merge_all(actors, info, source, partial, opts)
    except ray.exceptions.RayError as err:
        lost = _lost_actors(actors, placements)
        for a in actors:
            ray.kill(a)
        if lost:
            raise HarvestFailedError(_lost_message(run_dir, lost, err)) from err
        raise
    except BaseException:
        for a in actors:
            ray.kill(a)
        raise
    for a in actors:
        ray.kill(a)
    meta = {
        "format": FORMAT,
        "kind": source.kind,
        "run": str(run_dir),
        "run_step": info["step"],
        "source": _describe(source),
        "rows_limit": n_rows,
        "batch_size": opts.batch_size,
        "actors": opts.actors,
        "gpu": opts.gpu,
        "settings": asdict(opts.settings),
        "n_tokens": n_tokens,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(n_tokens / max(elapsed, 1e-9), 1),
        # From the first batch any actor started to the last one finished: without the start-up.
        "streaming_seconds": round(streaming_s, 3),
        "streaming_tokens_per_s": round(n_tokens / max(streaming_s, 1e-9), 1),
        "actor_busy_seconds": [round(b, 3) for _, _, b in spans],
        "actor_state_mb": [round(st[2] / 2**20, 1) for st in final_stats],
        "actor_peak_rss_mb": [round(st[3] / 2**20, 1) for st in final_stats],
        "actor_nodes": placements,
        "component_keys": info["keys"],
        "modules": info["modules"],
        "n_classes": info["n_classes"],
        "shards": shards,
    }
    final = finish_partial(run_dir, meta)
    say(
        f"[harvest] {n_tokens} tokens in {elapsed:.1f} s ({meta['tokens_per_s']} tokens/s; "
        f"{meta['streaming_tokens_per_s']} tokens/s once streaming) -> {final}"
    )
    return final


def _lost_actors(actors: list[Any], placements: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The placements of the actors that are gone: their node left the cluster, or their process
    died (not an actor whose constructor failed: that error is the one to show)."""
    import ray

    from spd_ray.ray_session import alive_nodes

    alive = {n["NodeID"] for n in alive_nodes()}
    lost = []
    for actor, where in zip(actors, placements, strict=True):
        if "node_id" in where and where["node_id"] not in alive:
            lost.append(where)
            continue
        try:
            ray.get(actor.progress.remote(), timeout=LOST_PROBE_S)
        except ray.exceptions.RayActorError as dead:
            if not dead.actor_init_failed:
                lost.append(where)
        except ray.exceptions.GetTimeoutError:
            pass  # alive but busy: not lost
    return lost


def _lost_message(run_dir: Path, lost: list[dict[str, Any]], err: BaseException) -> str:
    def where(p: dict[str, Any]) -> str:
        if "node_id" not in p:
            return f"actor {p['actor']} (before it started)"
        return (
            f"actor {p['actor']} (node {p['node_id'][:12]}, host {p['hostname']}, pid {p['pid']})"
        )

    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return (
        f"the harvest of {run_dir} lost {', '.join(where(p) for p in lost)}: its node left the "
        f"Ray cluster or its process died ({first.strip()[:200]}); its rows cannot be redone "
        f"alone, so nothing was written - rerun `spd-ray harvest {run_dir}` with the same "
        "options to harvest again from the start"
    )


def _describe(source: Source) -> dict[str, Any]:
    if isinstance(source, LMSource):
        return {
            "dataset": source.dataset,
            "split": source.split,
            "column": source.column,
            "tokenizer": source.tokenizer,
            "seq_len": source.seq_len,
            "n_docs": source.n_docs,
        }
    return {"task": source.task, "n_features": source.n_features, "seed": source.seed}


def _watch(
    actors: list[Any], running: list[Any], n_rows: int | None, source: Source, progress: bool
) -> None:
    """Wait for the actors, showing tokens processed and tokens/s; an actor's error ends it."""
    import ray

    seq = source.seq_len if isinstance(source, LMSource) else 1
    total = n_rows * seq if n_rows is not None else None
    unit = "tok" if isinstance(source, LMSource) else "inputs"
    bar = tqdm(
        total=total,
        unit=unit,
        unit_scale=True,
        desc="harvest",
        disable=not progress,
        mininterval=1.0,
    )
    pending = list(running)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in done:
                ray.get(ref)  # raises the actor's error
            stats = ray.get([a.progress.remote() for a in actors])
            rows = sum(s[0] for s in stats)
            bar.n = rows * seq
            bar.set_postfix(
                valid_tokens=sum(s[1] for s in stats), mem_mb=max(s[2] for s in stats) >> 20
            )
            bar.refresh()
    finally:
        bar.close()


def _merge_all(
    actors: list[Any], info: dict[str, Any], source: Source, partial: Path, opts: HarvestOptions
) -> tuple[int, list[tuple[int, int]]]:
    import ray

    lm = isinstance(source, LMSource)
    N, V = len(info["keys"]), info["n_classes"]
    s = opts.settings
    window = (
        2 * s.context + 1 if lm else (source.n_features if isinstance(source, ToySource) else 1)
    )
    per_component = 8 * (N + V * (2 if lm else 1)) + (s.top_k + s.reservoir) * (24 + 12 * window)
    shards = _shards(N, per_component, len(actors))
    create_arrays(partial, N, V, lm)
    merge = ray.remote(num_cpus=0)(_merge_shard)
    results: list[dict[str, Any]] = []
    in_flight: list[Any] = []
    for j, (lo, hi) in enumerate(shards):
        parts = [a.shard.remote(lo, hi) for a in actors]
        in_flight.append(merge.remote(str(partial), j, lo, hi, lm, *parts))
        if len(in_flight) >= 2:  # bound the memory of merges in flight
            results.append(ray.get(in_flight.pop(0)))
    results.extend(ray.get(in_flight))
    cols = {
        k: np.concatenate([r[k] for r in results])
        for k in ("firing_counts", "ci_sums", "act_sums", "n_top", "n_reservoir")
    }
    T = results[0]["n_tokens"]
    np.save(partial / "input_totals.npy", results[0]["input_totals"])
    if lm:
        np.save(partial / "output_totals.npy", results[0]["output_totals"])
    fc = cols["firing_counts"]
    keys = info["keys"]
    table = pa.table(
        {
            "index": pa.array(np.arange(N, dtype=np.int32)),
            "key": pa.array(keys),
            "module": pa.array([k.rpartition(":")[0] for k in keys]),
            "c": pa.array([int(k.rpartition(":")[2]) for k in keys], pa.int32()),
            "firing_count": pa.array(fc),
            "firing_density": pa.array(fc / max(T, 1)),
            "mean_ci": pa.array(cols["ci_sums"] / max(T, 1)),
            "mean_abs_act_firing": pa.array(
                np.where(fc > 0, cols["act_sums"] / np.maximum(fc, 1), 0.0)
            ),
            "n_top": pa.array(cols["n_top"]),
            "n_reservoir": pa.array(cols["n_reservoir"]),
        }
    )
    pq.write_table(table, partial / "components.parquet")
    return int(T), shards
