"""One evaluation pass: every configured metric over a fixed set of eval batches.

The metric list is `eval_metric_configs` plus every training loss not already listed there (the eval
entry wins). Loss-type metrics are averaged over batches; CI statistics are accumulated; figures are
made only on slow evals. Single-feature metrics (IdentityCIError, permuted CI plots) run the model
on 0.75 * one-hot inputs, which the caller supplies for toy tasks. Every eval runs in fp32 unless
`eval_autocast_bf16` (training keeps its bf16 autocast). MMCS/ML2R come in two variants:
`mmcs/<layer>`, `ml2r/<layer>` as the reference defines them (max over all subcomponents) and
`mmcs_filtered/<layer>`, `ml2r_filtered/<layer>` over subcomponents of non-negligible norm only.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Iterator
from typing import assert_never

import torch
from matplotlib.figure import Figure
from torch import Tensor

from spd_ray import config as schema
from spd_ray.core.losses import (
    importance_minimality_from_sums,
    importance_sums,
    loss_term,
    subset_routes,
)
from spd_ray.core.masks import Noise, Routes, all_routes
from spd_ray.core.model import CIOutputs, ComponentModel
from spd_ray.core.pgd import pgd_multibatch_recon_loss
from spd_ray.core.recon import StepInputs
from spd_ray.core.schedule import annealed_p
from spd_ray.core.step import autocast, step_inputs
from spd_ray.errors import InputError
from spd_ray.evals import figures as draw
from spd_ray.evals.ce_kl import CEandKL, SubsetCEandKL
from spd_ray.evals.metrics import CIStats, identity_ci_errors, mmcs_ml2r
from spd_ray.evals.target_solutions import permute_by_pattern


def eval_only_kind(m: schema.EvalOnlyConfig) -> str:
    """What an eval-only metric needs: `lm` (a language-model task), `toy` (a toy task's
    one-feature-at-a-time input), `any`. Every eval-only config class is named here, so a new one
    fails mypy's exhaustiveness check (and this function) until `evaluate` computes it."""
    match m:
        case schema.CEandKLLosses() | schema.StochasticReconSubsetCEAndKL():
            return "lm"
        case schema.IdentityCIError() | schema.PermutedCIPlots() | schema.UVPlots():
            return "toy"
        case (
            schema.CI_L0()
            | schema.PGDMultiBatchReconLoss()
            | schema.PGDMultiBatchReconSubsetLoss()
            | schema.CIHistograms()
            | schema.CIMeanPerComponent()
            | schema.ComponentActivationDensity()
            | schema.MMCSAndML2R()
        ):
            return "any"
        case _:
            assert_never(m)


def eval_metric_list(config: schema.Config) -> list[schema.LossConfig | schema.EvalOnlyConfig]:
    listed = {m.classname for m in config.eval_metric_configs}
    extra = [m for m in config.loss_metric_configs if m.classname not in listed]
    return [*config.eval_metric_configs, *extra]


def check_eval_metrics(config: schema.Config) -> None:
    """Reject metrics that cannot run on this task before any work starts."""
    task = config.task_config.task_name
    for m in eval_metric_list(config):
        if m.classname in schema.LOSS_CLASSNAMES:
            continue
        need = eval_only_kind(m)  # type: ignore[arg-type]
        if need == "lm" and task != "lm":
            raise InputError(
                f"eval_metric_configs.{m.classname} needs a language-model task "
                f"(task_config.task_name is '{task}')"
            )
        if need == "toy" and task not in ("tms", "resid_mlp"):
            raise InputError(
                f"eval_metric_configs.{m.classname} needs a toy task with one feature per input "
                f"dimension, tms or resid_mlp (task_config.task_name is '{task}')"
            )


class PooledImportanceMinimality:
    """Eval importance minimality as the reference defines it: S_c and N summed over every eval
    batch (and worker) before the loss is formed. Equal to the mean of per-batch values when
    beta = 0 and batches are equal; with beta > 0 the log term sees the pooled S_c."""

    def __init__(self, cfg: schema.ImportanceMinimalityLoss, step_frac: float) -> None:
        self.cfg = cfg
        self.p = annealed_p(
            step_frac,
            cfg.pnorm,
            cfg.p_anneal_final_p,
            cfg.p_anneal_start_frac,
            cfg.p_anneal_end_frac,
        )
        self.S: dict[str, Tensor] = {}
        self.n_positions = 0

    def update(self, ci_upper: dict[str, Tensor]) -> None:
        S, n = importance_sums(ci_upper, self.p, self.cfg.eps)
        for path, s in S.items():
            self.S[path] = self.S[path] + s if path in self.S else s
        self.n_positions += n

    def compute(self, world_size: int) -> Tensor:
        S, n = self.S, self.n_positions
        if world_size > 1:
            import torch.distributed as dist

            for s in S.values():
                dist.all_reduce(s)
            n *= world_size  # every worker evaluates batches of the same size
        return importance_minimality_from_sums(S, n, self.cfg.beta).detach().float()


