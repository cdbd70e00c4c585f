"""The training loop, framework-free: the in-process path and every Ray worker run exactly this.

Order per step k (0-based): learning rate for k -> clean forward, CI, losses -> backward ->
(gradient average across workers) -> clip -> optimizer step. After the update the model has seen k +
1 steps: train metrics averaged over the last log interval are reported at step k + 1, evals run on
the updated model, checkpoints hold the state after k + 1 updates. An eval also runs at step 0
before any update, so every run shows where it started. Scalars stay on device between log points
(no host syncs inside a step). I/O happens only in the `Reporter` the caller passes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from matplotlib.figure import Figure
from torch import Tensor

from spd_ray.config import Config
from spd_ray.core.losses import faithfulness_loss
from spd_ray.core.masks import Noise
from spd_ray.core.model import ComponentModel
from spd_ray.core.schedule import scheduled_value
from spd_ray.core.step import attention_backend, autocast, step_function


class Batches(Protocol):
    """A worker's stream of batches, saved and restored with the run's state."""

    def __iter__(self) -> Iterator[Tensor]: ...

    def __next__(self) -> Tensor: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# (model, step, slow) -> (eval metrics, figures); `slow` asks for the slow metrics and figures too
EvalFn = Callable[[ComponentModel, int, bool], tuple[dict[str, Tensor], dict[str, Figure]]]


class Reporter(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def figures(self, step: int, figures: dict[str, Figure]) -> None: ...

    def checkpoint(self, step: int, state: dict[str, Any], final: bool) -> None: ...


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopContext:
    """Everything the loop needs besides the config; built by `spd_ray.train.run` or a Ray
    worker."""

    model: ComponentModel
    train_batches: Batches
    evaluate: EvalFn
    device: torch.device
    rank: int = 0
    world_size: int = 1
    on_step: Callable[[int, float], None] | None = None  # progress (step, seconds of that step)


@dataclass
class LoopState:
    optimizer: torch.optim.Optimizer
    noise: Noise
    step: int = 0
    warmup_done: bool = False
    sums: dict[str, Tensor] = field(default_factory=dict)
    n_summed: int = 0
    last_eval: dict[str, float] = field(default_factory=dict)  # saved: a rerun after the final
    # checkpoint returns the final eval without training or evaluating again


def make_state(config: Config, ctx: LoopContext) -> LoopState:
    comp_params, ci_params = ctx.model.trainable_parameters()
    optimizer = torch.optim.AdamW(
        [{"params": comp_params}, {"params": ci_params}],
        lr=config.lr_schedule.start_val,
        weight_decay=0.0,
    )
    noise = Noise.for_run(
        config.seed, "train", ctx.device, ctx.rank, ctx.world_size, rng=config.mask_rng
    )
    return LoopState(optimizer, noise)


def state_dict(state: LoopState, model: ComponentModel, batches: Batches) -> dict[str, Any]:
    """The whole training state, independent of the number of workers."""
    return {
        "model": trainable_state_dict(model),
        "optimizer": state.optimizer.state_dict(),
        "step": state.step,
        "warmup_done": state.warmup_done,
        **state.noise.state_dict(),
        "data": batches.state_dict(),
        "sums": {k: v.detach().cpu() for k, v in state.sums.items()},
        "n_summed": state.n_summed,
        "last_eval": dict(state.last_eval),
    }


def load_state(
    state: LoopState, model: ComponentModel, batches: Batches, saved: dict[str, Any]
) -> None:
    model.load_state_dict(saved["model"], strict=False)
    state.optimizer.load_state_dict(saved["optimizer"])
    state.step = int(saved["step"])
    state.warmup_done = bool(saved["warmup_done"])
    state.noise.load_state_dict(saved)
    batches.load_state_dict(saved["data"])
    device = next(iter(model.parameters())).device
    state.sums = {k: v.to(device) for k, v in saved["sums"].items()}
    state.n_summed = int(saved["n_summed"])
    state.last_eval = {k: float(v) for k, v in saved.get("last_eval", {}).items()}


def trainable_state_dict(model: ComponentModel) -> dict[str, Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(("components.", "ci_fns."))}


def _all_reduce_grads(params: list[torch.nn.Parameter], world_size: int) -> None:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world_size
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def _mean_across_workers(values: dict[str, Tensor], world_size: int) -> dict[str, float]:
    keys = sorted(values)
    if not keys:
        return {}
    stacked = torch.stack([values[k].float() for k in keys])
    if world_size > 1:
        dist.all_reduce(stacked)
        stacked /= world_size
    return dict(zip(keys, stacked.tolist(), strict=True))  # the one host sync per log point


def _check_finite(metrics: dict[str, float], step: int) -> None:
    bad = [k for k, v in metrics.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteLossError(f"non-finite {', '.join(bad)} at step {step}")


def faithfulness_warmup(config: Config, model: ComponentModel, reporter: Reporter) -> None:
    """Fit V U to the target weights before training, on the component parameters only."""
    comp_params, _ = model.trainable_parameters()
    opt = torch.optim.AdamW(
        comp_params,
        lr=config.faithfulness_warmup_lr,
        weight_decay=config.faithfulness_warmup_weight_decay,
    )
    loss = torch.zeros(())
    for _ in range(config.faithfulness_warmup_steps):
        opt.zero_grad(set_to_none=True)
        loss = faithfulness_loss(model)
        loss.backward()
        opt.step()
    reporter.log(0, {"warmup/faithfulness": float(loss.detach())})


def run_loop(
    config: Config, ctx: LoopContext, state: LoopState, reporter: Reporter
) -> dict[str, float]:
    """Train from `state.step` to `config.steps`; returns the final eval metrics."""
    model, ws = ctx.model, ctx.world_size
    comp_params, ci_params = model.trainable_parameters()
    all_params = comp_params + ci_params
    step_losses = step_function(config, model, ws)
    if not state.warmup_done:
        if config.faithfulness_warmup_steps:
            faithfulness_warmup(config, model, reporter)
        state.warmup_done = True
    if state.step == 0:
        state.last_eval = _run_eval(config, ctx, 0, reporter)

    t_interval = time.perf_counter()
    steps_in_interval = 0
    while state.step < config.steps:
        step = state.step
        t0 = time.perf_counter()
        lr = scheduled_value(step, config.steps, **config.lr_schedule.model_dump())
        for group in state.optimizer.param_groups:
            group["lr"] = lr
        state.optimizer.zero_grad(set_to_none=True)
        batch = next(ctx.train_batches).to(ctx.device)
        with autocast(config, ctx.device), attention_backend(config, ctx.device):
            total, metrics = step_losses(batch, state.noise, step / config.steps)
        total.backward()
        if ws > 1:
            _all_reduce_grads(all_params, ws)
        if config.grad_clip_norm_components is not None:
            torch.nn.utils.clip_grad_norm_(comp_params, config.grad_clip_norm_components)
        if config.grad_clip_norm_ci_fns is not None:
            torch.nn.utils.clip_grad_norm_(ci_params, config.grad_clip_norm_ci_fns)
        state.optimizer.step()
        for k, v in metrics.items():
            state.sums[k] = state.sums[k] + v if k in state.sums else v.clone()
        state.n_summed += 1
        state.step = step + 1
        steps_in_interval += 1
        if ctx.on_step is not None:
            ctx.on_step(state.step, time.perf_counter() - t0)

        last = state.step == config.steps
        if state.step % config.train_log_freq == 0 or last:
            avg = {f"train/{k}": v / state.n_summed for k, v in state.sums.items()}
            logged = _mean_across_workers(avg, ws)
            _check_finite(logged, state.step)
            elapsed = time.perf_counter() - t_interval
            logged["train/lr"] = lr
            logged["train/steps_per_s"] = steps_in_interval / max(elapsed, 1e-9)
            reporter.log(state.step, logged)
            state.sums, state.n_summed = {}, 0
            t_interval, steps_in_interval = time.perf_counter(), 0
        if state.step % config.eval_freq == 0 or last:
            state.last_eval = _run_eval(config, ctx, state.step, reporter)
        if (config.save_freq and state.step % config.save_freq == 0) or last:
            reporter.checkpoint(state.step, state_dict(state, model, ctx.train_batches), final=last)
    if not state.last_eval:
        # Only a checkpoint from before `last_eval` was saved can end here without an eval.
        state.last_eval = _run_eval(config, ctx, state.step, reporter)
    return state.last_eval


def _run_eval(config: Config, ctx: LoopContext, step: int, reporter: Reporter) -> dict[str, float]:
    slow_freq = config.effective_slow_eval_freq
    slow = (step == 0 and config.slow_eval_on_first_step) or (step > 0 and step % slow_freq == 0)
    slow = slow or step == config.steps
    scalars, figures = ctx.evaluate(ctx.model, step, slow)
    metrics = _mean_across_workers(scalars, ctx.world_size)
    reporter.log(step, metrics)
    if figures and ctx.rank == 0:
        reporter.figures(step, figures)
    return metrics
