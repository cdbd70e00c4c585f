"""An ensemble of merges on Ray: `spd-ray clustering RUN`.

Each member is a Ray task: it loads the run, draws one batch of the run's own data with its own
seed, computes the subcomponents' CI, drops the dead ones and merges (spd_ray.clustering.merge);
it writes its history file itself, whole and atomically, so a rerun after a kill skips the
members that finished. Then the members are aligned over the union of their subcomponents and the
distances between every pair of members are computed at every iteration, as Ray tasks over
chunks of iterations. Everything is validated (the run, its checkpoint, the modules, the settings
against an earlier clustering of the same name) before anything is written or Ray starts.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spd_ray.clustering import store
from spd_ray.clustering.distances import check_methods, distances_at, ensemble_array
from spd_ray.clustering.merge import MergeHistory, MergeSettings
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import Lock, check_name

CLUSTERING_DIR = "clustering"
DISTANCE_ROWS_PER_TASK = 64


@dataclass(frozen=True)
class ClusteringOptions:
    runs: int = 4  # ensemble members
    batch_size: int = 1024
    seed: int = 0
    modules: str | None = None  # glob(s) over module paths; None: all
    merge: MergeSettings = field(default_factory=MergeSettings)
    distances: tuple[str, ...] = ("perm_invariant_hamming",)
    name: str = "default"
    gpu: bool = False
    out: str | Path | None = None
    progress: bool = True
    fresh: bool = False

    def __post_init__(self) -> None:
        if self.runs < 1:
            raise InputError(f"--runs must be >= 1, got {self.runs}")
        if self.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {self.batch_size}")
        check_name(self.name, "--name")
        check_methods(list(self.distances))

    def identity(self) -> dict[str, Any]:
        """What makes two clusterings the same (everything but the number of members, which may
        grow, and how they run)."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "modules": self.modules,
            "merge": self.merge.to_dict(),
        }


def member_seeds(seed: int, index: int) -> tuple[int, int]:
    """(data seed, merge seed) of member `index`: independent streams from one seed."""
    a, b = np.random.SeedSequence(entropy=seed % 2**64, spawn_key=(index,)).generate_state(2)
    return int(a), int(b)


@dataclass
class MemberActivity:
    """What member `index` merges: which alive subcomponents fire on which samples of its batch."""

    active: Any  # bool Tensor [samples, n alive]
    labels: list[str]
    dead: list[str]
    data_seed: int
    merge_seed: int
    step: int  # the run's checkpoint step


def member_activity(
    run_dir: str, out: str | None, opts: ClusteringOptions, index: int, device: str = "cpu"
) -> MemberActivity:
    """Load the run, draw member `index`'s batch and threshold its subcomponents' CI (the
    ensemble's members and the search's trials start here)."""
    from spd_ray.analysis.batches import run_batches
    from spd_ray.clustering.activations import component_ci, select_modules
    from spd_ray.loaded_run import load_run

    loaded = load_run(run_dir, out=out, device=device)
    data_seed, merge_seed = member_seeds(opts.seed, index)
    batch = next(run_batches(loaded, opts.batch_size, data_seed, out=out, device=device))
    modules = select_modules(loaded.model, opts.modules)
    acts = component_ci(loaded.model, batch, modules, opts.merge.filter_dead_threshold)
    active = acts.ci > opts.merge.activation_threshold
    return MemberActivity(active, acts.labels, acts.dead, data_seed, merge_seed, loaded.step)


def run_member(
    run_dir: str,
    out: str | None,
    opts: ClusteringOptions,
    index: int,
    root: str,
    device: str = "cpu",
) -> dict[str, Any]:
    """One member, start to finish; writes members/<index>.npz and returns its summary."""
    import torch

    from spd_ray.clustering.merge import merge

    start, started_at = time.perf_counter(), time.time()
    m = member_activity(run_dir, out, opts, index, device)
    active = m.active
    history = merge(active, m.labels, opts.merge, seed=m.merge_seed, device=device)
    co = None
    if active.shape[1] <= 2048:  # kept for the plots while it is small
        f = active.to(torch.float32)
        co = (f.T @ f).round().to(torch.int64).cpu().numpy()
    info = {
        "index": index,
        "data_seed": m.data_seed,
        "merge_seed": m.merge_seed,
        "dead": m.dead,
        "n_alive": len(m.labels),
        "n_samples": int(active.shape[0]),
        "step": m.step,
        "wall_s": round(time.perf_counter() - start, 3),
        "started_at": started_at,
        "ended_at": time.time(),
        "pid": os.getpid(),
    }
    if co is not None:
        info["coactivation_saved"] = True
    path = store.member_path(Path(root), index)
    store.save_member(path, history, info)
    if co is not None:
        store.save_npz(path.with_suffix(".coact.npz"), coactivation=co)
    return info


def distance_rows(array: np.ndarray, rows: list[int], method: str) -> np.ndarray:
    return np.stack([distances_at(array, r, method) for r in rows])


def clustering_root(run_dir: Path, name: str) -> Path:
    return run_dir / CLUSTERING_DIR / name


