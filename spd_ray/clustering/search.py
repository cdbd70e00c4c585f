"""A search over the merge's settings: `spd-ray clustering RUN --tune alpha,threshold`.

The members' batches and CI depend only on the data seeds, not on the merge settings, so they
are computed once (one Ray task per member) and handed to every trial through the object store.
Each trial (Ray Tune, Optuna's multi-objective TPE) merges every member with its settings and
reports two objectives, both minimised:

- `instability`: the mean permutation-invariant Hamming distance between members at k groups,
  divided by the number of subcomponents (0: every member found the same grouping);
- `mdl`: the mean description length of the members' groupings at k groups.

Results go to `<run>/clustering/<name>-search/`: `trials.json` (every trial's settings and
objectives), `pareto.json` (the trials no other beats on both) and Tune's own state in `tune/`,
from which an interrupted search resumes.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from spd_ray.clustering.distances import on_union, perm_invariant_hamming, union_labels
from spd_ray.clustering.ensemble import (
    ClusteringOptions,
    clustering_root,
    member_activity,
    member_seeds,
    prepare,
)
from spd_ray.clustering.merge import MergeSettings, merge
from spd_ray.errors import InputError
from spd_ray.io import Lock, write_json

# name -> (low, high, log scale)
SEARCHABLE: dict[str, tuple[float, float, bool]] = {
    "alpha": (0.01, 10.0, True),
    "threshold": (0.0, 0.5, False),
    "temperature": (0.01, 10.0, True),
}
OBJECTIVES = (("instability", "min"), ("mdl", "min"))


def parse_params(text: str, settings: MergeSettings) -> list[str]:
    names = list(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    bad = [n for n in names if n not in SEARCHABLE]
    if bad or not names:
        raise InputError(f"--tune {text!r}: choose from {', '.join(SEARCHABLE)}")
    if "temperature" in names and settings.sampler != "mcmc":
        raise InputError("--tune temperature needs --sampler mcmc")
    if "threshold" in names and settings.sampler != "range":
        raise InputError("--tune threshold needs --sampler range")
    return names


def member_activations(
    run_dir: str, out: str | None, opts: ClusteringOptions, index: int
) -> tuple[np.ndarray, list[str]]:
    """Member `index`'s boolean activations [samples, n] and labels (a Ray task, one thread)."""
    import torch

    torch.set_num_threads(1)
    m = member_activity(run_dir, out, opts, index)
    return m.active.numpy(), m.labels


def evaluate(
    members: list[tuple[np.ndarray, list[str]]], settings: MergeSettings, seed: int, k: int
) -> dict[str, float]:
    """Merge every member with `settings` and score the groupings at k groups."""
    import torch

    histories = []
    for index, (active, labels) in enumerate(members):
        _, merge_seed = member_seeds(seed, index)
        # Merge only down to k groups: the rest of the history is not scored.
        member = replace(settings, iters=max(1, len(labels) - k))
        histories.append(merge(torch.tensor(active), labels, member, seed=merge_seed))
    union = union_labels(histories)
    # Each member at its own row of k groups (a member with fewer alive subcomponents than k
    # is scored unmerged).
    rows = [h.row_for_k(min(k, h.n)) for h in histories]
    groupings = [on_union(h, t, union) for h, t in zip(histories, rows, strict=True)]
    mdl = float(np.mean([h.mdl[t] for h, t in zip(histories, rows, strict=True)]))
    pairs = [
        perm_invariant_hamming(groupings[i], groupings[j]) / len(union)
        for i in range(len(groupings))
        for j in range(i)
    ]
    return {"instability": float(np.mean(pairs)), "mdl": mdl}


class _Space:
    """Optuna's define-by-run space (a class, not a closure: Tune pickles the searcher)."""

    def __init__(self, names: list[str]):
        self.names = names

    def __call__(self, trial: Any) -> None:
        for name in self.names:
            lo, hi, log = SEARCHABLE[name]
            trial.suggest_float(name, lo, hi, log=log)


def _trial(
    config: dict[str, Any],
    members: list[tuple[np.ndarray, list[str]]],
    base: dict[str, Any],
    seed: int,
    k: int,
) -> dict[str, float]:
    settings = MergeSettings(**{**base, **config})
    return evaluate(members, settings, seed, k)


