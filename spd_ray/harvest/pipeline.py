"""`spd-ray harvest`: one Ray Data pipeline over a dataset, K long-lived actors, an exact merge.

Rows are produced by Ray Data (sources.py) and handed out with `Dataset.streaming_split(K)`, so
every row reaches exactly one actor and no actor reads rows another one processes. Each
`HarvestActor` holds the decomposed model and an `Accumulator` for the whole run (long-lived
actors, not a stateless `map_batches`: the statistics need a final merge, and per-batch partial
states of [N, V] matrices would be far too large to pass around). When the data is exhausted, the
component range is cut into shards; one Ray task per shard pulls that range from every actor, sums
it (exact for counts) and writes its rows of the memory-mapped matrices and its examples file. No
process ever holds the full merged state.

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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from spd_ray.config import LMTaskConfig
from spd_ray.errors import InputError, NotFoundError
from spd_ray.harvest.accumulate import HarvestSettings
from spd_ray.harvest.merge import Merged, merge_all
from spd_ray.harvest.records import (
    ActorProgress,
    ActorSpan,
    HarvestMeta,
    ModelInfo,
    ModuleInfo,
    Placement,
)
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
    finish_partial,
    harvest_lock,
    recover,
    start_partial,
)

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
            raise InputError(f"--actors must be at least 1, got {self.actors}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.tokens is not None and self.batches is not None:
            raise InputError("give --tokens or --batches, not both")
        for name in ("tokens", "batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"--{name} must be at least 1, got {value}")


# -- the actor -----------------------------------------------------------------------------------


class StreamingActor:
    """A long-lived actor that consumes one split of the rows into its accumulator `acc` (which
    has `n_tokens` and `nbytes()`); subclasses load the model, make `acc` and `add` a batch. The
    attributions' actor is one too."""

    acc: Any
    index: int
    kind: str  # "lm" | "toy"
    rows: int = 0

    def add(self, batch: dict[str, Any]) -> None:
        raise NotImplementedError

    def placement(self) -> Placement:
        from spd_ray.ray_session import here

        return Placement(actor=self.index, **here())

    def consume(self, split: Any, batch_size: int) -> ActorSpan:
        """Process this actor's rows."""
        first, busy = None, 0.0
        for batch in split.iter_batches(
            batch_size=batch_size, batch_format="numpy", prefetch_batches=2
        ):
            t0 = time.time()
            first = first if first is not None else t0
            self.add(batch)
            self.rows += len(batch["uid"])
            busy += time.time() - t0
        now = time.time()
        return ActorSpan(first if first is not None else now, now, busy)

    def progress(self) -> ActorProgress:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return ActorProgress(self.rows, self.acc.n_tokens, self.acc.nbytes(), peak)


class HarvestActor(StreamingActor):
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
        from spd_ray.harvest.accumulate import Accumulator, component_keys
        from spd_ray.loaded_run import load_run
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
        self.modules = [ModuleInfo(p, loaded.model.C(p)) for p in loaded.model.module_paths]
        self.n_classes = n_classes
        self.step = loaded.step
        self.index = index

    def describe(self) -> ModelInfo:
        return ModelInfo(self.keys, self.modules, self.n_classes, self.step)

    def add(self, batch: dict[str, Any]) -> None:
        # Ray hands out read-only arrays: copy (torch wants writable memory).
        uid = torch.tensor(batch["uid"])
        if self.kind == "lm":
            self.acc.add_tokens(torch.tensor(batch["tokens"]), torch.tensor(batch["n_valid"]), uid)
        else:
            self.acc.add_inputs(torch.tensor(batch["x"]), uid)

    def shard(self, lo: int, hi: int) -> dict[str, Any]:
        return self.acc.shard(lo, hi)


# -- the driver ----------------------------------------------------------------------------------


