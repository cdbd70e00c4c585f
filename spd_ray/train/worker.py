"""One worker's share of a run, built from its config: the target, the ComponentModel, its train
data stream and its evaluation. The in-process path, every Ray Train worker and every sweep trial
build their worker here."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from matplotlib.figure import Figure
from torch import Tensor, nn

from spd_ray.config import Config, IHTaskConfig, LMTaskConfig, ToyTarget
from spd_ray.core.masks import Noise
from spd_ray.core.model import ComponentModel
from spd_ray.core.step import build_component_model, compiles_step
from spd_ray.core.streams import stream_seed
from spd_ray.data.ih import IHBatches, make_ih_task
from spd_ray.data.toy import ToyBatches, make_toy_dataset
from spd_ray.errors import InputError
from spd_ray.evals.evaluate import check_eval_metrics, evaluate
from spd_ray.runs import output_root
from spd_ray.targets import load_target
from spd_ray.targets.hf import max_positions, resolve_name, vocab_size
from spd_ray.targets.loading import build_toy
from spd_ray.train.loop import Batches, EvalFn, LoopContext

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
        raise InputError(f"batch_size {config.batch_size} is not divisible by {world_size} workers")
    if target is None:
        target = load_target(config, output_root(out_root))
    # Component and CI-function init: identical on every worker. Every random stream of a run is
    # derived from config.seed (spd_ray.core.streams), so none repeats another's numbers.
    torch.manual_seed(stream_seed(config.seed, "init"))
    model = build_component_model(config, target).to(device)
    skip = config.ci_skip_zero_rows
    model.skip_zero_rows = device.type == "cpu" if skip is None else skip
    compact = config.compact_zero_rows
    model.compact_zero_rows = device.type == "cpu" if compact is None else compact
    if config.compile_ci_fns and not compiles_step(config, world_size):
        model.compile_ci_fns()  # a compiled step compiles them with everything else
    train, fresh_eval, single = data_streams(config, target, out_root, device, rank, world_size)
    run_eval = eval_fn(config, fresh_eval, device, rank, world_size, single)
    return Worker(
        config, target, model, LoopContext(model, train, run_eval, device, rank, world_size)
    )


def data_streams(
    config: Config,
    target: nn.Module,
    out_root: Path | None,
    device: torch.device,
    rank: int,
    world_size: int,
) -> tuple[Batches, Callable[[], Iterator[Tensor]], Tensor | None]:
    """This worker's train batches, a function giving the eval batches from their start (the same
    batches at every eval), and the toy tasks' one-feature-at-a-time input for the
    target-solution metrics (None for the others)."""
    task = config.task_config
    train_seed = stream_seed(config.seed, "train_data")
    eval_seed = stream_seed(config.seed, "eval_data")
    eval_bs = config.effective_eval_batch_size
    if isinstance(task, LMTaskConfig):
        train_lm, eval_lm = lm_streams(config, task, target, out_root, device, rank, world_size)
        start = eval_lm.state_dict()

        def rewound() -> Iterator[Tensor]:
            eval_lm.load_state_dict(start)
            return eval_lm

        return train_lm, rewound, None
    if isinstance(task, IHTaskConfig):
        ih_task = make_ih_task(task, target)
        ih_train = IHBatches(ih_task, config.batch_size, train_seed, rank, world_size, device)
        return (
            ih_train,
            lambda: IHBatches(ih_task, eval_bs, eval_seed, rank, world_size, device),
            None,
        )
    assert task.task_name in ("tms", "resid_mlp"), f"no data stream for task {task.task_name!r}"
    dataset = make_toy_dataset(task, target)
    toy_train = ToyBatches(dataset, config.batch_size, train_seed, rank, world_size, device)
    single = 0.75 * torch.eye(dataset.n_features, device=device)
    return (
        toy_train,
        lambda: ToyBatches(dataset, eval_bs, eval_seed, rank, world_size, device),
        single,
    )


def eval_fn(
    config: Config,
    fresh_eval: Callable[[], Iterator[Tensor]],
    device: torch.device,
    rank: int,
    world_size: int,
    single_feature_input: Tensor | None,
) -> EvalFn:
    def run_eval(
        m: ComponentModel, step: int, slow: bool
    ) -> tuple[dict[str, Tensor], dict[str, Figure]]:
        # The same eval batches and mask noise at every eval, so evals are comparable across steps
        # and a resumed run evaluates exactly like an uninterrupted one.
        batches = fresh_eval()
        noise = Noise.for_run(config.seed, "eval", device, rank, world_size, rng=config.mask_rng)
        return evaluate(
            config,
            m,
            (next(batches) for _ in range(config.n_eval_steps)),
            noise,
            step,
            slow,
            single_feature_input=single_feature_input,
            world_size=world_size,
            fresh_batches=fresh_eval,
        )

    return run_eval


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
        raise InputError(
            f"task_config.max_seq_len {task.max_seq_len} is longer than the model's "
            f"max_position_embeddings {limit}"
        )
    if config.tokenizer_name is None and not task.is_tokenized:
        raise InputError("tokenizer_name is required for a text dataset (is_tokenized: false)")
    tokenizer = None
    if config.tokenizer_name is not None:
        tokenizer = load_tokenizer(resolve_name(config.tokenizer_name, "tokenizer_name", root))
        n_vocab = vocab_size(target)
        if n_vocab is not None and len(tokenizer) > n_vocab:
            raise InputError(
                f"tokenizer_name {config.tokenizer_name!r} has {len(tokenizer)} tokens, more than "
                f"the model's vocab_size {n_vocab}"
            )
    dataset = resolve_name(task.dataset_name, "task_config.dataset_name", root)

    def stream(split: str, batch_size: int, seed: int) -> LMBatches:
        return LMBatches.for_task(
            task, dataset, split, tokenizer, batch_size, seed, rank, world_size, device
        )

    train = stream(task.train_data_split, config.batch_size, stream_seed(config.seed, "train_data"))
    evals = stream(
        task.eval_data_split,
        config.effective_eval_batch_size,
        stream_seed(config.seed, "eval_data"),
    )
    return train, evals


def preflight(config: Config) -> None:
    """Check the config against an untrained copy of its toy target before any training, so a bad
    module pattern or metric fails at once instead of after the target has been trained."""
    check_eval_metrics(config)
    if isinstance(config.target, ToyTarget):
        skeleton = build_toy(config.target.model).requires_grad_(False)
        build_component_model(config, skeleton)
