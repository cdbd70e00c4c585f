"""Set up and run one decomposition in this process: `spd_ray.decompose` and each Ray worker use it.

`build_worker` turns a config into everything the loop needs (target, ComponentModel, data,
evaluation); `train` runs the loop with resume from the run directory's checkpoint; `decompose` is
the in-process entry point that writes the run directory itself.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from matplotlib.figure import Figure
from torch import nn
from tqdm import tqdm

from spd_ray.argtypes import MAX_FAILURES_LIMIT
from spd_ray.config import (
    Config,
    IHTargetConfig,
    IHTaskConfig,
    LMTaskConfig,
    ResidMLPTargetConfig,
    TMSTargetConfig,
    config_hash,
)
from spd_ray.core.masks import Noise
from spd_ray.core.model import ComponentModel
from spd_ray.core.step import build_component_model
from spd_ray.core.streams import stream_seed
from spd_ray.data.ih import IHBatches, make_ih_task
from spd_ray.data.toy import ToyBatches, make_toy_dataset
from spd_ray.evals.evaluate import check_eval_metrics, evaluate
from spd_ray.io import child, safe_name
from spd_ray.ray_session import DEFAULT_WAIT_TIMEOUT_S
from spd_ray.targets import cached_target_path, load_target, target_fingerprint
from spd_ray.targets.hf import max_positions, resolve_name, vocab_size
from spd_ray.targets.loading import build_toy
from spd_ray.train.loop import LoopContext, LoopState, load_state, make_state, run_loop
from spd_ray.train.rundir import RunDir, output_root, tune_malloc
from spd_ray.train.tracking import RunWriter

if TYPE_CHECKING:
    from spd_ray.data.lm import LMBatches


@dataclass
class Worker:
    config: Config
    target: nn.Module
    model: ComponentModel
    ctx: LoopContext


def build_worker(
    config: Config,
    target: nn.Module | None = None,
    out_root: Path | None = None,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world_size: int = 1,
) -> Worker:
    """Target, component model, data streams and evaluation for one worker of a run."""
    device = torch.device(device)
    check_eval_metrics(config)
    if config.batch_size % world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by {world_size} workers")
    if target is None:
        target = load_target(config, output_root(out_root))
    # Component and CI-function init: identical on every worker. Every random stream of a run is
    # derived from config.seed (spd_ray.core.streams), so none repeats another's numbers.
    torch.manual_seed(stream_seed(config.seed, "init"))
    model = build_component_model(config, target).to(device)
    if config.compile_ci_fns:
        model.compile_ci_fns()
    task = config.task_config
    if isinstance(task, LMTaskConfig):
        train_lm, eval_lm = lm_streams(config, task, target, out_root, device, rank, world_size)
        return Worker(config, target, model, lm_context(config, model, train_lm, eval_lm, device))
    if isinstance(task, IHTaskConfig):
        ih_task = make_ih_task(task, target)
        train_seed = stream_seed(config.seed, "train_data")
        ih_train = IHBatches(ih_task, config.batch_size, train_seed, rank, world_size, device)

        def run_ih_eval(
            m: ComponentModel, step: int, slow: bool
        ) -> tuple[dict[str, Any], dict[str, Figure]]:
            # Fixed eval batches and mask noise, as for the other toys.
            seed = stream_seed(config.seed, "eval_data")
            batches = IHBatches(
                ih_task, config.effective_eval_batch_size, seed, rank, world_size, device
            )
            noise = Noise.for_run(config.seed, "eval", device, rank, world_size)
            evals = (next(batches) for _ in range(config.n_eval_steps))
            return evaluate(config, m, evals, noise, step, slow, world_size=world_size)

        ih_ctx = LoopContext(model, ih_train, run_ih_eval, device, rank, world_size)
        return Worker(config, target, model, ih_ctx)
    if task.task_name not in ("tms", "resid_mlp"):
        raise NotImplementedError(f"task {task.task_name!r} arrives with the language-model issue")
    dataset = make_toy_dataset(task, target)
    train_seed = stream_seed(config.seed, "train_data")
    train_batches = ToyBatches(dataset, config.batch_size, train_seed, rank, world_size, device)
    n_features = dataset.n_features
    single = 0.75 * torch.eye(n_features, device=device)
    eval_bs = config.effective_eval_batch_size

    def run_eval(
        m: ComponentModel, step: int, slow: bool
    ) -> tuple[dict[str, Any], dict[str, Figure]]:
        # The same eval batches and mask noise at every eval, so evals are comparable across steps
        # and a resumed run evaluates exactly like an uninterrupted one.
        batches = ToyBatches(
            dataset, eval_bs, stream_seed(config.seed, "eval_data"), rank, world_size, device
        )
        noise = Noise.for_run(config.seed, "eval", device, rank, world_size)
        return evaluate(
            config,
            m,
            (next(batches) for _ in range(config.n_eval_steps)),
            noise,
            step,
            slow,
            single_feature_input=single,
            world_size=world_size,
        )

    ctx = LoopContext(model, train_batches, run_eval, device, rank, world_size)
    return Worker(config, target, model, ctx)


def lm_streams(
    config: Config,
    task: LMTaskConfig,
    target: nn.Module,
    out_root: Path | None,
    device: torch.device,
    rank: int,
    world_size: int,
) -> tuple[LMBatches, LMBatches]:
    """This worker's train and eval token streams; rejects a sequence longer than the model's
    positions, a tokenizer larger than its vocabulary and a missing column before any training."""
    from spd_ray.data.lm import LMBatches, load_tokenizer  # transformers: only for LM tasks

    root = output_root(out_root)
    limit = max_positions(target)
    if limit is not None and task.max_seq_len > limit:
        raise ValueError(
            f"task_config.max_seq_len {task.max_seq_len} is longer than the model's "
            f"max_position_embeddings {limit}"
        )
    if config.tokenizer_name is None and not task.is_tokenized:
        raise ValueError("tokenizer_name is required for a text dataset (is_tokenized: false)")
    tokenizer = None
    if config.tokenizer_name is not None:
        tokenizer = load_tokenizer(resolve_name(config.tokenizer_name, "tokenizer_name", root))
        n_vocab = vocab_size(target)
        if n_vocab is not None and len(tokenizer) > n_vocab:
            raise ValueError(
                f"tokenizer_name {config.tokenizer_name!r} has {len(tokenizer)} tokens, more than "
                f"the model's vocab_size {n_vocab}"
            )
    dataset = resolve_name(task.dataset_name, "task_config.dataset_name", root)

    def stream(split: str, batch_size: int, seed: int) -> LMBatches:
        return LMBatches(
            dataset,
            split,
            task.column_name,
            tokenizer,
            task.max_seq_len,
            batch_size,
            seed,
            rank,
            world_size,
            device,
            is_tokenized=task.is_tokenized,
            streaming=task.streaming,
            buffer_size=task.buffer_size,
            shuffle_each_epoch=task.shuffle_each_epoch,
        )

    train = stream(task.train_data_split, config.batch_size, stream_seed(config.seed, "train_data"))
    evals = stream(
        task.eval_data_split,
        config.effective_eval_batch_size,
        stream_seed(config.seed, "eval_data"),
    )
    return train, evals


def lm_context(
    config: Config,
    model: ComponentModel,
    train_batches: LMBatches,
    eval_batches: LMBatches,
    device: torch.device,
) -> LoopContext:
    rank, world_size = train_batches.rank, train_batches.world_size
    start = eval_batches.state_dict()

    def run_eval(
        m: ComponentModel, step: int, slow: bool
    ) -> tuple[dict[str, Any], dict[str, Figure]]:
        # Rewound to its start at every eval: the same eval batches and mask noise each time.
        eval_batches.load_state_dict(start)
        noise = Noise.for_run(config.seed, "eval", device, rank, world_size)
        batches = (next(eval_batches) for _ in range(config.n_eval_steps))
        return evaluate(config, m, batches, noise, step, slow, world_size=world_size)

    return LoopContext(model, train_batches, run_eval, device, rank, world_size)


def preflight(config: Config) -> None:
    """Check the config against an untrained copy of its toy target before any training, so a bad
    module pattern or metric fails at once instead of after the target has been trained."""
    check_eval_metrics(config)
    if isinstance(config.target_model, TMSTargetConfig | ResidMLPTargetConfig | IHTargetConfig):
        skeleton = build_toy(config.target_model).requires_grad_(False)
        build_component_model(config, skeleton)


class LocalReporter:
    """Writes the run directory (and the trackers) and shows progress in this process."""

    def __init__(
        self, run_dir: RunDir, config: Config, progress: bool, start_step: int = 0
    ) -> None:
        self.writer = RunWriter(run_dir, config, start_step)
        self.bar = (
            tqdm(total=config.steps, initial=start_step, desc=run_dir.path.name, file=sys.stderr)
            if progress
            else None
        )

    def on_step(self, step: int, seconds: float) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.writer.log(step, metrics)
        if self.bar is not None and "train/loss/total" in metrics:
            self.bar.set_postfix(
                loss=f"{metrics['train/loss/total']:.3g}",
                steps_s=f"{metrics.get('train/steps_per_s', 0.0):.1f}",
            )

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        self.writer.figures(step, figures)

    def checkpoint(self, step: int, state: dict[str, Any], final: bool) -> None:
        self.writer.checkpoint(state)

    def close(self, summary: dict[str, Any] | None = None) -> None:
        if self.bar is not None:
            self.bar.close()
        self.writer.close(summary)


@dataclass
class Outcome:
    """How one run ended: `status` is finished, resumed (finished after resuming), already
    finished, or failed (with `error`)."""

    name: str
    run_dir: Path
    metrics: dict[str, float] = field(default_factory=dict)
    resumed_from: int = 0
    already_finished: bool = False
    error: str | None = None
    wall_s: float = 0.0

    @property
    def status(self) -> str:
        if self.error is not None:
            return "failed"
        if self.already_finished:
            return "already finished"
        return f"resumed at {self.resumed_from}" if self.resumed_from else "finished"


@dataclass
class RunResult(Outcome):
    """`decompose`'s result: the outcome plus the trained model."""

    model: ComponentModel | None = None


