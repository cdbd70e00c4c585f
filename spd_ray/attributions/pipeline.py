"""`spd-ray attributions`: dataset attributions on Ray Data, in the harvest's pattern.

Rows come from the harvest's Ray Data sources (`build_dataset`: token rows of the run's dataset,
or toy inputs) and reach K long-lived `AttributionActor`s through `Dataset.streaming_split(K)`,
so each row reaches exactly one actor. Each actor holds the decomposed model and one
`Accumulator` over every target row (exact integer sums). When the data is exhausted, the target
rows are cut into ranges; one Ray task per range pulls that range from every actor, sums it
exactly (`merge_states`) and writes its rows of the memory-mapped `attr.npy`, so no process holds
more than its own state or one range of every actor's. The sums being exact, the matrix is the
same bit for bit whatever the number of actors or ranges.

Everything the user can get wrong is checked before Ray starts: the run and its checkpoint, its
kind (induction-head runs have no attributions), the data, the alive filter and `--modules`. The
attributions are built in `attributions.partial/`, marked complete by `meta.json` and swapped in
for `attributions/` in one step (the harvest's store does the same), so a reader never sees a
half-written matrix; an interrupted job leaves the partial folder, which the next one removes
before it starts over (cleanly restartable: partial sums of live actors are not resumable). One
job per run at a time (`attributions_lock`). An actor lost with its node ends the job with one
line and writes nothing, as in the harvest.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from spd_ray.attributions.compute import Accumulator, make_layout, unembed_matrix
from spd_ray.attributions.exact import merge_states
from spd_ray.attributions.layout import Alive, Layout, alive_components, model_kind
from spd_ray.attributions.store import (
    ATTRIBUTIONS_DIR,
    attributions_dir,
    create_matrix,
    finish,
    write_state,
    write_unembed,
)
from spd_ray.errors import InputError
from spd_ray.harvest.merge import _shards, shard_tasks
from spd_ray.harvest.pipeline import (
    HarvestOptions,
    StreamingActor,
    _describe,
    _lost_actors,
    _lost_message,
    _placements,
    _plan_resources,
    _stream_rows,
    _Streamed,
    make_source,
    start_actors,
)
from spd_ray.harvest.records import Placement
from spd_ray.harvest.sources import Source
from spd_ray.harvest.store import recover, start_partial
from spd_ray.io import Lock, replace_dir

WHAT = "attributions"
STATE_BYTES_PER_CELL = 16  # two int64 limbs per (target, source)


class AttributionsFailedError(RuntimeError):
    """An attributions job that lost one of its actors (its node left, or its process died)."""


@dataclass(frozen=True)
class AttributionOptions:
    tokens: int | None = None  # token positions to read (toy: inputs); None: all (toy: 100 batches)
    batches: int | None = None  # or this many batches of batch_size rows
    batch_size: int = 32
    actors: int = 1
    gpu: bool = False
    ci_threshold: float = 0.0  # alive: harvest mean CI above this (no harvest: all alive)
    modules: str | None = None  # comma-separated globs over module paths; None: all modules
    targets_per_backward: int = 16
    shard_mb: int = 256  # one merge task: every actor's slice of its target rows together
    out: str | None = None  # output root (resolves run names and @tiny-lm names)
    progress: bool = True

    def __post_init__(self) -> None:
        self.rows()  # checks --actors, --batch-size, --tokens, --batches
        if self.targets_per_backward < 1:
            raise InputError(
                f"--targets-per-backward must be at least 1, got {self.targets_per_backward}"
            )
        if self.shard_mb < 1:
            raise InputError(f"--shard-mb must be at least 1, got {self.shard_mb}")
        if not self.ci_threshold >= 0:  # also NaN
            raise InputError(f"--ci-threshold must be >= 0, got {self.ci_threshold}")

    def rows(self) -> HarvestOptions:
        """Which rows to read and how to stream them: what the harvest takes."""
        return HarvestOptions(
            tokens=self.tokens,
            batches=self.batches,
            batch_size=self.batch_size,
            actors=self.actors,
            gpu=self.gpu,
            out=self.out,
            progress=self.progress,
        )


def attributions_lock(run_dir: Path) -> Lock:
    return Lock(run_dir / f".{ATTRIBUTIONS_DIR}.lock", f"the attributions of {run_dir}")


# -- the actor -----------------------------------------------------------------------------------


class AttributionActor(StreamingActor):
    """Holds the decomposed model and one Accumulator over every target row; consumes one split
    of the rows (`StreamingActor.consume`) and hands out target ranges of its sums (`shard`)."""

    def __init__(
        self,
        run_dir: str,
        out: str | None,
        layout: dict[str, Any],
        targets_per_backward: int,
        index: int,
        threads: int,
        device: str,
    ):
        from spd_ray.loaded_run import load_run

        torch.set_num_threads(threads)  # tiny models: oversubscribed threads only contend
        loaded = load_run(run_dir, out=out, device=device)
        lay = Layout.from_json(layout)
        model = loaded.model
        assert list(lay.alive) == list(model.module_paths), "the run's modules changed"
        self.kind = lay.kind
        self.acc = Accumulator(model, lay, targets_per_backward=targets_per_backward)
        self.index = index
        self.rows = 0

    def add(self, batch: dict[str, Any]) -> None:
        # Ray hands out read-only arrays: copy (torch wants writable memory).
        if self.kind == "lm":
            self.acc.add(torch.tensor(batch["tokens"]), torch.tensor(batch["n_valid"]))
        else:
            self.acc.add(torch.tensor(batch["x"]))

    def shard(self, lo: int, hi: int) -> dict[str, Any]:
        return self.acc.state(lo, hi)


# -- what the driver checks before Ray starts ----------------------------------------------------


@dataclass(frozen=True)
class Plan:
    """A checked job: the run, its rows, its layout and W_U (language models)."""

    run_dir: Path
    uri: str | None  # the run's object-store URI, if it lives in a bucket
    source: Source
    n_rows: int | None
    layout: Layout
    alive: Alive
    modules: list[str]  # the module paths whose subcomponents take part
    step: int
    unembed: Tensor | None


def plan(run: str | Path, opts: AttributionOptions) -> Plan:
    """Check the run, its data and the options, and lay out the matrix (loads the run on the
    CPU for the alive filter and the connectivity probe)."""
    from spd_ray.clustering.activations import select_modules
    from spd_ray.loaded_run import load_run
    from spd_ray.runs import RunDir, resolve_run_dir
    from spd_ray.sync import run_uri

    uri = run_uri(run, opts.out)  # a run in a bucket: built in its staging folder, then sent
    run_dir = resolve_run_dir(run, opts.out)
    kind = model_kind(RunDir(run_dir).read_config())  # induction-head runs stop here
    source, n_rows = make_source(run_dir, opts.rows())  # the checkpoint is readable, the data too
    loaded = load_run(run_dir, out=opts.out)
    model = loaded.model
    chosen = select_modules(model, opts.modules)
    alive = alive_components(model, run_dir, opts.ci_threshold)
    indices = {p: idx if p in chosen else [] for p, idx in alive.indices.items()}
    layout = make_layout(model, kind, indices)
    unembed = unembed_matrix(model).cpu() if kind == "lm" else None
    return Plan(run_dir, uri, source, n_rows, layout, alive, chosen, loaded.step, unembed)


# -- the driver ----------------------------------------------------------------------------------


def run_attributions(run: str | Path, opts: AttributionOptions) -> Path:
    """Compute a run's dataset attributions; returns `<run>/attributions`."""
    from spd_ray.capacity import require_gpus
    from spd_ray.ray_session import connect_ray, say
    from spd_ray.storage import check_shared_root
    from spd_ray.sync import sync_up

    job = plan(run, opts)
    with attributions_lock(job.run_dir):
        connect_ray()
        if opts.gpu:  # else Ray queues the actors forever, waiting for GPUs that never come
            require_gpus(opts.actors, f"attributions with --actors {opts.actors}")
        # Actors read the run and merge tasks write the matrix on whichever node they land.
        check_shared_root(job.run_dir, "the run directory")
        say(f"[{WHAT}] {job.alive.message}")
        if opts.modules is not None:
            n, m = job.layout.n_components, len(job.modules)
            say(f"[{WHAT}] --modules {opts.modules}: the {n} of them in {m} module(s) take part")
        final = _attributions(job, opts)
        if job.uri is not None:
            sync_up(job.run_dir, job.uri)
        return final


