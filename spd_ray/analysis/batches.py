"""Batches of a run's own data, drawn with a seed of the caller's: the task's toy distribution,
induction sequences, or the run's language-model dataset (its train split unless one is named).
Clustering, model comparison and activation plots read their inputs here."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from spd_ray.config import IHTaskConfig, LMTaskConfig
from spd_ray.errors import InputError
from spd_ray.loaded_run import LoadedRun
from spd_ray.runs import assets_root


def run_batches(
    run: LoadedRun,
    batch_size: int,
    seed: int,
    out: str | Path | None = None,
    split: str | None = None,
    device: torch.device | str = "cpu",
) -> Iterator[Tensor]:
    """An endless stream of batches of `batch_size` inputs from the run's task; the same seed gives
    the same batches, different seeds different ones."""
    if batch_size < 1:
        raise InputError(f"batch size must be >= 1, got {batch_size}")
    device = torch.device(device)
    config, target = run.config, run.target
    task = config.task_config
    if isinstance(task, LMTaskConfig):
        from spd_ray.data.lm import LMBatches, load_tokenizer
        from spd_ray.targets.hf import resolve_name

        root = assets_root(run.run_dir, out)
        tokenizer = None
        if config.tokenizer_name is not None:
            tokenizer = load_tokenizer(resolve_name(config.tokenizer_name, "tokenizer_name", root))
        return LMBatches.for_task(
            task,
            resolve_name(task.dataset_name, "task_config.dataset_name", root),
            split or task.train_data_split,
            tokenizer,
            batch_size,
            seed,
            device=device,
        )
    if split is not None:
        raise InputError(f"a split applies to language-model runs only (this is {task.task_name})")
    if isinstance(task, IHTaskConfig):
        from spd_ray.data.ih import IHBatches, make_ih_task

        return IHBatches(make_ih_task(task, target), batch_size, seed, 0, 1, device)
    from spd_ray.data.toy import ToyBatches, make_toy_dataset

    return ToyBatches(make_toy_dataset(task, target), batch_size, seed, 0, 1, device)