def default_run_name(experiment: str) -> str:
    return f"{safe_name(experiment)}-{time.strftime('%Y%m%d-%H%M%S')}"


def summarize(
    run_dir: RunDir, final_eval: dict[str, float], wall_s: float, workers: int
) -> dict[str, Any]:
    metrics = run_dir.read_metrics()
    train = [m for m in metrics if "train/loss/total" in m]
    summary: dict[str, Any] = {
        "final_step": metrics[-1]["step"] if metrics else 0,
        "final_eval": final_eval,
        "final_train": {k: v for k, v in train[-1].items() if k != "step"} if train else {},
        "initial_eval": next(
            (m for m in metrics if m["step"] == 0 and any(k.startswith("eval/") for k in m)), {}
        ),
        "checkpoint": str(run_dir.checkpoint_path),
        "wall_seconds": wall_s,
        "workers": workers,
        "torch_threads": torch.get_num_threads(),
    }
    return summary


def resume_state(config: Config, worker: Worker, run_dir: RunDir, device: Any) -> LoopState:
    """The loop state a run starts from - its newest readable checkpoint, else a fresh state - with
    `metrics.jsonl` cut back to that step on the writing rank: every start of every path
    (in-process, Ray worker, restarted worker group, sweep trial) goes through here."""
    state = make_state(config, worker.ctx)
    saved = run_dir.newest_state(device)
    if saved is not None:
        load_state(state, worker.model, worker.ctx.train_batches, saved)
    if worker.ctx.rank == 0:
        run_dir.start_at(state.step)
    return state