def _attributions(job: Plan, opts: AttributionOptions) -> Path:
    """The job itself, under the run's attributions lock and on a connected Ray. However it ends,
    its actors are killed; an unfinished job leaves `attributions.partial/`."""
    import ray

    from spd_ray.ray_session import say

    rows = opts.rows()
    per_actor, reader_cpus, threads = _plan_resources(rows)
    partial = _fresh_partial(job.run_dir)
    create_matrix(partial, job.layout)
    if job.unembed is not None:
        write_unembed(partial, job.unembed)
    args = (str(job.run_dir), opts.out, job.layout.to_json(), opts.targets_per_backward)
    actors = start_actors(AttributionActor, opts.actors, opts.gpu, per_actor, threads, *args)
    t0 = time.perf_counter()
    placements: Sequence[Placement | None] = [None] * len(actors)  # None: not started yet
    try:
        placements = placed = _placements(actors, WHAT)
        # Blocks of one batch: also a few batches spread over every actor.
        streamed = _stream_rows(
            actors, job.source, job.n_rows, reader_cpus, rows, t0, WHAT, opts.batch_size
        )
        if sum(p.valid_tokens for p in streamed.final) == 0:
            raise InputError(f"no tokens to attribute: the data of {job.run_dir} gave none")
        cell = STATE_BYTES_PER_CELL * job.layout.n_sources
        shards = _shards(job.layout.n_targets, cell, len(actors), opts.shard_mb << 20)
        counts = shard_tasks(actors, shards, _merge_shard, str(partial))
    except ray.exceptions.RayError as err:
        lost = _lost_actors(actors, placements)
        if lost:
            raise AttributionsFailedError(_lost_message(job.run_dir, lost, err, WHAT)) from err
        raise
    finally:
        for a in actors:
            ray.kill(a)
    assert all(c == counts[0] for c in counts), f"shards merged different batches: {counts}"
    n_tokens, n_batches = counts[0]
    finish(partial, job.layout, n_tokens, n_batches, _info(job, opts, placed, streamed, shards))
    final = attributions_dir(job.run_dir)
    replace_dir(partial, final)
    elapsed, streaming = streamed.elapsed_s, streamed.streaming_s
    say(
        f"[{WHAT}] {n_tokens} tokens in {elapsed:.1f} s ({n_tokens / elapsed:.1f} tokens/s; "
        f"{n_tokens / max(streaming, 1e-9):.1f} tokens/s once streaming) -> {final}"
    )
    return final


