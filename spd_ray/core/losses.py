"""Every SPD loss term as a function of one step's inputs.

All reconstruction terms compare the model's output under some masks with the unmasked target output
on the same batch (not dataset labels): `mse` is the mean squared error over all output elements,
`kl` the mean over positions of KL(softmax(target) || softmax(pred)). Terms that need several masked
forwards (samples, one module at a time) stack them into one forward of K copies of the batch; since
every copy has the same size, the mean over the stacked output is the mean over copies.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor

from spd_ray import config as schema
from spd_ray.core.masks import (
    Routes,
    all_routes,
    delta_mask,
    single_module_routes,
    static_probability_routes,
    stochastic_mask,
    uniform_k_subset_routes,
)
from spd_ray.core.model import ComponentModel, ModuleMask
from spd_ray.core.pgd import pgd_recon_loss
from spd_ray.core.recon import StepInputs, masked_recon
from spd_ray.core.rows import KeptRows
from spd_ray.core.schedule import annealed_p

# -- faithfulness and minimality -------------------------------------------------------------


def faithfulness_loss(model: ComponentModel) -> Tensor:
    """Mean squared entry of W - (VU)^T over all decomposed matrices."""
    device = next(iter(model.components.parameters())).device
    with torch.autocast(device.type, enabled=False):  # W - VU^T is tiny: keep it exact
        deltas = model.weight_deltas()
    total = sum((d**2).sum() for d in deltas.values())
    n = sum(d.numel() for d in deltas.values())
    return total / n  # type: ignore[return-value]


class _AllReduceSum(torch.autograd.Function):
    """Sum over data-parallel workers, differentiably: every worker's output is the global sum, so
    the backward sums the incoming gradients over workers too."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor) -> Tensor:  # type: ignore[override]
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: Tensor) -> Tensor:
    return _AllReduceSum.apply(x)  # type: ignore[no-any-return]


def importance_minimality_loss(
    ci_upper: dict[str, Tensor],
    pnorm: float | Tensor,
    beta: float,
    eps: float,
    world_size: int = 1,
    kept: KeptRows | None = None,
) -> Tensor:
    """sum_layers sum_c [m_c + beta m_c log2(1 + S_c)], S_c = sum over positions of (g_c + eps)^p,
    m_c = S_c / N with N the number of positions.

    Across data-parallel workers S_c and N are summed over all workers (S_c with a differentiable
    all-reduce), so the loss and, after gradient averaging, its gradient equal a 1-worker run on the
    global batch exactly (the reference approximates the global S_c by local S_c * world_size).
    `kept`: the CI is of a compacted batch's rows; S_c and N are the whole batch's.
    """
    S, n_positions = importance_sums(ci_upper, pnorm, eps, kept)
    if world_size > 1:
        S = {path: all_reduce_sum(s) for path, s in S.items()}
    # Each worker's gradient gets a factor world_size from the all-reduce backward; averaging the
    # gradients over workers removes it again.
    return importance_minimality_from_sums(S, n_positions * world_size, beta)


def importance_sums(
    ci_upper: dict[str, Tensor], pnorm: float | Tensor, eps: float, kept: KeptRows | None = None
) -> tuple[dict[str, Tensor], int]:
    """Per layer S_c = sum over positions of (g_c + eps)^p (fp32), and N, the number of
    positions (the first layer's); with `kept`, of the whole batch the kept rows come from."""
    first = next(iter(ci_upper.values()))
    n_positions = first.numel() // first.shape[-1]
    terms = {path: ((g.float() + eps) ** pnorm).flatten(0, -2) for path, g in ci_upper.items()}
    if kept is None:
        return {path: t.sum(0) for path, t in terms.items()}, n_positions
    return {path: kept.batch_sum(t) for path, t in terms.items()}, kept.n_rows


def importance_minimality_from_sums(S: dict[str, Tensor], n_positions: int, beta: float) -> Tensor:
    """sum_layers sum_c [m_c + beta m_c log2(1 + S_c)] with m_c = S_c / N."""
    total: Tensor | float = 0.0
    for s in S.values():
        m = s / n_positions
        layer = m.sum()
        if beta:
            layer = layer + beta * (m * torch.log2(1 + s)).sum()
        total = total + layer
    return total  # type: ignore[return-value]


# -- masked reconstructions ------------------------------------------------------------------


def _module_mask(
    inp: StepInputs, path: str, ci: Tensor, stochastic: bool, route: Tensor | None
) -> ModuleMask:
    if stochastic:
        mask = stochastic_mask(ci, inp.sampling, inp.noise)
        delta = delta_mask(tuple(ci.shape[:-1]), ci, inp.noise) if inp.use_delta_component else None
    else:
        mask, delta = ci, None
    return ModuleMask(mask=mask, delta=delta, route=route)


def _copy(
    inp: StepInputs, routes: Routes, stochastic: bool, ci: dict[str, Tensor]
) -> dict[str, ModuleMask]:
    return {p: _module_mask(inp, p, ci[p], stochastic, r) for p, r in routes.items()}


def subset_routes(inp: StepInputs, routing: schema.SubsetRoutingConfig) -> Routes:
    device = inp.target_out.device
    match routing:
        case schema.UniformKSubsetRouting():
            return uniform_k_subset_routes(inp.paths, inp.batch_shape, device, inp.noise)  # type: ignore[return-value]
        case schema.StaticProbabilityRouting(p=p):
            return static_probability_routes(inp.paths, inp.batch_shape, p, device, inp.noise)  # type: ignore[return-value]