def _matching(paths: list[str], patterns: list[str]) -> list[str]:
    return [p for p in paths if any(fnmatch.fnmatch(p, pat) for pat in patterns)]


@torch.no_grad()
def evaluate(
    config: schema.Config,
    model: ComponentModel,
    batches: Iterable[Tensor],
    noise: Noise,
    step: int,
    slow: bool,
    single_feature_input: Tensor | None = None,
    world_size: int = 1,
    fresh_batches: Callable[[], Iterator[Tensor]] | None = None,
) -> tuple[dict[str, Tensor], dict[str, Figure]]:
    """Every metric over `batches`; the multi-batch PGD metrics draw their batches from
    `fresh_batches()` (the same batches at every call), after `batches` is used up."""
    metrics = eval_metric_list(config)
    by_type = {type(m): m for m in metrics}
    im_cfg = by_type.get(schema.ImportanceMinimalityLoss)
    pooled_im = (
        PooledImportanceMinimality(im_cfg, step / config.steps)
        if isinstance(im_cfg, schema.ImportanceMinimalityLoss)
        else None
    )
    loss_cfgs = [m for m in metrics if m.classname in schema.LOSS_CLASSNAMES and m is not im_cfg]
    l0_cfg = by_type.get(schema.CI_L0)
    stats = CIStats(config.ci_alive_threshold, l0_cfg.groups if l0_cfg else None)  # type: ignore[union-attr]
    hist_cfg = by_type.get(schema.CIHistograms)
    hist_lower: list[dict[str, Tensor]] = []
    hist_pre: list[dict[str, Tensor]] = []
    ce_cfg, subset_cfg = (
        by_type.get(schema.CEandKLLosses),
        by_type.get(schema.StochasticReconSubsetCEAndKL),
    )
    ce_kl = CEandKL(ce_cfg.rounding_threshold) if isinstance(ce_cfg, schema.CEandKLLosses) else None
    subset_ce_kl = (
        SubsetCEandKL(subset_cfg, model.module_paths)
        if isinstance(subset_cfg, schema.StochasticReconSubsetCEAndKL)
        else None
    )

    sums: dict[str, Tensor] = {}
    n_batches = 0
    device = next(iter(model.parameters())).device
    for batch in batches:
        with autocast(config, device, evaluating=True):
            # The loss terms on the batch's nonzero rows where the model allows (as a training
            # step: `spd_ray.core.rows`); the CI statistics on every row, rebuilt from them.
            frac = step / config.steps
            inp = step_inputs(config, model, batch, noise, frac, world_size, compact=True)
            values = {f"loss/{c.classname}": loss_term(c, inp).detach().float() for c in loss_cfgs}  # type: ignore[arg-type]
            ci = whole_batch_ci(inp)
            if pooled_im is not None:
                pooled_im.update(ci.upper)
            if ce_kl is not None:
                ce_kl.update(inp)
            if subset_ce_kl is not None:
                subset_ce_kl.update(inp)
        for key, value in values.items():
            sums[key] = sums[key] + value if key in sums else value
        stats.update(ci.lower)
        limit = hist_cfg.n_batches_accum if hist_cfg else None  # type: ignore[union-attr]
        if slow and hist_cfg and (limit is None or len(hist_lower) < limit):
            hist_lower.append({k: v.detach().cpu() for k, v in ci.lower.items()})
            hist_pre.append({k: v.detach().cpu() for k, v in ci.pre_sigmoid.items()})
        n_batches += 1
    assert n_batches > 0, "evaluate needs at least one batch"
    scalars = {k: v / n_batches for k, v in sums.items()}
    if pooled_im is not None:
        scalars["loss/ImportanceMinimalityLoss"] = pooled_im.compute(world_size)
    for m in metrics:
        if isinstance(m, schema.PGDMultiBatchReconLoss | schema.PGDMultiBatchReconSubsetLoss):
            assert fresh_batches is not None, "multi-batch PGD needs fresh_batches"
            scalars[f"loss/{m.classname}"] = _multibatch_pgd(
                config, model, m, fresh_batches, noise, step, world_size, device
            )
    ci_stats = stats.compute()
    if l0_cfg is not None:
        scalars.update(ci_stats.l0)
    if ce_kl is not None:
        scalars.update({f"ce_kl/{k}": v for k, v in ce_kl.compute(world_size).items()})
    if subset_ce_kl is not None:
        scalars.update(subset_ce_kl.compute(world_size))
    figures: dict[str, Figure] = {}
    if slow:
        if hist_cfg:
            cat = lambda xs: {k: torch.cat([x[k] for x in xs]) for k in xs[0]}  # noqa: E731
            figures["ci_histograms"] = draw.ci_histograms(cat(hist_lower), "causal importances")
            figures["pre_sigmoid_histograms"] = draw.ci_histograms(cat(hist_pre), "pre-sigmoid")
        if schema.ComponentActivationDensity in by_type:
            figures["activation_density"] = draw.activation_density_hist(ci_stats.density)
        if schema.CIMeanPerComponent in by_type:
            figures["ci_mean_per_component"] = draw.ci_mean_per_component(ci_stats.mean)

    out: dict[str, Tensor] = {f"eval/{k}": v for k, v in scalars.items()}
    extra, figs = _single_feature_metrics(model, by_type, single_feature_input, slow)
    out.update({f"eval/{k}": torch.tensor(v, device=device) for k, v in extra.items()})
    figures.update(figs)
    return out, figures


