"""Adversarial mask search: masks ci + (1 - ci) * s with sources s chosen to maximise the recon
loss.

The sources start random / ones / zeroes and take `n_steps` signed-gradient ascent steps, clamped to
[0, 1]; only the sources are differentiated in the inner steps (CI and component acts are detached).
The last source column is the weight-delta mask when the delta component is used. The final forward
is differentiable with respect to the components and CI functions. Random initial sources come from
the noise's PGD-init stream (`Noise.pgd_init`), not from the mask noise.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import torch
import torch.distributed as dist
from torch import Tensor

from spd_ray import config as schema
from spd_ray.core.masks import Noise, Routes
from spd_ray.core.model import CleanCache, ModuleMask
from spd_ray.core.recon import StepInputs, chunk_size, masked_recon, recon_count, stacked_recon


def _init_source(
    shape: tuple[int, ...], init: str, device: torch.device, noise: Noise, shared: bool
) -> Tensor:
    """A source in fp32 whatever the CI's dtype (bf16 under autocast): the signed-gradient steps
    of size step_size would round away in bf16 (the reference keeps its sources in fp32)."""
    match init:
        case "random":
            draw = noise.rand_unbatched if shared else noise.rand
            src = draw(shape, device, torch.float32)
        case "ones":
            src = torch.ones(shape, device=device, dtype=torch.float32)
        case _:
            src = torch.zeros(shape, device=device, dtype=torch.float32)
    return src


# The ascent differentiates its sources offset by a zero leaf of their device, so that they require
# grad without `requires_grad_`: in a `torch.compile`d step, a tensor that had `requires_grad_`
# called may not reach the graph's outputs, and the stepped sources do. One leaf per device, made by
# the first (eager) step, so the compiled step neither creates nor copies one. Gradients are only
# ever taken with respect to the offset sources (`autograd.grad`), never accumulated here.
_ANCHORS: dict[torch.device, Tensor] = {}


def _ascent_leaf(src: Tensor) -> Tensor:
    anchor = _ANCHORS.get(src.device)
    if anchor is None:
        anchor = _ANCHORS[src.device] = torch.zeros((), device=src.device, requires_grad=True)
    return src.detach() + anchor


def _signed_step(src: Tensor, grad: Tensor, cfg: schema._PGD, shared: bool) -> Tensor:
    if shared and _distributed():
        dist.all_reduce(grad, op=dist.ReduceOp.AVG)
    return (src + cfg.step_size * grad.sign()).clamp(0.0, 1.0)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def pgd_recon_loss(inp: StepInputs, cfg: schema._PGD, routes_per_copy: list[Routes]) -> Tensor:
    delta = inp.use_delta_component
    shared = cfg.mask_scope == "shared_across_batch"
    sources: list[dict[str, Tensor]] = []
    for routes in routes_per_copy:
        copy_src = {}
        for path in routes:
            ci = inp.ci.lower[path]
            n = ci.shape[-1] + (1 if delta else 0)
            shape = (*([1] * (ci.dim() - 1)), n) if shared else (*ci.shape[:-1], n)
            src = _init_source(shape, cfg.init, ci.device, inp.noise.pgd_init(), shared)
            if shared and _distributed():
                dist.broadcast(src, src=0)
            copy_src[path] = src
        sources.append(copy_src)

    def copies(srcs: list[dict[str, Tensor]], detached: bool) -> list[dict[str, ModuleMask]]:
        out = []
        for routes, copy_src in zip(routes_per_copy, srcs, strict=True):
            masks = {}
            for path, route in routes.items():
                ci = inp.ci.lower[path]
                if detached:
                    ci = ci.detach()
                src = copy_src[path]
                comp = src[..., : ci.shape[-1]]
                d = src[..., -1].expand(ci.shape[:-1]) if delta else None
                masks[path] = ModuleMask(mask=ci + (1 - ci) * comp, delta=d, route=route)
            out.append(masks)
        return out

    detached = _detached_cache_inputs(inp)  # the same for every ascent step
    for _ in range(cfg.n_steps):
        with torch.enable_grad():
            leaves = [{p: _ascent_leaf(s) for p, s in c.items()} for c in sources]
            grads = iter(_ascent_grads(detached, copies(leaves, detached=True), leaves))
        with torch.no_grad():
            sources = [
                {p: _signed_step(s, next(grads), cfg, shared) for p, s in c.items()}
                for c in sources
            ]
    return masked_recon(inp, copies(sources, detached=False))


def _ascent_grads(
    inp: StepInputs, masks: list[dict[str, ModuleMask]], sources: list[dict[str, Tensor]]
) -> list[Tensor]:
    """The loss's gradient with respect to every source, copy by copy in order. In chunks of
    `copies_per_forward` copies, each chunk's graph is freed before the next is built: a copy's
    sources move only its own output, so no chunk needs another's graph (nor a recomputation).
    `retain_graph`: nodes this graph may share with the step's (autocast's cached weight casts)
    stay for the step's backward - which `torch.compile` requires to trace the call; the graph
    itself is freed with `loss` all the same."""
    n = chunk_size(inp, masks)
    if n is None or n >= len(masks):
        flat = [s for copy_src in sources for s in copy_src.values()]
        return list(torch.autograd.grad(masked_recon(inp, masks), flat, retain_graph=True))
    grads: list[Tensor] = []
    for start in range(0, len(masks), n):
        chunk = masks[start : start + n]
        flat = [s for copy_src in sources[start : start + n] for s in copy_src.values()]
        loss = stacked_recon(inp, chunk) * (len(chunk) / len(masks))
        grads.extend(torch.autograd.grad(loss, flat, retain_graph=True))
    return grads


def _shared_masks(
    inp: StepInputs, routes: Routes, sources: dict[str, Tensor], detached: bool
) -> dict[str, ModuleMask]:
    masks = {}
    for path, route in routes.items():
        ci = inp.ci.lower[path].detach() if detached else inp.ci.lower[path]
        src = sources[path]
        d = src[..., -1].expand(ci.shape[:-1]) if inp.use_delta_component else None
        masks[path] = ModuleMask(
            mask=ci + (1 - ci) * src[..., : ci.shape[-1]], delta=d, route=route
        )
    return masks


def pgd_multibatch_recon_loss(
    micro_batches: Callable[[], Iterator[StepInputs]],
    cfg: schema._PGDMultiBatch,
    routes_of: Callable[[StepInputs], Routes],
    noise: Noise,
) -> Tensor:
    """PGD over several batches with one source per module shared by all of them (eval only).

    `micro_batches()` yields the same batches' inputs (target forward and CI) at every call; each
    ascent step sums the loss gradients over all of them (averaged over workers) before one signed
    step, so the sources are the worst case for the whole set, not for one batch. Returns the summed
    loss over the summed number of averaged elements of a last pass. Routes are drawn afresh for
    every batch of every pass, as a new batch of training would.
    """
    sources: dict[str, Tensor] = {}

    def ensure(inp: StepInputs) -> list[Tensor]:
        if not sources:
            for path in inp.paths:
                ci = inp.ci.lower[path]
                n = ci.shape[-1] + (1 if inp.use_delta_component else 0)
                src = _init_source((*([1] * (ci.dim() - 1)), n), cfg.init, ci.device, noise, True)
                if _distributed():
                    dist.broadcast(src, src=0)
                sources[path] = src
        return list(sources.values())

    for _ in range(cfg.n_steps):
        grads: list[Tensor] | None = None
        for inp in micro_batches():
            flat = ensure(inp)
            for src in flat:
                src.requires_grad_(True)
            with torch.enable_grad():
                detached = _detached_cache_inputs(inp)
                mean = masked_recon(
                    detached, [_shared_masks(detached, routes_of(inp), sources, True)]
                )
                loss_sum = mean * recon_count(inp)
                got = torch.autograd.grad(loss_sum, flat, allow_unused=True)
            for src in flat:
                src.requires_grad_(False)
            # A module the routes left out this batch has no gradient: zero.
            step = [torch.zeros_like(s) if g is None else g for s, g in zip(flat, got, strict=True)]
            grads = step if grads is None else [a + b for a, b in zip(grads, step, strict=True)]
        assert grads is not None, "pgd_multibatch_recon_loss needs at least one batch"
        with torch.no_grad():
            for src, g in zip(sources.values(), grads, strict=True):
                if _distributed():
                    dist.all_reduce(g, op=dist.ReduceOp.AVG)
                src.add_(cfg.step_size * g.sign()).clamp_(0.0, 1.0)
    total = torch.zeros((), dtype=torch.float64)
    count = torch.zeros((), dtype=torch.float64)
    for inp in micro_batches():
        ensure(inp)
        mean = masked_recon(inp, [_shared_masks(inp, routes_of(inp), sources, False)])
        n = recon_count(inp)
        total = total.to(mean.device) + mean.double() * n
        count = count.to(mean.device) + n
    if _distributed():
        dist.all_reduce(total)
        dist.all_reduce(count)
    return (total / count).float()


def _detached_cache_inputs(inp: StepInputs) -> StepInputs:
    """The same inputs, whose cached component acts are detached so inner steps build no graph
    through the components."""
    cache = CleanCache(inputs=inp.cache.inputs, outputs=inp.cache.outputs, prefix=inp.cache.prefix)
    for path in inp.paths:
        cache._acts[path] = inp.cache.acts(path).detach()
    return replace(inp, cache=cache)
