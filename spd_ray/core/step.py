"""One SPD training step as a function: batch in, loss terms out (no I/O, no logging, no syncs)."""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from spd_ray.config import Config, IHTargetConfig, IHTaskConfig, LMTaskConfig
from spd_ray.core.compiled import STEP_VALID, CompiledStep, StepFn
from spd_ray.core.losses import total_loss
from spd_ray.core.masks import Noise
from spd_ray.core.model import CleanCache, ComponentModel
from spd_ray.core.recon import StepInputs
from spd_ray.core.rows import KeptRows, RowNoise


def build_component_model(config: Config, target: torch.nn.Module) -> ComponentModel:
    identity = [m.module_pattern for m in config.identity_module_info or []]
    task = config.task_config
    positions = task.output_positions if isinstance(task, IHTaskConfig) else "all"
    return ComponentModel(
        target,
        [(m.module_pattern, m.C) for m in config.all_module_info],
        ci_fn_type=config.ci_fn_type,
        ci_fn_hidden_dims=list(config.ci_fn_hidden_dims),
        sigmoid_type=config.sigmoid_type,
        identity_patterns=identity,
        output_attr=config.pretrained_model_output_attr,
        tied_pairs=list(getattr(target, "tied_module_pairs", [])),
        reuse_clean_activations=config.reuse_clean_activations,
        output_positions=positions,
        low_rank_forward=config.low_rank_forward,
    )


def autocast(config: Config, device: torch.device, evaluating: bool = False) -> torch.autocast:
    """bf16 autocast of training forwards when `autocast_bf16`; evals run in fp32 as the reference
    does, unless `eval_autocast_bf16` keeps them in bf16 too (then train and eval numbers of a loss
    are comparable)."""
    enabled = config.autocast_bf16 and (not evaluating or config.eval_autocast_bf16)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


# On CPU, sequences up to this many tokens train with PyTorch's math attention rather than its
# CPU flash kernel, whose backward costs ~3 ms at 8 x 4 heads x 64 tokens (math: ~1.2 ms) and makes
# tiny_llama_1L's compiled step 1.2x slower; from ~256 tokens flash is as fast or faster.
CPU_MATH_ATTENTION_MAX_LEN = 128


def sequence_length(config: Config) -> int | None:
    """Tokens per sequence of a run with attention (language models, induction heads)."""
    if isinstance(config.task_config, LMTaskConfig):
        return config.task_config.max_seq_len
    if isinstance(config.target_model, IHTargetConfig):
        return config.target_model.seq_len
    return None


def attention_backend(
    config: Config, device: torch.device
) -> contextlib.AbstractContextManager[Any]:
    """The attention kernel a training step runs with: math attention for short sequences on
    CPU (`CPU_MATH_ATTENTION_MAX_LEN`), PyTorch's choice otherwise. Same result up to float
    rounding."""
    n = sequence_length(config)
    if device.type != "cpu" or n is None or n > CPU_MATH_ATTENTION_MAX_LEN:
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.MATH])


def step_inputs(
    config: Config,
    model: ComponentModel,
    batch: Tensor,
    noise: Noise,
    step_frac: float | Tensor,
    world_size: int = 1,
    compact: bool = False,
) -> StepInputs:
    """Clean forward (cached), then causal importances: everything a loss term needs. `compact`
    (a training step): on the batch's nonzero rows alone where the model allows
    (`ComponentModel.kept_rows`, `spd_ray.core.rows`), the loss terms putting the others back."""
    kept = model.kept_rows(batch) if compact else None
    if kept is not None:
        with torch.no_grad():
            target_out, cache = model.clean_forward(kept.take(batch))
        quiet = model.quiet_zero_row(cache, kept)
        if kept.fits is not None:  # compiled: a step that does not hold is run again eagerly
            kept.fits = kept.fits & quiet
        elif not bool(quiet):
            model.forgo_compaction(batch)
            kept = None
    if kept is None:
        with torch.no_grad():
            target_out, cache = model.clean_forward(batch)
        return _inputs(config, model, batch, target_out, cache, noise, step_frac, world_size)
    noise = RowNoise(noise, kept)
    return _inputs(
        config, model, kept.take(batch), target_out, cache, noise, step_frac, world_size, kept
    )


def _inputs(
    config: Config,
    model: ComponentModel,
    batch: Tensor,
    target_out: Tensor,
    cache: CleanCache,
    noise: Noise,
    step_frac: float | Tensor,
    world_size: int,
    kept: KeptRows | None = None,
) -> StepInputs:
    ci = model.ci_from_cache(cache, sampling=config.sampling, noise=noise)
    return StepInputs(
        model=model,
        batch=batch,
        target_out=target_out,
        cache=cache,
        ci=ci,
        output_loss_type=config.output_loss_type,
        use_delta_component=config.use_delta_component,
        sampling=config.sampling,
        n_mask_samples=config.n_mask_samples,
        noise=noise,
        step_frac=step_frac,
        world_size=world_size,
        copies_per_forward=config.masked_copies_per_forward,
        forward_budget_bytes=(
            None
            if config.masked_forward_budget_mb is None
            else int(config.masked_forward_budget_mb * 2**20)
        ),
        kept=kept,
    )


def train_step_losses(
    config: Config,
    model: ComponentModel,
    batch: Tensor,
    noise: Noise,
    step_frac: float | Tensor,
    world_size: int = 1,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (to backpropagate) and detached per-term values plus train L0 per layer."""
    inp = step_inputs(config, model, batch, noise, step_frac, world_size, compact=True)
    total, terms = total_loss(list(config.loss_metric_configs), inp)
    metrics = {k: v.detach() for k, v in terms.items()}
    metrics["loss/total"] = total.detach()
    kept = inp.kept
    # Inside a compiled step: whether the batch fit the sizes the graph assumed (`CompiledStep`).
    fits = [f for f in (inp.ci.rows_fit, None if kept is None else kept.fits) if f is not None]
    if fits:
        metrics[STEP_VALID] = functools.reduce(torch.logical_and, fits)
    thr = config.ci_alive_threshold
    for path, ci in inp.ci.lower.items():
        active = (ci.detach() > thr).sum(-1).float()
        metrics[f"l0/{path}"] = (
            active.mean() if kept is None else kept.batch_sum(active) / kept.n_rows
        )
    return total, metrics


# Steps from which `compile: null` compiles the step: the compile (~10-20 s on the toys, ~1 min for
# a tiny Llama with PGD; a few s with a warm on-disk cache) pays for itself after a few hundred
# steps; short test runs stay eager.
COMPILE_MIN_STEPS = 1000


def compiles_step(config: Config, world_size: int = 1) -> bool:
    """Whether a worker's training step runs compiled (`Config.compile`; by default, `null`, runs
    of at least COMPILE_MIN_STEPS steps). Data-parallel runs stay eager: the importance-minimality
    all-reduce and PGD's broadcast run inside the step."""
    if world_size > 1:
        return False
    if config.compile is not None:
        return config.compile
    return config.steps >= COMPILE_MIN_STEPS


def step_function(config: Config, model: ComponentModel, world_size: int = 1) -> StepFn:
    """The training step's losses as `(batch, noise, step_frac) -> (total, metrics)`: compiled as
    one graph when `compiles_step`, else `train_step_losses` itself."""

    def losses(
        batch: Tensor, noise: Noise, step_frac: float | Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return train_step_losses(config, model, batch, noise, step_frac, world_size)

    return CompiledStep(losses) if compiles_step(config, world_size) else losses