def prepare(run_dir: Path, opts: ClusteringOptions) -> Path:
    """Check the run and the settings; returns the clustering folder (not created yet)."""
    from spd_ray.clustering.activations import select_modules
    from spd_ray.runs import RunDir

    rd = RunDir(run_dir)
    if not rd.checkpoint_path.exists():
        raise NotFoundError(
            f"run {run_dir} has no checkpoint ({rd.checkpoint_path.name} missing): cluster a run "
            "that has saved one"
        )
    rd.read_config()  # a clear error for a missing or bad config.yaml
    root = clustering_root(run_dir, opts.name)
    if (root / store.META).exists() and not opts.fresh:
        old = store.read_meta(root).get("identity", {})
        new = opts.identity()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise InputError(
                f"clustering {opts.name!r} of {run_dir} was made with other settings "
                f"({', '.join(f'{k}: {old.get(k)!r} -> {new.get(k)!r}' for k in changed)}); "
                "give another --name, or --fresh to replace it"
            )
    # The run loads (its target, and a checkpoint that holds only tensors) and the modules glob
    # matches, before anything is written.
    from spd_ray.loaded_run import load_run

    select_modules(load_run(run_dir, out=opts.out).model, opts.modules)
    return root


def run_clustering(run: str | Path, opts: ClusteringOptions) -> Path:
    """Cluster a run with an ensemble of merges; returns the clustering folder."""
    from spd_ray.runs import resolve_run_dir
    from spd_ray.sync import run_uri, sync_up

    uri = run_uri(run, opts.out)
    run_dir = resolve_run_dir(run, opts.out)
    root = prepare(run_dir, opts)
    with Lock(run_dir / CLUSTERING_DIR / f".{opts.name}.lock", f"clustering {opts.name!r}"):
        _ensemble(run_dir, root, opts)
        if uri is not None:
            sync_up(run_dir, uri)
    return root


def _ensemble(run_dir: Path, root: Path, opts: ClusteringOptions) -> None:
    import ray

    from spd_ray.capacity import require_gpus
    from spd_ray.ray_session import connect_ray, say
    from spd_ray.storage import check_shared_root

    if opts.fresh and root.exists():
        import shutil

        shutil.rmtree(root)
    (root / store.MEMBERS).mkdir(parents=True, exist_ok=True)
    meta: dict[str, Any] = {
        "run": str(run_dir),
        "name": opts.name,
        "identity": opts.identity(),
        "runs": opts.runs,
        "distances": list(opts.distances),
        "status": "running",
        "driver_pid": os.getpid(),
    }
    store.write_meta(root, meta)
    done = store.finished_members(root, opts.runs)
    todo = [i for i in range(opts.runs) if i not in done]
    connect_ray()
    if opts.gpu:
        require_gpus(1, "clustering with --gpu")
    check_shared_root(run_dir, "the run directory")
    if done:
        say(f"clustering {opts.name}: {len(done)} of {opts.runs} members already finished")
    resources: dict[str, Any] = {"num_cpus": 1}
    if opts.gpu:
        resources["num_gpus"] = 1
    member = ray.remote(**resources)(_member_task)
    out = None if opts.out is None else str(opts.out)
    device = "cuda" if opts.gpu else "cpu"
    refs = [
        member.remote(str(run_dir), out, opts, i, str(root), device)  # type: ignore[call-arg]
        for i in todo
    ]
    start = time.perf_counter()
    _wait(refs, f"clustering {opts.name}: members", opts.progress)
    members_wall_s = time.perf_counter() - start
    loaded = [store.load_member(store.member_path(root, i)) for i in range(opts.runs)]
    histories = [h for h, _ in loaded]
    array, labels = ensemble_array(histories)
    store.save_npz(root / store.ENSEMBLE, merge_array=array, labels=np.array(labels))
    distances = _distances(array, list(opts.distances), opts.progress)
    for method, d in distances.items():
        store.save_npz(root / f"distances_{method}.npz", distances=d)
    from spd_ray.clustering.plots import write_plots

    write_plots(root, histories, array, distances)
    meta.update(
        status="finished",
        n_subcomponents=len(labels),
        iterations=int(array.shape[1] - 1),
        members_run_now=todo,
        members_wall_s=round(members_wall_s, 3),
        members=[_member_summary(h, info) for h, info in loaded],
    )
    store.write_meta(root, meta)


def _member_task(
    run_dir: str, out: str | None, opts: ClusteringOptions, index: int, root: str, device: str
) -> dict[str, Any]:
    import torch

    from spd_ray.ray_session import worker_threads

    torch.set_num_threads(worker_threads())
    return run_member(run_dir, out, opts, index, root, device)


def _distances(array: np.ndarray, methods: list[str], progress: bool) -> dict[str, np.ndarray]:
    import ray

    if array.shape[0] < 2:
        return {m: np.full((array.shape[1], 1, 1), np.nan) for m in methods}
    task = ray.remote(num_cpus=1)(distance_rows)
    ref = ray.put(array)
    rows = list(range(array.shape[1]))
    chunks = [
        rows[i : i + DISTANCE_ROWS_PER_TASK] for i in range(0, len(rows), DISTANCE_ROWS_PER_TASK)
    ]
    refs = {m: [task.remote(ref, c, m) for c in chunks] for m in methods}
    _wait([r for rs in refs.values() for r in rs], "distances", progress)
    return {m: np.concatenate(ray.get(rs)) for m, rs in refs.items()}


def _wait(refs: list[Any], what: str, progress: bool) -> None:
    """Wait for every task, with a progress bar; the first failure is raised."""
    import ray
    from tqdm import tqdm

    pending = list(refs)
    with tqdm(total=len(refs), desc=what, disable=not progress, unit="task") as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            ray.get(ready)
            bar.update(len(ready))


def _member_summary(h: MergeHistory, info: dict[str, Any]) -> dict[str, Any]:
    return {
        **{k: info[k] for k in ("index", "wall_s", "started_at", "ended_at", "pid") if k in info},
        "n_alive": h.n,
        "iterations": int(h.pairs.shape[0]),
        "final_mdl": float(h.mdl[-1]),
    }
