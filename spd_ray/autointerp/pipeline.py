"""`spd-ray autointerp`: label harvested subcomponents with an LLM, then score the labels, on a
Ray Data actor pool of async workers.

The driver selects the subcomponents (alive, filtered, not yet done), builds every prompt from the
harvest, checks the endpoint once (an unreachable URL, a rejected key or an unknown model fails
here, before any work), and streams the tasks through `map_batches(LLMWorker,
compute=ActorPoolStrategy(size=actors))`. Each worker holds one `LLMClient` and a semaphore of
`concurrency`, so at most actors x concurrency requests are ever in flight; every request first
asks the run's named limiter actor (requests per minute, USD budget), which all workers share.
Results come back to the driver, which appends them to the label store as they arrive: a killed
run keeps everything finished, and a rerun sends requests only for what is not done yet. The
budget is the store's: what earlier runs spent (the usage on the store's lines) is counted against
it. One run per store at a time: the driver holds the store's lock from the endpoint check on.

On a multi-node cluster the limiter lives on the driver's node and the workers anywhere; each
result says which worker made it, and the store's `workers.json` lists them (actor, node, host,
pid). A worker whose node dies is restarted elsewhere by Ray Data, which resends that worker's
unfinished batches; a loss it cannot recover from stops the run with `AutointerpFailedError`,
one line naming the store that keeps every finished result and the command to rerun.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import TypeAdapter
from tqdm import tqdm

from spd_ray.autointerp.client import LLMClient, LLMSettings
from spd_ray.autointerp.errors import FatalLLMError, LLMError, Usage
from spd_ray.autointerp.prompt import PromptSettings, label_messages
from spd_ray.autointerp.scoring import SCORE_KINDS, ScoreKind
from spd_ray.autointerp.store import LabelStore
from spd_ray.autointerp.tasks import (
    LABEL_RESULT,
    SCORE_RESULT,
    LabelTask,
    Result,
    ScoreFailed,
    ScoreTask,
    row,
)
from spd_ray.autointerp.trials import score_trials
from spd_ray.autointerp.worker import LLMWorker, WorkerPlace
from spd_ray.errors import InputError
from spd_ray.harvest.store import Harvest

if TYPE_CHECKING:
    from spd_ray.autointerp.limits import RayLimiter


class AutointerpFailedError(RuntimeError):
    """A run that Ray could not finish (a lost node, worker or result): what finished is kept."""


@dataclass(frozen=True)
class AutointerpOptions:
    llm: LLMSettings
    actors: int = 2
    concurrency: int = 8  # requests in flight per actor
    rpm: float | None = None
    budget_usd: float | None = None
    limit: int | None = None
    min_density: float = 0.0
    modules: tuple[str, ...] = ()  # fnmatch patterns of module paths; empty: all
    scores: tuple[ScoreKind, ...] = ()
    dry_run: int = 0  # >0: print this many prompts and send nothing
    seed: int = 0
    prompt: PromptSettings = PromptSettings()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise InputError(f"--actors must be at least 1, got {self.actors}")
        if self.concurrency < 1:
            raise InputError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.limit is not None and self.limit < 1:
            raise InputError(f"--limit must be at least 1, got {self.limit}")
        unknown = [s for s in self.scores if s not in SCORE_KINDS]
        if unknown:
            raise InputError(f"--score {unknown[0]!r} is not one of {list(SCORE_KINDS)}")


def select_components(h: Harvest, opts: AutointerpOptions) -> list[str]:
    """Alive subcomponents passing the filters, densest first (ties by index), up to the limit."""
    t = h.components
    density = t.column("firing_density").to_numpy()
    keys = t.column("key").to_pylist()
    modules = t.column("module").to_pylist()
    if opts.modules:
        known = {m["path"] for m in h.meta["modules"]}
        for pattern in opts.modules:
            if not any(fnmatch(m, pattern) for m in known):
                raise InputError(
                    f"--modules {pattern!r} matches no module; modules: {sorted(known)}"
                )
    order = sorted(range(len(keys)), key=lambda i: (-density[i], i))
    chosen = [
        keys[i]
        for i in order
        if density[i] > 0
        and density[i] >= opts.min_density
        and (not opts.modules or any(fnmatch(modules[i], p) for p in opts.modules))
    ]
    return chosen[: opts.limit] if opts.limit is not None else chosen


# -- the driver ----------------------------------------------------------------------------------


def run_autointerp(run: str | Path, opts: AutointerpOptions, out: str | None = None) -> LabelStore:
    from spd_ray.autointerp.limits import LimiterCore
    from spd_ray.runs import resolve_run_dir
    from spd_ray.sync import run_uri, sync_up

    uri = run_uri(run, out)  # a run in a bucket: labelled in its staging folder, then sent
    run_dir = resolve_run_dir(run, out)
    h = Harvest(run_dir)  # fails with a clear message when the run has no harvest
    store = LabelStore(run_dir, opts.llm.model)
    keys = select_components(h, opts)
    if opts.dry_run:
        _dry_run(h, store, keys, opts)
        return store
    LimiterCore(opts.rpm, opts.budget_usd)  # bad limits fail here, before any paid request
    with store.lock():
        try:
            _label_and_score(h, store, keys, opts)
        finally:  # labels are kept as they come: send what there is, finished or not
            if uri is not None:
                sync_up(run_dir, uri)
    return store


def _label_tasks(h: Harvest, keys: list[str], opts: AutointerpOptions) -> list[LabelTask]:
    return [
        LabelTask(key=k, messages=label_messages(h, k, h.examples(k), opts.prompt)) for k in keys
    ]


def _todo(store: LabelStore, keys: list[str]) -> list[str]:
    labels = store.labels()
    return [k for k in keys if labels.get(k, {}).get("status") != "ok"]


def _dry_run(h: Harvest, store: LabelStore, keys: list[str], opts: AutointerpOptions) -> None:
    todo = _todo(store, keys)
    for t in _label_tasks(h, todo[: opts.dry_run], opts):
        print(f"===== {t.key} =====")
        for m in t.messages:
            print(f"--- {m['role']} ---\n{m['content']}")
    print(f"(dry run: {len(todo)} subcomponents would be labelled; nothing sent)")


@dataclass
class _Pool:
    """What the streams of one run share: the options, the limiter every worker asks, and how
    many results each worker process returned."""

    opts: AutointerpOptions
    limiter: RayLimiter
    workers: Counter[WorkerPlace] = field(default_factory=Counter)


def _label_and_score(
    h: Harvest, store: LabelStore, keys: list[str], opts: AutointerpOptions
) -> None:
    """Label, then score, what the store lacks; under the store's lock."""
    import ray

    from spd_ray.ray_session import connect_ray, say

    todo = _todo(store, keys)
    tasks = _label_tasks(h, todo, opts)
    before = store.spent()
    left = _budget_left(store, before, opts)
    checked = left is None or left > 0
    if checked:
        check = _check(opts.llm, store)
        if left is not None:
            left = max(0.0, left - check.cost_usd)
    store.write_settings(
        {"base_url": opts.llm.base_url, "model": opts.llm.model, "harvest": str(h.path)}
    )
    connect_ray()
    pool = _Pool(opts, _start_limiter(opts, left, checked))
    say(f"[autointerp] {len(todo)} of {len(keys)} subcomponents to label")
    try:
        with _stops_when_ray_loses_work(store):
            _stream(tasks, LABEL_RESULT, store.add_label, "label", pool)
            if opts.scores:
                score_tasks = _score_tasks(h, store, keys, opts)
                say(f"[autointerp] {len(score_tasks)} scores to compute")
                _stream(score_tasks, SCORE_RESULT, store.add_score, "score", pool)
    finally:
        if pool.workers:
            store.write_workers([{**asdict(w), "results": n} for w, n in pool.workers.items()])
    _report(store, before, pool)
    # On failure the limiter goes with the driver (it is not detached); a kill then could hide
    # the error that stopped the run.
    ray.kill(pool.limiter.actor)