def search_merge(
    run: str | Path, opts: ClusteringOptions, params: str, trials: int, k: int | None
) -> Path:
    """Run the search; returns its folder."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    from spd_ray.ray_session import connect_ray, say
    from spd_ray.runs import resolve_run_dir
    from spd_ray.storage import check_shared_root

    names = parse_params(params, opts.merge)
    if trials < 1:
        raise InputError(f"--trials must be >= 1, got {trials}")
    if opts.runs < 2:
        raise InputError("--tune needs --runs >= 2: stability compares members")
    run_dir = resolve_run_dir(run, opts.out)
    prepare(run_dir, replace(opts, fresh=True))
    root = clustering_root(run_dir, f"{opts.name}-search")
    with Lock(root.parent / f".{opts.name}-search.lock", f"the search {opts.name}-search"):
        connect_ray()
        check_shared_root(run_dir, "the run directory")
        out = None if opts.out is None else str(opts.out)
        task = ray.remote(num_cpus=1)(member_activations)
        members = ray.get([task.remote(str(run_dir), out, opts, i) for i in range(opts.runs)])
        n_alive = min(a.shape[1] for a, _ in members)
        k_eff = k if k is not None else max(2, n_alive // 4)
        if not 1 <= k_eff <= n_alive:
            raise InputError(f"--tune-k {k_eff}: the members have {n_alive} alive subcomponents")
        say(f"search {opts.name}-search: {trials} trials over {', '.join(names)} at k = {k_eff}")

        base = {**opts.merge.to_dict()}
        trainable = tune.with_resources(
            tune.with_parameters(_trial, members=members, base=base, seed=opts.seed, k=k_eff),
            {"CPU": 1},
        )
        root.mkdir(parents=True, exist_ok=True)
        tune_dir = root / "tune"
        if tune.Tuner.can_restore(str(tune_dir)):
            say(f"resuming the search from {tune_dir}")
            tuner = tune.Tuner.restore(str(tune_dir), trainable=trainable, resume_errored=True)
        else:
            search = OptunaSearch(
                space=_Space(names),
                metric=[m for m, _ in OBJECTIVES],
                mode=[d for _, d in OBJECTIVES],
                sampler=optuna.samplers.TPESampler(seed=opts.seed),
            )
            cpus = int(ray.cluster_resources().get("CPU", 1))
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(
                    search_alg=search,
                    num_samples=trials,
                    max_concurrent_trials=max(1, cpus),
                ),
                run_config=tune.RunConfig(name="tune", storage_path=str(root), verbose=0),
            )
        grid = tuner.fit()
        rows = _rows(grid, names)
        front = _pareto(rows)
        write_json(root / "trials.json", {"k": k_eff, "params": names, "trials": rows})
        write_json(root / "pareto.json", {"k": k_eff, "front": [rows[i] for i in front]})
        for i in front:
            r = rows[i]
            shown = ", ".join(f"{n}={r['params'][n]:.4g}" for n in names)
            say(f"  pareto: {shown}: instability {r['instability']:.4f}, mdl {r['mdl']:.4f}")
    return root


def _rows(grid: Any, names: list[str]) -> list[dict[str, Any]]:
    rows = []
    for i in range(len(grid)):
        result = grid[i]
        metrics = dict(result.metrics or {})
        if result.error is not None or "mdl" not in metrics:
            continue
        rows.append(
            {
                "trial_id": str(metrics.get("trial_id", i)),
                "params": {n: float(result.config[n]) for n in names},
                "instability": float(metrics["instability"]),
                "mdl": float(metrics["mdl"]),
            }
        )
    rows.sort(key=lambda r: str(r["trial_id"]))
    return rows


def _pareto(rows: list[dict[str, Any]]) -> list[int]:
    """Indices of the rows no other row beats on both objectives (both minimised)."""

    def beats(a: dict[str, Any], b: dict[str, Any]) -> bool:
        keys = [m for m, _ in OBJECTIVES]
        return all(a[m] <= b[m] for m in keys) and any(a[m] < b[m] for m in keys)

    finite = [i for i, r in enumerate(rows) if all(math.isfinite(r[m]) for m, _ in OBJECTIVES)]
    return [i for i in finite if not any(beats(rows[j], rows[i]) for j in finite if j != i)]
