"""Run a decomposition on Ray Train: `TorchTrainer` over N workers, checkpoints through Ray, resume.

The driver validates the config, prepares the run directory and the (cached) target, then hands
every worker the same loop the in-process path runs (`spd_ray.train.loop.run_loop`). Rank 0 writes
the run directory; every rank reports to Ray at checkpoints (rank 0 with the checkpoint) and,
throttled, at log points. Rerunning with the same run directory resumes from the newest checkpoint -
Ray's, or the run directory's `checkpoint.pt` - on any number of workers.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from spd_ray.config import Config, config_from_dict
from spd_ray.train.rundir import RunDir, tune_malloc

ERROR_FILE = "error.txt"
RAY_SUBDIR = "ray"


def ray_env() -> dict[str, str]:
    """Environment for Ray processes: loopback-only, no usage stats, snappy report polling."""
    env = {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": os.environ.get(
            "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5"
        ),
        "TOKENIZERS_PARALLELISM": "false",
    }
    return env


def connect_ray(num_cpus: int | None = None) -> bool:
    """Attach to a running cluster (RAY_ADDRESS, or one started with `ray start` on this machine);
    otherwise start a local Ray sized to this machine. Returns True when a local Ray was started."""
    import ray

    if ray.is_initialized():
        return False
    for key, value in ray_env().items():
        os.environ.setdefault(key, value)
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
        return False
    try:
        ray.init(address="auto", log_to_driver=True)
        return False
    except ConnectionError:
        pass
    ray.init(
        num_cpus=num_cpus or os.cpu_count() or 1,
        include_dashboard=False,
        log_to_driver=True,
    )
    return True


@dataclass
class WorkerArgs:
    config: dict[str, Any]
    run_dir: str
    out_root: str
    threads: int
    use_gpu: bool


class RayReporter:
    """Rank 0 writes the run directory; every rank reports to Ray (they must report together)."""

    def __init__(self, run_dir: RunDir, rank: int, total_steps: int, min_interval_s: float):
        self.run_dir = run_dir
        self.rank = rank
        self.total_steps = total_steps
        self.min_interval_s = min_interval_s
        self.last_report = 0.0
        self.last: dict[str, float] = {}

    def log(self, step: int, metrics: dict[str, float]) -> None:
        import ray.train

        self.last.update(metrics)
        if self.rank == 0:
            self.run_dir.append_metrics(step, metrics)
            if "train/loss/total" in metrics:
                print(
                    f"[{self.run_dir.path.name}] step {step}/{self.total_steps} "
                    f"loss {metrics['train/loss/total']:.4g} "
                    f"{metrics.get('train/steps_per_s', 0.0):.1f} steps/s",
                    flush=True,
                )
        # report() blocks until the controller polls, so log points report at most this often.
        now = time.monotonic()
        if now - self.last_report >= self.min_interval_s:
            ray.train.report({"step": step, **metrics})
            self.last_report = time.monotonic()

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        if self.rank == 0:
            self.run_dir.save_figures(step, figures)

    def checkpoint(self, step: int, state: dict[str, Any], final: bool) -> None:
        import ray.train

        metrics = {"step": step, **{k: v for k, v in self.last.items() if "/" in k}}
        if self.rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        self.run_dir.save_checkpoint(state)
        with tempfile.TemporaryDirectory() as tmp:
            torch.save(state, Path(tmp) / "checkpoint.pt")
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        self.last_report = time.monotonic()


def _newest_state(run_dir: RunDir) -> dict[str, Any] | None:
    """The newer of Ray's latest checkpoint and the run directory's checkpoint.pt."""
    import ray.train

    candidates: list[dict[str, Any]] = []
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            candidates.append(torch.load(Path(d) / "checkpoint.pt", weights_only=False))
    if run_dir.checkpoint_path.exists():
        candidates.append(run_dir.load_checkpoint())
    return max(candidates, key=lambda s: int(s["step"])) if candidates else None


def train_worker(args_dict: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    import ray.train

    from spd_ray.train.loop import NonFiniteLossError, load_state, make_state, run_loop
    from spd_ray.train.run import build_worker, summarize

    args = WorkerArgs(**args_dict)
    tune_malloc()
    torch.set_num_threads(max(1, args.threads))
    ctx_train = ray.train.get_context()
    rank, world = ctx_train.get_world_rank(), ctx_train.get_world_size()
    device = torch.device("cpu")
    if args.use_gpu:
        device = ray.train.torch.get_device()
    config = config_from_dict(args.config)
    run_dir = RunDir(Path(args.run_dir))
    worker = build_worker(config, None, Path(args.out_root), device, rank, world)
    state = make_state(config, worker.ctx)
    saved = _newest_state(run_dir)
    if saved is not None:
        load_state(state, worker.model, worker.ctx.train_batches, saved)
        if rank == 0:
            run_dir.truncate_metrics_after(state.step)
            print(f"[{run_dir.path.name}] resumed from step {state.step}", flush=True)
    reporter = RayReporter(run_dir, rank, config.steps, min_interval_s=1.0)
    t0 = time.perf_counter()
    try:
        final_eval = run_loop(config, worker.ctx, state, reporter)
    except NonFiniteLossError as err:
        # Retrying would only repeat it: record why and end the run; the last good checkpoint stays.
        if rank == 0:
            (run_dir.path / ERROR_FILE).write_text(str(err) + "\n")
        return
    if rank == 0:
        run_dir.write_summary(summarize(run_dir, final_eval, time.perf_counter() - t0, world))


def run_on_ray(
    config: Config,
    run_dir: RunDir,
    out_root: Path,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float | None,
    max_failures: int,
) -> None:
    """Fit one decomposition with a TorchTrainer; returns when the run finished or failed."""
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    local = connect_ray()
    cluster_cpus = ray.cluster_resources().get("CPU", 1.0)
    if cpus_per_worker is None:
        cpus_per_worker = max(1.0, float(int(cluster_cpus // workers))) if local else 1.0
    threads = max(1, int(cpus_per_worker))
    (run_dir.path / ERROR_FILE).unlink(missing_ok=True)
    trainer = TorchTrainer(
        train_worker,
        train_loop_config=WorkerArgs(
            config=config.model_dump(mode="json"),
            run_dir=str(run_dir.path),
            out_root=str(out_root),
            threads=threads,
            use_gpu=use_gpu,
        ).__dict__,
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=ray.train.RunConfig(
            name=RAY_SUBDIR,
            storage_path=str(run_dir.path),
            failure_config=ray.train.FailureConfig(max_failures=max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
    )
    trainer.fit()
    error = run_dir.path / ERROR_FILE
    if error.exists():
        raise RuntimeError(error.read_text().strip())
