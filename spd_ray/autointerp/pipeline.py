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
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from spd_ray.autointerp.client import (
    BudgetExhausted,
    FatalLLMError,
    LLMClient,
    LLMError,
    LLMSettings,
    Usage,
)
from spd_ray.autointerp.prompt import LabelAnswer, PromptSettings, label_messages
from spd_ray.autointerp.store import LabelStore
from spd_ray.harvest.show import example_text
from spd_ray.harvest.store import Example, Harvest

SCORE_KINDS = ("detection", "fuzzing", "intruder")


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
    scores: tuple[str, ...] = ()
    dry_run: int = 0  # >0: print this many prompts and send nothing
    seed: int = 0
    prompt: PromptSettings = PromptSettings()
    progress: bool = True

    def __post_init__(self) -> None:
        if self.actors < 1:
            raise ValueError(f"--actors must be at least 1, got {self.actors}")
        if self.concurrency < 1:
            raise ValueError(f"--concurrency must be at least 1, got {self.concurrency}")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        unknown = [s for s in self.scores if s not in SCORE_KINDS]
        if unknown:
            raise ValueError(f"--score {unknown[0]!r} is not one of {list(SCORE_KINDS)}")


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
                raise ValueError(
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


# -- the worker ----------------------------------------------------------------------------------


class LLMWorker:
    """Ray Data async callable: a batch of tasks -> a batch of results, at most `concurrency`
    requests in flight in this actor (Ray Data may run several batches of one actor at once; the
    semaphore is shared by all of them)."""

    def __init__(self, llm: LLMSettings, limiter_name: str | None, concurrency: int):
        self.llm = llm
        self.limiter_name = limiter_name
        self.concurrency = concurrency
        self._client: LLMClient | None = None
        self._sem: asyncio.Semaphore | None = None
        self._limiter: Any = None
        self._where = ""

    def _setup(self) -> tuple[LLMClient, asyncio.Semaphore]:
        if self._client is None:
            import ray

            from spd_ray.autointerp.limits import RayLimiter
            from spd_ray.ray_session import here

            actor = ray.get_runtime_context().get_actor_id()
            self._where = json.dumps({"actor": actor, **here()})
            if self.limiter_name is not None:
                self._limiter = RayLimiter(ray.get_actor(self.limiter_name), self.limiter_name)
            self._client = LLMClient(self.llm, self._limiter)
            self._sem = asyncio.Semaphore(self.concurrency)
        assert self._sem is not None
        return self._client, self._sem

    async def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        client, sem = self._setup()
        tasks = [json.loads(t) for t in batch["task"]]

        async def one(task: dict[str, Any]) -> dict[str, Any]:
            async with sem:
                return await _run_task(client, task)

        results = await asyncio.gather(*(one(t) for t in tasks))
        return {
            "result": np.array([json.dumps(r) for r in results], dtype=object),
            "worker": np.array([self._where] * len(results), dtype=object),
        }


async def _run_task(client: LLMClient, task: dict[str, Any]) -> dict[str, Any]:
    """One component's label, or one component's score over its trials; fatal errors propagate
    (they end the pipeline), every other failure is a result with its reason."""
    from spd_ray.autointerp.scoring import Picks, mean_score, trial_score

    base = {"key": task["key"]}
    if task["type"] == "score":
        base["kind"] = task["kind"]
    usage = Usage()
    try:
        if task["type"] == "label":
            answer, usage, _ = await client.complete_json(task["messages"], LabelAnswer)
            return {**base, "status": "ok", **answer.model_dump(), "usage": _usage(usage)}
        answers, per_trial = [], []
        for trial in task["trials"]:
            picks, u, _ = await client.complete_json(trial["messages"], Picks)
            usage.add(u)
            answers.append(picks)
            per_trial.append({"truth": trial["truth"], "selected": picks.selected})
        scored = [_trial(t) for t in task["trials"]]
        score = mean_score(scored, answers)
        per = [trial_score(t, a) for t, a in zip(scored, answers, strict=True)]
        for row, s in zip(per_trial, per, strict=True):
            row["score"] = s
        return {**base, "status": "ok", "score": score, "trials": per_trial, "usage": _usage(usage)}
    except FatalLLMError:
        raise
    except BudgetExhausted as err:
        usage.add(err.usage or Usage())
        return {
            **base,
            "status": "failed",
            "reason": f"budget: {err.reason}",
            "usage": _usage(usage),
        }
    except LLMError as err:
        usage.add(err.usage or Usage())
        return {**base, "status": "failed", "reason": err.reason, "usage": _usage(usage)}


def _trial(t: dict[str, Any]) -> Any:
    from spd_ray.autointerp.scoring import Trial

    return Trial(kind=t["kind"], messages=t["messages"], truth=tuple(t["truth"]))


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "cost_usd": u.cost_usd,
        "requests": u.requests,
    }


# -- score trials ----------------------------------------------------------------------------