def describe_target(config: Config) -> str:
    if config.pretrained_model_name is not None:
        return config.pretrained_model_name
    if config.pretrained_model_path is not None:
        return config.pretrained_model_path
    assert config.target_model is not None
    return f"{type(config.target_model).__name__} {config_hash(config.target_model)}"


@contextmanager
def claim(run_dir: RunDir) -> Iterator[None]:
    """Hold the run's lock for the block (a second command on the run fails at once, naming this
    one). A folder made only to hold the lock is removed again when the block fails before the
    run was initialised, so bad input leaves nothing behind."""
    made = not run_dir.path.exists()
    lock = run_dir.lock().acquire()
    try:
        yield
    except BaseException:
        if made and not run_dir.exists():
            run_dir.clear()
            lock.path.unlink(missing_ok=True)
            run_dir.path.rmdir()
        raise
    finally:
        lock.release()


def open_run(config: Config, run_dir: RunDir, root: Path, fingerprint: str, fresh: bool) -> None:
    """With the run's lock held and the config validated: `--fresh` clears the old run, then
    config.yaml, the target's fingerprint and a copy of a toy target's file are recorded (or,
    on a rerun, checked against the run's own)."""
    if fresh:
        run_dir.clear()
    run_dir.init(config)
    run_dir.check_target(fingerprint, describe_target(config))
    copy_target_file(config, root, run_dir)