def _budget_left(
    store: LabelStore, before: dict[str, float], opts: AutointerpOptions
) -> float | None:
    """What the budget leaves for this run (None: no budget). It covers every run of this store:
    what earlier runs spent (`before`) is on its lines."""
    from spd_ray.ray_session import say

    if opts.budget_usd is None:
        return None
    left = max(0.0, opts.budget_usd - before["usd"])
    say(
        f"[autointerp] budget ${opts.budget_usd:.4f}: ${before['usd']:.4f} spent by earlier "
        f"runs of {store.dir}, ${left:.4f} left"
    )
    return left


def _start_limiter(opts: AutointerpOptions, left: float | None, checked: bool) -> RayLimiter:
    """The run's named limiter actor, with the endpoint check (when one was sent) counted."""
    import ray

    from spd_ray.autointerp.limits import shared_limiter

    name = f"spd-ray-autointerp-{uuid.uuid4().hex[:12]}"
    # No live request holds its grant this long (one HTTP attempt, bounded by the timeout per
    # phase): a grant still held then was lost with its worker's node.
    max_hold_s = 4 * opts.llm.timeout_s + 60
    limiter = shared_limiter(name, opts.rpm, left, max_hold_s=max_hold_s)
    if checked:
        ray.get(limiter.actor.record.remote())  # the endpoint check counts toward the rpm
    return limiter