def _render(h: Harvest, e: Example, position: int | None = None) -> str:
    """An example with the firing token (or another `position` of the window) marked."""
    if e.tokens is None:
        return example_text(h, e)
    if position is None:
        return example_text(h, e, ("<<", ">>"))
    moved = Example(**{**e.__dict__, "tokens": list(e.tokens)})
    text = []
    for j, tok in enumerate(moved.tokens or []):
        if tok < 0:
            continue
        piece = example_text_token(h, tok)
        text.append(f"<<{piece}>>" if j == position else piece)
    return "".join(text).replace("\n", "\\n")


def example_text_token(h: Harvest, tok: int) -> str:
    from spd_ray.harvest.show import token_text

    return token_text(h, tok)


def score_trials(
    h: Harvest, key: str, label: str, kind: str, rng: random.Random, threshold: float
) -> list[dict[str, Any]]:
    """The trials of one score for one component, as plain dicts (they travel as JSON)."""
    from spd_ray.autointerp.scoring import detection_trials, fuzzing_trials, intruder_trials

    i = h.index(key)
    own = h.examples(key)
    counts = h.firing_counts()
    co = h.cofiring_row(i)
    # Examples of subcomponents that never fire together with this one: at their firing token
    # this one is certainly silent. Where every subcomponent co-fires with it (an undertrained
    # decomposition), the ones that co-fire least.
    alive = [j for j in np.flatnonzero(counts > 0).tolist() if j != i]
    apart = [j for j in alive if co[j] == 0]
    if len(apart) < 10:
        rate = {j: co[j] / counts[j] for j in alive}
        apart += sorted((j for j in alive if co[j] > 0), key=lambda j: (rate[j], j))[
            : 10 - len(apart)
        ]
    seed = rng.randrange(1 << 30)
    if kind == "detection":
        others = _borrow(h, apart, rng, 20, own)
        trials = detection_trials(label, [_render(h, e) for e in own], others, seed=seed)
    elif kind == "fuzzing":
        correct, wrong = [], []
        for e in own:
            correct.append(_render(h, e))
            if e.tokens is not None and isinstance(e.ci, list):
                quiet = [
                    j
                    for j, (t, c) in enumerate(zip(e.tokens, e.ci, strict=True))
                    if t >= 0 and c <= threshold
                ]
                if quiet:
                    wrong.append(_render(h, e, rng.choice(quiet)))
        trials = fuzzing_trials(label, correct, wrong, seed=seed)
    else:
        density = counts / max(h.n_tokens, 1)
        similar = sorted(apart, key=lambda j: abs(density[j] - density[i]))[:10]
        trials = intruder_trials(
            [_render(h, e) for e in own], _borrow(h, similar, rng, 10, own), seed=seed
        )
    return [{"kind": t.kind, "messages": t.messages, "truth": list(t.truth)} for t in trials]


def _borrow(
    h: Harvest, components: list[int], rng: random.Random, n: int, own: list[Example]
) -> list[str]:
    """Up to `n` examples of other subcomponents (one each), never a window this subcomponent
    has among its own examples (the same firing position, or the same text)."""
    own_uids = {(e.doc, e.offset) for e in own}
    own_text = {_plain(_render(h, e)) for e in own}
    out = []
    for j in rng.sample(components, len(components)):
        ex = [
            e
            for e in (h.examples(j, "reservoir") or h.examples(j))
            if (e.doc, e.offset) not in own_uids and _plain(_render(h, e)) not in own_text
        ]
        if ex:
            out.append(_render(h, rng.choice(ex)))
        if len(out) == n:
            break
    return out


def _plain(text: str) -> str:
    return text.replace("<<", "").replace(">>", "")


# -- the driver ----------------------------------------------------------------------------------


def run_autointerp(run: str | Path, opts: AutointerpOptions, out: str | None = None) -> LabelStore:
    from spd_ray.api import resolve_run_dir
    from spd_ray.autointerp.limits import LimiterCore
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


def _label_tasks(h: Harvest, keys: list[str], opts: AutointerpOptions) -> list[dict[str, Any]]:
    return [
        {"type": "label", "key": k, "messages": label_messages(h, k, h.examples(k), opts.prompt)}
        for k in keys
    ]


def _todo(store: LabelStore, keys: list[str]) -> list[str]:
    labels = store.labels()
    return [k for k in keys if labels.get(k, {}).get("status") != "ok"]


def _dry_run(h: Harvest, store: LabelStore, keys: list[str], opts: AutointerpOptions) -> None:
    todo = _todo(store, keys)
    for t in _label_tasks(h, todo[: opts.dry_run], opts):
        print(f"===== {t['key']} =====")
        for m in t["messages"]:
            print(f"--- {m['role']} ---\n{m['content']}")
    print(f"(dry run: {len(todo)} subcomponents would be labelled; nothing sent)")