def whole_batch_ci(inp: StepInputs) -> CIOutputs:
    """The causal importances of every row of the batch `inp` was made from: its own where it
    holds every row, else its kept rows' with the dropped (zero) rows' shared value put back."""
    kept = inp.kept
    if kept is None:
        return inp.ci

    def whole(d: dict[str, Tensor]) -> dict[str, Tensor]:
        return {path: kept.expand(t) for path, t in d.items()}

    return CIOutputs(
        lower=whole(inp.ci.lower), upper=whole(inp.ci.upper), pre_sigmoid=whole(inp.ci.pre_sigmoid)
    )


def _multibatch_pgd(
    config: schema.Config,
    model: ComponentModel,
    cfg: schema.PGDMultiBatchReconLoss | schema.PGDMultiBatchReconSubsetLoss,
    fresh_batches: Callable[[], Iterator[Tensor]],
    noise: Noise,
    step: int,
    world_size: int,
    device: torch.device,
) -> Tensor:
    def micro_batches() -> Iterator[StepInputs]:
        batches = fresh_batches()
        for _ in range(cfg.gradient_accumulation_steps):
            yield step_inputs(config, model, next(batches), noise, step / config.steps, world_size)

    def routes_of(inp: StepInputs) -> Routes:
        if isinstance(cfg, schema.PGDMultiBatchReconSubsetLoss):
            return subset_routes(inp, cfg.routing)
        return all_routes(inp.paths)

    with autocast(config, device, evaluating=True):
        return pgd_multibatch_recon_loss(micro_batches, cfg, routes_of, noise.pgd_init()).detach()


def _single_feature_metrics(
    model: ComponentModel,
    by_type: dict[type, schema.LossConfig | schema.EvalOnlyConfig],
    single_feature_input: Tensor | None,
    slow: bool,
) -> tuple[dict[str, float], dict[str, Figure]]:
    wanted = (schema.IdentityCIError, schema.PermutedCIPlots, schema.UVPlots)
    out: dict[str, float] = {}
    figures: dict[str, Figure] = {}
    paths = model.module_paths
    mm = by_type.get(schema.MMCSAndML2R)
    if isinstance(mm, schema.MMCSAndML2R):
        for path in _matching(paths, mm.module_patterns):
            target, comps = model.target_weight(path), model.component_weights(path)
            # mmcs/ml2r: the reference's definition (every subcomponent competes); *_filtered:
            # only subcomponents with min_norm_frac of the target column's norm compete.
            out[f"mmcs/{path}"], out[f"ml2r/{path}"] = mmcs_ml2r(target, comps, 0.0)
            filtered = mmcs_ml2r(target, comps, mm.min_norm_frac)
            out[f"mmcs_filtered/{path}"], out[f"ml2r_filtered/{path}"] = filtered
    if not any(t in by_type for t in wanted):
        return out, figures
    assert single_feature_input is not None, "check_eval_metrics admits these for toy tasks only"
    _, cache = model.clean_forward(single_feature_input)
    ci = model.ci_from_cache(cache)
    ici = by_type.get(schema.IdentityCIError)
    if isinstance(ici, schema.IdentityCIError):
        out.update(identity_ci_errors({p: v.cpu() for p, v in ci.lower.items()}, ici))
    if not slow:
        return out, figures
    plots = by_type.get(schema.PermutedCIPlots)
    if isinstance(plots, schema.PermutedCIPlots):
        for name, values, cmap in (
            ("causal_importances", ci.lower, "Blues"),
            ("causal_importances_upper_leaky", ci.upper, "Reds"),
        ):
            figures[name] = draw.permuted_ci_heatmaps(
                {p: v.cpu() for p, v in values.items()},
                plots.identity_patterns,
                plots.dense_patterns,
                cmap,
            )
    uv = by_type.get(schema.UVPlots)
    if isinstance(uv, schema.UVPlots):
        perms = permute_by_pattern(
            {p: v.cpu() for p, v in ci.upper.items()}, uv.identity_patterns, uv.dense_patterns
        )
        figures["uv_matrices"] = draw.uv_heatmaps(
            {p: model.comps(p).get_V().detach().cpu() for p in paths},
            {p: model.comps(p).get_U().detach().cpu() for p in paths},
            {p: perm for p, (_, perm) in perms.items()},
        )
    return out, figures