def _fresh_partial(run_dir: Path) -> Path:
    """An empty `attributions.partial/`, after putting back complete attributions that an
    interrupted swap left aside and removing unfinished ones."""
    from spd_ray.ray_session import say

    restored = recover(run_dir, ATTRIBUTIONS_DIR)
    if restored is not None:
        say(f"[{WHAT}] put back the complete attributions an interrupted swap left in {restored}")
    partial, stale = start_partial(run_dir, ATTRIBUTIONS_DIR, subdirs=())
    if stale:
        say(f"[{WHAT}] removed unfinished attributions in {run_dir}; starting over")
    return partial


def _merge_shard(
    partial: str, shard: int, lo: int, hi: int, *parts: dict[str, Any]
) -> tuple[int, int]:
    """Sum target rows [lo, hi) over all actors and write their means; returns the merged
    (tokens, batches), which every shard must agree on."""
    merged = merge_states(list(parts))
    assert merged["targets"] == (lo, hi), f"shard {shard}: {merged['targets']} vs {(lo, hi)}"
    write_state(Path(partial), merged)
    return merged["n_tokens"], merged["n_batches"]


def _info(
    job: Plan,
    opts: AttributionOptions,
    placements: list[Placement],
    streamed: _Streamed,
    shards: list[tuple[int, int]],
) -> dict[str, Any]:
    """What meta.json records besides the layout and the counts: the run, the data, the alive
    filter, and how the job ran (actors, their nodes, speed, memory)."""
    n_tokens = sum(p.valid_tokens for p in streamed.final)
    elapsed, streaming = streamed.elapsed_s, streamed.streaming_s
    return {
        "run": str(job.run_dir),
        "run_step": job.step,
        "source": _describe(job.source),
        "rows_limit": job.n_rows,
        "batch_size": opts.batch_size,
        "alive": {
            "source": job.alive.source,
            "ci_threshold": opts.ci_threshold,
            "message": job.alive.message,
        },
        "modules": opts.modules,
        "targets_per_backward": opts.targets_per_backward,
        "actors": opts.actors,
        "gpu": opts.gpu,
        "seconds": round(elapsed, 3),
        "tokens_per_s": round(n_tokens / max(elapsed, 1e-9), 1),
        # From the first batch any actor started to the last one finished: no start-up.
        "streaming_seconds": round(streaming, 3),
        "streaming_tokens_per_s": round(n_tokens / max(streaming, 1e-9), 1),
        "actor_tokens": [p.valid_tokens for p in streamed.final],
        "actor_busy_seconds": [round(s.busy_s, 3) for s in streamed.spans],
        "actor_state_mb": [round(p.state_bytes / 2**20, 1) for p in streamed.final],
        "actor_peak_rss_mb": [round(p.peak_rss_bytes / 2**20, 1) for p in streamed.final],
        "actor_nodes": [asdict(p) for p in placements],
        "shards": shards,
    }