@contextmanager
def _stops_when_ray_loses_work(store: LabelStore) -> Iterator[None]:
    """Turn a node, worker or result that Ray lost into AutointerpFailedError: one line naming
    the store that keeps every finished result, and what to rerun."""
    try:
        yield
    except Exception as err:
        lost = None if isinstance(err, LLMError) else _lost_in(err)
        if lost is None:
            raise
        first = next((x for x in str(lost).splitlines() if x.strip()), type(lost).__name__)
        raise AutointerpFailedError(
            f"autointerp stopped: Ray lost part of the run ({first.strip()[:200]}); every result "
            f"that came back is in {store.dir} - rerun the same `spd-ray autointerp` command to "
            "send only what is missing"
        ) from err


def _report(store: LabelStore, before: dict[str, float], pool: _Pool) -> None:
    """One line: what this run sent and spent, where it ran, and the store's totals."""
    from spd_ray.ray_session import say

    stats = pool.limiter.stats()
    total = store.spent()
    nodes = {w.node_id for w in pool.workers}
    say(
        f"[autointerp] {total['requests'] - before['requests']} requests, "
        f"${total['usd'] - before['usd']:.4f}, "
        f"{total['prompt_tokens'] - before['prompt_tokens']}+"
        f"{total['completion_tokens'] - before['completion_tokens']} tokens, "
        f"at most {stats['max_in_flight']} in flight on {len(pool.workers)} worker(s) of "
        f"{len(nodes)} node(s) -> {store.dir} "
        f"(all runs of this store: {total['requests']} requests, ${total['usd']:.4f})"
    )


def _score_tasks(
    h: Harvest, store: LabelStore, keys: list[str], opts: AutointerpOptions
) -> list[ScoreTask]:
    """The scores the store lacks, of the labelled subcomponents. A score whose trials cannot be
    built (too few examples) is recorded as failed, not sent."""
    labels = store.labels()
    scores = store.scores()
    rng = random.Random(opts.seed)
    threshold = h.meta["settings"]["ci_threshold"]
    tasks = []
    for k in keys:
        if labels.get(k, {}).get("status") != "ok":
            continue
        for kind in opts.scores:
            if scores.get((k, kind), {}).get("status") == "ok":
                continue
            try:
                trials = score_trials(h, k, labels[k]["label"], kind, rng, threshold)
            except ValueError as err:
                reason = f"cannot build {kind} trials: {err}"
                store.add_score(row(ScoreFailed(key=k, kind=kind, reason=reason)))
                continue
            tasks.append(ScoreTask(key=k, kind=kind, trials=trials))
    return tasks