def unmasked_recon_loss(inp: StepInputs) -> Tensor:
    ones = {p: torch.ones_like(c) for p, c in inp.ci.lower.items()}
    return masked_recon(inp, [_copy(inp, all_routes(inp.paths), False, ones)])


def ci_masked_recon_loss(inp: StepInputs, routes_per_copy: list[Routes]) -> Tensor:
    return masked_recon(inp, [_copy(inp, r, False, inp.ci.lower) for r in routes_per_copy])


def stochastic_recon_loss(inp: StepInputs, routes_per_copy: list[Routes]) -> Tensor:
    return masked_recon(inp, [_copy(inp, r, True, inp.ci.lower) for r in routes_per_copy])


def stochastic_hidden_acts_recon_loss(inp: StepInputs) -> Tensor:
    """Squared distance of every decomposed module's input under stochastic masks from its clean
    input, summed over modules and divided by the total element count."""
    copies = [
        _copy(inp, all_routes(inp.paths), True, inp.ci.lower) for _ in range(inp.n_mask_samples)
    ]
    recorded: dict[str, Tensor] = {}
    inp.model.masked_forward(inp.batch, copies, inp.cache, record_inputs=recorded)
    total: Tensor | float = 0.0
    n = 0
    for path in inp.paths:
        clean = inp.cache.inputs[path]
        got = recorded[path].reshape(len(copies), *clean.shape)
        total = total + ((got.float() - clean.float()) ** 2).sum()
        n += got.numel()
    return total / n  # type: ignore[return-value]


# -- dispatch --------------------------------------------------------------------------------


def _layerwise(inp: StepInputs, repeats: int) -> list[Routes]:
    return [single_module_routes(p) for _ in range(repeats) for p in inp.paths]


def _samples(inp: StepInputs, make: Callable[[], Routes]) -> list[Routes]:
    return [make() for _ in range(inp.n_mask_samples)]


def loss_term(cfg: schema.LossConfig | schema.EvalOnlyConfig, inp: StepInputs) -> Tensor:
    """The value of one loss/metric config on this step's inputs (of the whole batch when the
    step runs on its nonzero rows: `spd_ray.core.rows`)."""
    value = _loss_term(cfg, inp)
    if inp.kept is None or isinstance(
        cfg, schema.FaithfulnessLoss | schema.ImportanceMinimalityLoss
    ):
        return value
    # A reconstruction term: a mean over the kept rows, 0 on every dropped row.
    return value * inp.kept.scale


def _loss_term(cfg: schema.LossConfig | schema.EvalOnlyConfig, inp: StepInputs) -> Tensor:
    every = lambda: all_routes(inp.paths)  # noqa: E731
    match cfg:
        case schema.FaithfulnessLoss():
            return faithfulness_loss(inp.model)
        case schema.ImportanceMinimalityLoss():
            p = annealed_p(
                inp.step_frac,
                cfg.pnorm,
                cfg.p_anneal_final_p,
                cfg.p_anneal_start_frac,
                cfg.p_anneal_end_frac,
            )
            return importance_minimality_loss(
                inp.ci.upper, p, cfg.beta, cfg.eps, inp.world_size, inp.kept
            )
        case schema.UnmaskedReconLoss():
            return unmasked_recon_loss(inp)
        case schema.CIMaskedReconLoss():
            return ci_masked_recon_loss(inp, [every()])
        case schema.CIMaskedReconLayerwiseLoss():
            return ci_masked_recon_loss(inp, _layerwise(inp, 1))
        case schema.CIMaskedReconSubsetLoss():
            return ci_masked_recon_loss(inp, [subset_routes(inp, cfg.routing)])
        case schema.StochasticReconLoss():
            return stochastic_recon_loss(inp, _samples(inp, every))
        case schema.StochasticReconLayerwiseLoss():
            return stochastic_recon_loss(inp, _layerwise(inp, inp.n_mask_samples))
        case schema.StochasticReconSubsetLoss():
            routing = cfg.routing
            return stochastic_recon_loss(inp, _samples(inp, lambda: subset_routes(inp, routing)))
        case schema.StochasticHiddenActsReconLoss():
            return stochastic_hidden_acts_recon_loss(inp)
        case schema.PGDReconLoss():
            return pgd_recon_loss(inp, cfg, [every()])
        case schema.PGDReconLayerwiseLoss():
            return pgd_recon_loss(inp, cfg, _layerwise(inp, 1))
        case schema.PGDReconSubsetLoss():
            return pgd_recon_loss(inp, cfg, [subset_routes(inp, cfg.routing)])
    raise TypeError(f"{type(cfg).__name__} is not a loss")


def total_loss(cfgs: list[schema.LossConfig], inp: StepInputs) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_i coeff_i * loss_i in config order, and each raw term under `loss/<ClassName>`."""
    terms: dict[str, Tensor] = {}
    total: Tensor | float = 0.0
    for cfg in cfgs:
        value = loss_term(cfg, inp)
        terms[f"loss/{cfg.classname}"] = value
        assert cfg.coeff is not None
        total = total + cfg.coeff * value
    assert isinstance(total, Tensor)
    return total, terms


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