def decompose(
    config: Config,
    target: nn.Module | None = None,
    *,
    out: str | Path | None = None,
    name: str | None = None,
    fresh: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> RunResult:
    """Run one decomposition in this process (no Ray) and write its run directory.

    A given `target` is wrapped in place (its decomposed modules are swapped for wrappers that
    behave like the originals outside SPD forwards).

    Rerunning with the same `name` and `out` resumes from the run's checkpoint; `fresh=True` deletes
    the old run first (once the config is known to be good). Returns the final eval metrics and the
    trained model.
    """
    tune_malloc()
    root = output_root(out)
    run_name = default_run_name("run") if name is None else name
    run_dir = RunDir(child(root, run_name, "name"))
    if target is None:
        preflight(config)
    with claim(run_dir):
        if target is None:
            target = load_target(config, root)
        fingerprint = target_fingerprint(target)  # before build_worker wraps its modules
        worker = build_worker(config, target, root, device)  # validates modules and metrics first
        open_run(config, run_dir, root, fingerprint, fresh)
        state = resume_state(config, worker, run_dir, device)
        result = RunResult(run_name, run_dir.path, model=worker.model, resumed_from=state.step)
        if run_dir.finished() and state.step >= config.steps:
            result.metrics = run_dir.read_summary()["final_eval"]
            result.already_finished = True
            return result
        reporter = LocalReporter(run_dir, config, progress, state.step)
        worker.ctx.on_step = reporter.on_step
        t0 = time.perf_counter()
        summary: dict[str, Any] | None = None
        try:
            result.metrics = run_loop(config, worker.ctx, state, reporter)
            result.wall_s = time.perf_counter() - t0
            summary = summarize(run_dir, result.metrics, result.wall_s, 1)
            run_dir.write_summary(summary)
        finally:
            reporter.close(summary)
        return result


def copy_target_file(config: Config, root: Path, run_dir: RunDir) -> None:
    """Keep the toy target's file beside the run so the run directory loads on its own."""
    if config.pretrained_model_path is not None:
        run_dir.copy_target(Path(config.pretrained_model_path))
    elif isinstance(config.target_model, TMSTargetConfig | ResidMLPTargetConfig):
        run_dir.copy_target(cached_target_path(config.target_model, root))


def check_launch(config: Config, workers: int, max_failures: int) -> None:
    check_workers(config, workers)
    if not 0 <= max_failures <= MAX_FAILURES_LIMIT:
        raise ValueError(f"--max-failures must be between 0 and {MAX_FAILURES_LIMIT}")


def run_experiment(
    config: Config,
    *,
    name: str,
    out: str | Path | None = None,
    fresh: bool = False,
    workers: int = 1,
    use_gpu: bool = False,
    cpus_per_worker: float | None = None,
    max_failures: int = 3,
    in_process: bool = False,
    placement: str | None = None,
    wait_timeout_s: float = DEFAULT_WAIT_TIMEOUT_S,
    remote_run: str | None = None,
) -> Outcome:
    """What `spd-ray run` does: the run on Ray Train (or in this process), resumable by name.
    On Ray, the cluster must be able to hold the workers (an autoscaler gets `wait_timeout_s` to
    add nodes); `placement` is `pack` or `spread` (None: Ray Train's default). An object-store
    `out` runs in a staging folder synced with the bucket (`spd_ray.train.staged`)."""
    from spd_ray.sync import remote_root, sync_up
    from spd_ray.train.staged import staged_run

    uri = remote_root(out)
    if uri is not None:
        check_launch(config, workers, max_failures)
        with staged_run(uri, name) as staged:
            return run_experiment(
                config,
                name=name,
                out=staged.local_root,
                fresh=fresh,
                workers=workers,
                use_gpu=use_gpu,
                cpus_per_worker=cpus_per_worker,
                max_failures=max_failures,
                in_process=in_process,
                placement=placement,
                wait_timeout_s=wait_timeout_s,
                remote_run=staged.run_uri,
            )
    root = output_root(out)
    run_dir = RunDir(child(root, name, "--name"))
    check_launch(config, workers, max_failures)
    if cpus_per_worker is not None and not cpus_per_worker > 0:
        raise ValueError(f"--cpus-per-worker must be > 0 (got {cpus_per_worker})")
    if in_process:
        if workers != 1:
            raise ValueError("--in-process runs exactly one worker")
        if use_gpu and not torch.cuda.is_available():
            raise ValueError(
                "--gpu: this machine has no CUDA GPU (torch.cuda.is_available() is False)"
            )
        threads = int(os.environ.get("SPD_RAY_THREADS", "0")) or os.cpu_count() or 1
        torch.set_num_threads(threads)
        device = "cuda" if use_gpu else "cpu"
        try:
            r = decompose(config, out=root, name=name, fresh=fresh, device=device)
        finally:
            if remote_run is not None and run_dir.path.exists():
                sync_up(run_dir.path, remote_run, delete=fresh)
        return Outcome(
            name, r.run_dir, r.metrics, r.resumed_from, r.already_finished, wall_s=r.wall_s
        )

    from spd_ray.capacity import capacity_for
    from spd_ray.ray_session import connect_ray, require_gpus
    from spd_ray.storage import check_shared_root
    from spd_ray.sync import sync_down
    from spd_ray.train.ray_driver import default_cpus_per_worker, run_on_ray, worker_bundle

    t0 = time.perf_counter()
    preflight(config)
    connect_ray()
    if use_gpu:
        require_gpus(workers, f"--workers {workers}")
    per_worker = cpus_per_worker or default_cpus_per_worker(workers)
    bundles = [worker_bundle(per_worker, use_gpu)] * workers
    with capacity_for(bundles, f"--workers {workers}", wait_timeout_s):
        if remote_run is None:  # a bucket is every node's; a local root must be too
            check_shared_root(root)
        with claim(run_dir):
            outcome = prepare_ray_run(config, run_dir, root, fresh)
            if outcome.already_finished:
                return outcome
            if remote_run is not None:
                sync_up(run_dir.path, remote_run, delete=fresh)
            try:
                run_on_ray(
                    config,
                    run_dir,
                    root,
                    workers,
                    use_gpu,
                    per_worker,
                    max_failures,
                    placement,
                    remote_run=remote_run,
                )
            finally:
                if remote_run is not None:  # what rank 0 sent, wherever it ran
                    sync_down(remote_run, run_dir.path)
            outcome.metrics = run_dir.read_summary()["final_eval"]
            outcome.wall_s = time.perf_counter() - t0
            return outcome


def check_workers(config: Config, workers: int) -> None:
    if workers < 1:
        raise ValueError(f"--workers must be >= 1 (got {workers})")
    if config.batch_size % workers:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by --workers {workers}")


def prepare_ray_run(config: Config, run_dir: RunDir, root: Path, fresh: bool) -> Outcome:
    """Driver-side work before the workers start, with the run's lock held and `preflight`
    passed: train (or find) the target, validate the modules on it, open the run directory; says
    whether the run already finished."""
    target = load_target(config, root)  # trained once here and cached; the workers load the file
    fingerprint = target_fingerprint(target)
    build_component_model(config, target)  # any target: bad module patterns fail before --fresh
    open_run(config, run_dir, root, fingerprint, fresh)
    outcome = Outcome(run_dir.path.name, run_dir.path)
    saved = run_dir.newest_state()
    if saved is not None:
        outcome.resumed_from = int(saved["step"])
        if run_dir.finished() and outcome.resumed_from >= config.steps:
            outcome.metrics = run_dir.read_summary()["final_eval"]
            outcome.already_finished = True
    return outcome