def _check(llm: LLMSettings, store: LabelStore) -> Usage:
    """The endpoint check, its cost recorded in the store whether it passes or not."""

    async def check() -> Usage:
        client = LLMClient(llm)
        try:
            return await client.check()
        finally:
            await client.aclose()

    try:
        usage = asyncio.run(check())
    except LLMError as err:
        if err.usage.requests:
            store.add_check(asdict(err.usage))
        raise
    store.add_check(asdict(usage))
    return usage


def _stream(
    tasks: Sequence[LabelTask | ScoreTask],
    results: TypeAdapter[Any],
    write: Callable[[dict[str, Any]], None],
    what: str,
    pool: _Pool,
) -> None:
    """Run tasks through the actor pool, writing each result (parsed by `results`) as it
    arrives, and counting each worker's results in `pool.workers`."""
    if not tasks:
        return
    done = failed = 0
    cost = 0.0
    last = 0.0
    bar = tqdm(total=len(tasks), desc=what, unit="comp", disable=not pool.opts.progress)
    try:
        for out in _dataset(tasks, pool).iter_rows():
            result: Result = results.validate_json(out["result"])
            write(row(result))
            pool.workers[WorkerPlace(**json.loads(out["worker"]))] += 1
            done += result.status == "ok"
            failed += result.status != "ok"
            cost += result.usage.cost_usd if result.usage is not None else 0.0
            bar.update(1)
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                bar.set_postfix(
                    ok=done,
                    failed=failed,
                    in_flight=pool.limiter.stats()["in_flight"],
                    cost=f"${cost:.4f}",
                )
    except Exception as err:
        fatal = _fatal_in(err)
        if fatal is not None:
            raise FatalLLMError(fatal.reason) from None
        raise
    finally:
        bar.set_postfix(ok=done, failed=failed, cost=f"${cost:.4f}")
        bar.close()


def _dataset(tasks: Sequence[LabelTask | ScoreTask], pool: _Pool) -> Any:
    """The tasks as a Ray Data dataset mapped by an actor pool of `LLMWorker`s."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds: Any = ray.data.from_items([{"task": t.model_dump_json()} for t in tasks])
    return ds.map_batches(
        LLMWorker,
        fn_constructor_args=(pool.opts.llm, pool.limiter.name, pool.opts.concurrency),
        batch_size=max(1, pool.opts.concurrency),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=pool.opts.actors),
        num_cpus=0.1,
    )


def _lost_in(err: BaseException) -> BaseException | None:
    """The Ray system error inside an error chain - a node, worker, actor or result that Ray
    lost and could not bring back - if any (not an error the task code raised)."""
    import ray.exceptions as rex

    lost = (
        rex.RayActorError,
        rex.ActorUnavailableError,
        rex.NodeDiedError,
        rex.ObjectLostError,
        rex.WorkerCrashedError,
        rex.RaySystemError,
    )
    return _found_in(err, lost)


def _fatal_in(err: BaseException) -> FatalLLMError | None:
    """The FatalLLMError inside a Ray (Data) error chain, if any."""
    found = _found_in(err, (FatalLLMError,))
    return found if isinstance(found, FatalLLMError) else None


def _found_in(err: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first error of `kinds` along a Ray error chain: each error, the task error Ray
    wraps in it (`.cause`), then what it was raised from."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, kinds):
            return seen
        cause = getattr(seen, "cause", None)
        if isinstance(cause, kinds):
            return cause
        seen = seen.__cause__ or seen.__context__
    return None