def _label_and_score(
    h: Harvest, store: LabelStore, keys: list[str], opts: AutointerpOptions
) -> None:
    """Label, then score, what the store lacks; under the store's lock."""
    import ray

    from spd_ray.autointerp.limits import shared_limiter
    from spd_ray.ray_session import connect_ray, say

    todo = _todo(store, keys)
    tasks = _label_tasks(h, todo, opts)
    # The budget covers every run of this store: what earlier runs spent is on its lines.
    before = store.spent()
    left = None if opts.budget_usd is None else max(0.0, opts.budget_usd - before["usd"])
    if opts.budget_usd is not None:
        say(
            f"[autointerp] budget ${opts.budget_usd:.4f}: ${before['usd']:.4f} spent by earlier "
            f"runs of {store.dir}, ${left:.4f} left"
        )
    checked = left is None or left > 0
    if checked:
        check = _check(opts.llm, store)
        if left is not None:
            left = max(0.0, left - check.cost_usd)
    store.write_settings(
        {"base_url": opts.llm.base_url, "model": opts.llm.model, "harvest": str(h.path)}
    )
    connect_ray()
    limiter_name = f"spd-ray-autointerp-{uuid.uuid4().hex[:12]}"
    # No live request holds its grant this long (one HTTP attempt, bounded by the timeout per
    # phase): a grant still held then was lost with its worker's node.
    max_hold_s = 4 * opts.llm.timeout_s + 60
    limiter = shared_limiter(limiter_name, opts.rpm, left, max_hold_s=max_hold_s)
    if checked:
        ray.get(limiter.actor.record.remote())  # the endpoint check counts toward the rpm
    say(f"[autointerp] {len(todo)} of {len(keys)} subcomponents to label")
    workers: dict[tuple[str, int], dict[str, Any]] = {}
    try:
        _stream(tasks, "label", store.add_label, opts, limiter, limiter_name, workers)
        if opts.scores:
            _score(h, store, keys, opts, limiter, limiter_name, workers)
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
    finally:
        if workers:
            store.write_workers(list(workers.values()))
    stats = limiter.stats()
    total = store.spent()
    say(
        f"[autointerp] {total['requests'] - before['requests']} requests, "
        f"${total['usd'] - before['usd']:.4f}, "
        f"{total['prompt_tokens'] - before['prompt_tokens']}+"
        f"{total['completion_tokens'] - before['completion_tokens']} tokens, "
        f"at most {stats['max_in_flight']} in flight on {len(workers)} worker(s) of "
        f"{len({w['node_id'] for w in workers.values()})} node(s) -> {store.dir} "
        f"(all runs of this store: {total['requests']} requests, ${total['usd']:.4f})"
    )
    ray.kill(limiter.actor)


def _score(
    h: Harvest,
    store: LabelStore,
    keys: list[str],
    opts: AutointerpOptions,
    limiter: Any,
    limiter_name: str,
    workers: dict[tuple[str, int], dict[str, Any]],
) -> None:
    """Score the labelled subcomponents whose scores the store lacks."""
    from spd_ray.ray_session import say

    labels = store.labels()
    scores = store.scores()
    rng = random.Random(opts.seed)
    threshold = h.meta["settings"]["ci_threshold"]
    score_tasks = []
    for k in keys:
        if labels.get(k, {}).get("status") != "ok":
            continue
        for kind in opts.scores:
            if scores.get((k, kind), {}).get("status") == "ok":
                continue
            try:
                trials = score_trials(h, k, labels[k]["label"], kind, rng, threshold)
            except ValueError as err:  # too few examples for this score: recorded, not fatal
                reason = f"cannot build {kind} trials: {err}"
                store.add_score({"key": k, "kind": kind, "status": "failed", "reason": reason})
                continue
            score_tasks.append({"type": "score", "key": k, "kind": kind, "trials": trials})
    say(f"[autointerp] {len(score_tasks)} scores to compute")
    _stream(score_tasks, "score", store.add_score, opts, limiter, limiter_name, workers)


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
            store.add_check(_usage(err.usage))
        raise
    store.add_check(_usage(usage))
    return usage


def _stream(
    tasks: list[dict[str, Any]],
    what: str,
    write: Any,
    opts: AutointerpOptions,
    limiter: Any,
    limiter_name: str,
    workers: dict[tuple[str, int], dict[str, Any]],
) -> None:
    """Run tasks through the actor pool, writing each result as it arrives; `workers` counts the
    results of each worker process (a restarted actor is a new process)."""
    if not tasks:
        return
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ds: Any = ray.data.from_items([{"task": json.dumps(t)} for t in tasks])
    ds = ds.map_batches(
        LLMWorker,
        fn_constructor_args=(opts.llm, limiter_name, opts.concurrency),
        batch_size=max(1, opts.concurrency),
        batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=opts.actors),
        num_cpus=0.1,
    )
    done = failed = 0
    cost = 0.0
    last = 0.0
    bar = tqdm(total=len(tasks), desc=what, unit="comp", disable=not opts.progress)
    try:
        for row in ds.iter_rows():
            result = json.loads(row["result"])
            write(result)
            where = json.loads(row["worker"])
            seen = workers.setdefault((where["actor"], where["pid"]), {**where, "results": 0})
            seen["results"] += 1
            done += result["status"] == "ok"
            failed += result["status"] != "ok"
            cost += result.get("usage", {}).get("cost_usd", 0.0)
            bar.update(1)
            if time.monotonic() - last > 1.0:
                last = time.monotonic()
                bar.set_postfix(
                    ok=done,
                    failed=failed,
                    in_flight=limiter.stats()["in_flight"],
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