def make_source(run_dir: Path, opts: HarvestOptions) -> tuple[Source, int | None]:
    """The data source and the number of rows to read (None: all), validated before Ray starts."""
    from spd_ray.runs import RunDir, assets_root

    rd = RunDir(run_dir)
    # Read (memory-mapped, tensors only) before Ray starts: a missing, torn or crafted checkpoint
    # fails here in one line instead of in every actor.
    if rd.newest_state(mmap=True) is None:
        raise NotFoundError(
            f"run {run_dir} has no checkpoint ({rd.checkpoint_path.name} missing): harvest a run "
            "that has saved one"
        )
    config = rd.read_config()
    task = config.task_config
    if isinstance(task, LMTaskConfig):
        root = assets_root(run_dir, opts.out)
        src: Source = lm_source(config, task, root, opts.dataset, opts.split, opts.column)
        n_rows = None
        if opts.tokens is not None:
            n_rows = math.ceil(opts.tokens / task.max_seq_len)
        elif opts.batches is not None:
            n_rows = opts.batches * opts.batch_size
        return src, n_rows
    if task.task_name not in ("tms", "resid_mlp"):
        raise InputError(
            f"harvest supports language-model and tms/resid_mlp runs, not {task.task_name!r}"
        )
    for name in ("split", "column"):
        if getattr(opts, name) is not None:
            raise InputError(
                f"--{name} applies to language-model runs only (this is a {task.task_name} run)"
            )
    task_dict = task.model_dump()
    if opts.dataset is not None:
        if opts.dataset not in TOY_DATA_TYPES:
            raise InputError(
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


def run_harvest(run: str | Path, opts: HarvestOptions) -> Path:
    """Harvest a run; returns the harvest directory."""
    from spd_ray.capacity import require_gpus
    from spd_ray.ray_session import connect_ray
    from spd_ray.runs import resolve_run_dir
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
    """The harvest itself, under the run's harvest lock and on a connected Ray. However it ends,
    its actors are killed; an unfinished harvest leaves `harvest.partial/`, which the next
    harvest removes before it starts over."""
    import ray

    from spd_ray.ray_session import say

    per_actor, reader_cpus, threads = _plan_resources(opts)
    partial = _fresh_partial(run_dir)
    actors = _start_actors(run_dir, opts, per_actor, threads)
    t0 = time.perf_counter()
    placements: Sequence[Placement | None] = [None] * len(actors)  # None: not started yet
    try:
        placements = placed = _placements(actors)
        info: ModelInfo = ray.get(actors[0].describe.remote())
        streamed = _stream_rows(actors, source, n_rows, reader_cpus, opts, t0)
        merged = merge_all(actors, info, source, partial, opts.settings)
    except ray.exceptions.RayError as err:
        lost = _lost_actors(actors, placements)
        if lost:
            raise HarvestFailedError(_lost_message(run_dir, lost, err)) from err
        raise
    finally:
        for a in actors:
            ray.kill(a)
    meta = _meta(run_dir, source, n_rows, opts, info, placed, streamed, merged)
    final = finish_partial(run_dir, meta.to_json())
    dropped = ""
    if meta.output_dropped_per_firing_max is not None and opts.settings.output_top_k > 0:
        dropped = (
            f"; output top-{opts.settings.output_top_k} left out at most "
            f"{meta.output_dropped_per_firing_max:.3g} of a component's mass per firing"
        )
    say(
        f"[harvest] {merged.n_tokens} tokens in {streamed.elapsed_s:.1f} s "
        f"({meta.tokens_per_s} tokens/s; {meta.streaming_tokens_per_s} tokens/s once streaming"
        f"{dropped}) -> {final}"
    )
    return final


def _fresh_partial(run_dir: Path) -> Path:
    """An empty `harvest.partial/`, after putting back a complete harvest that an interrupted
    swap left aside and removing an unfinished one."""
    from spd_ray.ray_session import say

    restored = recover(run_dir)
    if restored is not None:
        say(f"[harvest] put back the complete harvest that an interrupted swap left in {restored}")
    partial, stale = start_partial(run_dir)
    if stale:
        say(f"[harvest] removed an unfinished harvest in {run_dir}; starting over")
    return partial


def _start_actors(run_dir: Path, opts: HarvestOptions, cpus: float, threads: int) -> list[Any]:
    args = (str(run_dir), opts.out, opts.settings)
    return start_actors(HarvestActor, opts.actors, opts.gpu, cpus, threads, *args)


def start_actors(
    actor: type[StreamingActor], n: int, gpu: bool, cpus: float, threads: int, *args: Any
) -> list[Any]:
    """n actors `actor(*args, index, threads, device)` of `cpus` CPUs (and one GPU each with
    `gpu`); the attributions start theirs here too."""
    import ray

    actor_cls: Any = ray.remote(actor)
    device = "cuda" if gpu else "cpu"
    return [
        actor_cls.options(num_cpus=cpus, num_gpus=1 if gpu else 0, max_concurrency=2).remote(
            *args, i, threads, device
        )
        for i in range(n)
    ]


def _placements(actors: list[Any], what: str = "harvest") -> list[Placement]:
    """Where each actor runs, once all have started (their constructors load the model)."""
    import ray

    from spd_ray.ray_session import say

    placements: list[Placement] = ray.get([a.placement.remote() for a in actors])
    nodes = sorted({p.node_id for p in placements})
    say(
        f"[{what}] {len(actors)} actor(s) on {len(nodes)} node(s): "
        + ", ".join(f"{p.actor}@{p.node_id[:12]} ({p.hostname})" for p in placements)
    )
    return placements


@dataclass(frozen=True)
class _Streamed:
    """What streaming the rows measured: seconds from the actors' start to the last row, and
    each actor's span and final counts."""

    elapsed_s: float
    spans: list[ActorSpan]
    final: list[ActorProgress]

    @property
    def streaming_s(self) -> float:
        """From the first batch any actor started to the last one finished: no start-up."""
        return max(s.end for s in self.spans) - min(s.first_batch for s in self.spans)


def _stream_rows(
    actors: list[Any],
    source: Source,
    n_rows: int | None,
    reader_cpus: float,
    opts: HarvestOptions,
    started: float,
    what: str = "harvest",
    rows_per_block: int | None = None,
) -> _Streamed:
    """Split the rows among the actors (`StreamingActor`s) and wait until they have consumed them
    all. `rows_per_block`: cut the reader's blocks (64 documents' rows) to at most this many
    rows, so that few rows still reach every actor (streaming, in order)."""
    import ray

    ds = build_dataset(source, n_rows, reader_cpus)
    if rows_per_block is not None:
        ds = ds.repartition(target_num_rows_per_block=rows_per_block)
    splits = ds.streaming_split(len(actors), equal=False)
    running = [a.consume.remote(s, opts.batch_size) for a, s in zip(actors, splits, strict=True)]
    _watch(actors, running, n_rows, source, opts.progress, what)
    elapsed = time.perf_counter() - started
    return _Streamed(elapsed, ray.get(running), ray.get([a.progress.remote() for a in actors]))


def _meta(
    run_dir: Path,
    source: Source,
    n_rows: int | None,
    opts: HarvestOptions,
    info: ModelInfo,
    placements: list[Placement],
    streamed: _Streamed,
    merged: Merged,
) -> HarvestMeta:
    n_tokens, elapsed, streaming_s = merged.n_tokens, streamed.elapsed_s, streamed.streaming_s
    lm = source.kind == "lm"
    return HarvestMeta(
        format=FORMAT,
        kind=source.kind,
        run=str(run_dir),
        run_step=info.step,
        source=_describe(source),
        rows_limit=n_rows,
        batch_size=opts.batch_size,
        actors=opts.actors,
        gpu=opts.gpu,
        settings=opts.settings,
        n_tokens=n_tokens,
        seconds=round(elapsed, 3),
        tokens_per_s=round(n_tokens / max(elapsed, 1e-9), 1),
        streaming_seconds=round(streaming_s, 3),
        streaming_tokens_per_s=round(n_tokens / max(streaming_s, 1e-9), 1),
        actor_busy_seconds=[round(s.busy_s, 3) for s in streamed.spans],
        actor_state_mb=[round(p.state_bytes / 2**20, 1) for p in streamed.final],
        actor_peak_rss_mb=[round(p.peak_rss_bytes / 2**20, 1) for p in streamed.final],
        actor_nodes=placements,
        component_keys=info.keys,
        modules=info.modules,
        n_classes=info.n_classes,
        shards=merged.shards,
        output_dropped_total=merged.output_dropped_total if lm else None,
        output_dropped_per_firing_max=merged.output_dropped_per_firing_max if lm else None,
    )


def _lost_actors(actors: list[Any], placements: Sequence[Placement | None]) -> list[str]:
    """The actors that are gone, described: their node left the cluster, or their process died
    (not an actor whose constructor failed: that error is the one to show)."""
    import ray

    from spd_ray.ray_session import alive_nodes

    alive = {n["NodeID"] for n in alive_nodes()}
    lost = []
    for i, (actor, where) in enumerate(zip(actors, placements, strict=True)):
        who = where.describe() if where is not None else f"actor {i} (before it started)"
        if where is not None and where.node_id not in alive:
            lost.append(who)
            continue
        try:
            ray.get(actor.progress.remote(), timeout=LOST_PROBE_S)
        except ray.exceptions.RayActorError as dead:
            if not dead.actor_init_failed:
                lost.append(who)
        except ray.exceptions.GetTimeoutError:
            pass  # alive but busy: not lost
    return lost


def _lost_message(run_dir: Path, lost: list[str], err: BaseException, what: str = "harvest") -> str:
    """`what`: the command (`spd-ray <what>`) and what it makes."""
    first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
    return (
        f"the {what} of {run_dir} lost {', '.join(lost)}: its node left the "
        f"Ray cluster or its process died ({first.strip()[:200]}); its rows cannot be redone "
        f"alone, so nothing was written - rerun `spd-ray {what} {run_dir}` with the same "
        f"options to {'harvest again from the start' if what == 'harvest' else 'start over'}"
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
    actors: list[Any],
    running: list[Any],
    n_rows: int | None,
    source: Source,
    progress: bool,
    what: str = "harvest",
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
        desc=what,
        disable=not progress,
        mininterval=1.0,
    )
    pending = list(running)
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            for ref in done:
                ray.get(ref)  # raises the actor's error
            stats: list[ActorProgress] = ray.get([a.progress.remote() for a in actors])
            bar.n = sum(s.rows for s in stats) * seq
            bar.set_postfix(
                valid_tokens=sum(s.valid_tokens for s in stats),
                mem_mb=max(s.state_bytes for s in stats) >> 20,
            )
            bar.refresh()
    finally:
        bar.close()
