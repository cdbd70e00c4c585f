"""Experiment trackers beside the run directory: TensorBoard always, wandb when the config asks.

Only the process that writes the run directory (rank 0) creates a `Trackers`. TensorBoard event
files go to `<run>/tb/`, so `tensorboard --logdir <out>` shows every run under an output root. Every
start purges the events logged after the step it starts from (`purge_step`: all of them for a start
at step 0, those after the checkpoint's step on a resume), so curves never hold a step twice.

wandb is used when `config.wandb_project` is set: rank 0 calls `wandb.init` itself (Ray's
`setup_wandb` creates one run per rank under Train V2). Without an API key (no `WANDB_API_KEY`,
no `wandb login`) or with `WANDB_MODE=offline` it runs offline into `<run>/wandb/`, to be uploaded
later with `wandb sync`. The wandb run id is derived from the run directory, so a resumed run
continues the same wandb run.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from spd_ray.config import Config
from spd_ray.runs import RunDir

TB_SUBDIR = "tb"


def _wandb_mode() -> str:
    mode = os.environ.get("WANDB_MODE")
    if mode:
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


def wandb_run_id(run_path: Path) -> str:
    return "spd-" + hashlib.sha256(str(run_path.resolve()).encode()).hexdigest()[:12]


class Trackers:
    def __init__(self, run_path: Path, config: Config, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(
            str(run_path / TB_SUBDIR),
            # TensorBoard drops events at steps >= purge_step; the checkpoint's own step stays.
            purge_step=start_step + 1 if start_step > 0 else 0,
            flush_secs=10,
        )
        self.wandb: Any = None
        if config.wandb_project:
            import wandb

            name = config.wandb_run_name or f"{config.wandb_run_name_prefix}{run_path.name}"
            self.wandb = wandb.init(
                project=config.wandb_project,
                name=name,
                id=wandb_run_id(run_path),
                resume="allow",
                dir=str(run_path),
                config=config.model_dump(mode="json"),
                mode=_wandb_mode(),  # type: ignore[arg-type]
            )

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for key, value in metrics.items():
            self.tb.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(metrics, step=step)

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        for key, fig in figures.items():
            self.tb.add_figure(f"figures/{key}", fig, step, close=False)
        if self.wandb is not None:
            import wandb

            self.wandb.log({f"figures/{k}": wandb.Image(f) for k, f in figures.items()}, step=step)

    def flush(self) -> None:
        self.tb.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.tb.close()
        if self.wandb is not None:
            if summary:
                for key, value in summary.get("final_eval", {}).items():
                    self.wandb.summary[key] = value
            self.wandb.finish()
            self.wandb = None


class RunWriter:
    """Everything the writing process (rank 0) records as a run goes: `metrics.jsonl`, figures,
    `checkpoint.pt` and the trackers."""

    def __init__(self, run_dir: RunDir, config: Config, start_step: int = 0):
        self.run_dir = run_dir
        self.trackers = Trackers(run_dir.path, config, start_step)

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run_dir.append_metrics(step, metrics)
        self.trackers.log(step, metrics)

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        self.trackers.figures(step, figures)
        self.run_dir.save_figures(step, figures)

    def checkpoint(self, state: dict[str, Any]) -> None:
        self.run_dir.save_checkpoint(state)
        self.trackers.flush()

    def close(self, summary: dict[str, Any] | None = None) -> None:
        self.trackers.close(summary)
