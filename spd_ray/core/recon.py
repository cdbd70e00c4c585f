"""One step's inputs and the reconstruction distance every loss term is built on.

`mse` is the mean squared error over all output elements, `kl` the mean over positions of
KL(softmax(target) || softmax(pred)); `pred` may hold K stacked copies of the batch, and since every
copy has the same size the mean over the stacked output is the mean over copies.

With `copies_per_forward` set, `masked_recon` runs the copies in chunks of at most that many, each
chunk's forward and loss under activation checkpointing: only one chunk's activations are alive at a
time (the rest are recomputed in backward), so the memory of a layerwise loss no longer grows with
the number of decomposed modules. Masks are drawn before, so recomputation sees the same masks.
With `forward_budget_bytes`, the chunk size follows from a memory budget instead:
budget // the bytes autograd keeps for backward per masked copy, measured (`copy_bytes`) once per
model and kind of copy by running the costliest copy alone and stacked with the next costliest: the
difference is what one more copy adds (its activations at this depth, batch and dtype), whatever
the model keeps anyway. Backward's transients (activation gradients, the loss's fp32
temporaries) come on top, in about the same proportion at any depth.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from spd_ray.config import OutputLossType, Sampling
from spd_ray.core.masks import Noise
from spd_ray.core.model import CIOutputs, CleanCache, ComponentModel, ModuleMask
from spd_ray.core.rows import KeptRows


@dataclass
class StepInputs:
    """What one step's loss terms see. `cache` and `target_out` come from the clean forward."""

    model: ComponentModel
    batch: Tensor
    target_out: Tensor
    cache: CleanCache
    ci: CIOutputs
    output_loss_type: OutputLossType
    use_delta_component: bool
    sampling: Sampling
    n_mask_samples: int
    noise: Noise
    step_frac: float | Tensor = 0.0  # a 0-d tensor in the compiled step
    world_size: int = 1
    copies_per_forward: int | None = None  # None: every masked copy in one forward
    forward_budget_bytes: int | None = None  # chunk so a forward's activations fit this
    # A training step on the nonzero rows of the batch (`spd_ray.core.rows`): every tensor above
    # holds the kept rows, and the loss terms put the dropped ones back. None: every row.
    kept: KeptRows | None = None

    @property
    def paths(self) -> list[str]:
        return self.model.module_paths

    @property
    def batch_shape(self) -> tuple[int, ...]:
        return tuple(self.ci.lower[self.paths[0]].shape[:-1])


def recon_loss(pred: Tensor, target: Tensor, kind: OutputLossType) -> Tensor:
    """Mean reconstruction error of `pred` ([K * batch, ...] stacked copies allowed) vs `target`."""
    if pred.shape != target.shape:
        pred = pred.reshape(-1, *target.shape)
    pred, target = pred.float(), target.float()
    match kind:
        case "mse":
            return ((pred - target) ** 2).mean()
        case "kl":
            logp = F.log_softmax(pred.float(), dim=-1)
            logq = F.log_softmax(target.float(), dim=-1)
            return (logq.exp() * (logq - logp)).sum(-1).mean()


def recon_count(inp: StepInputs) -> int:
    """How many values `recon_loss` averages for one copy of this batch: every output element
    (mse), every position (kl)."""
    out = inp.target_out
    return out.numel() if inp.output_loss_type == "mse" else out[..., 0].numel()


# Measured bytes per copy: {model: {(batch shape, dtype, device, autocast, masked paths, delta,
# route): bytes}}. Weakly keyed, so a model's measurements go with it.
_COPY_BYTES: weakref.WeakKeyDictionary[ComponentModel, dict[tuple[object, ...], int]] = (
    weakref.WeakKeyDictionary()
)


def costliest_copies(
    inp: StepInputs, copies: list[dict[str, ModuleMask]]
) -> list[dict[str, ModuleMask]]:
    """`copies` from the one that leaves the clean activations earliest (the clean cache holds
    the modules in forward order), so recomputes and keeps the most; ties go to the copy masking
    more modules. Once one copy of a stacked forward leaves them, the whole stack is kept, so a
    chunk costs about its size times its costliest copy."""
    order = {path: i for i, path in enumerate(inp.cache.inputs)}
    return sorted(
        copies, key=lambda c: (min(order[p] for p in c), -len(c)) if c else (len(order), 0)
    )


def _compute_acts(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> None:
    """The cache computes component acts lazily; computed inside a checkpointed chunk (or a
    measurement), they would be missing from its recomputation (and belong to one chunk's graph
    only, or count as one copy's)."""
    if inp.model.reuse_clean_activations:
        for path in dict.fromkeys(p for copy in copies for p in copy):
            inp.cache.acts(path)


def _saved_bytes(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> int:
    """Bytes of the distinct storages autograd saves for backward over one `stacked_recon`."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t  # kept alive until the count ends, so no freed pointer is reused in between

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = stacked_recon(inp, copies)
    del loss
    return sum(storages.values())


def copy_bytes(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> int:
    """What one more copy adds to the bytes a stacked forward of `copies` keeps for backward:
    saved bytes of the two costliest copies stacked (the costliest twice if only one) minus of the
    costliest alone; parameters and the clean cache, kept whatever the chunk, cancel out. Measured
    on the first call for this model, batch shape, dtype, autocast state and pair of copies' masked
    paths, then cached."""
    pair = costliest_copies(inp, copies)[:2]
    pair = pair if len(pair) == 2 else [pair[0], pair[0]]
    device = inp.batch.device.type
    key = (
        tuple(inp.batch.shape),
        inp.target_out.dtype,
        device,
        torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None,
        *(tuple(copy) for copy in pair),
        any(m.delta is not None for copy in pair for m in copy.values()),
        any(m.route is not None for copy in pair for m in copy.values()),
    )
    cached = _COPY_BYTES.setdefault(inp.model, {})
    if key not in cached:
        _compute_acts(inp, pair)
        one = _saved_bytes(inp, pair[:1])
        two = _saved_bytes(inp, pair)
        assert two > one, (
            f"a masked copy keeps nothing for backward ({two} <= {one} bytes: no parameter or mask "
            "requires grad), so masked_forward_budget_mb cannot size chunks; use "
            "masked_copies_per_forward"
        )
        cached[key] = two - one
    return cached[key]


def measured_copy_bytes(model: ComponentModel) -> list[int]:
    """Every per-copy measurement `copy_bytes` made for `model`, in order."""
    return list(_COPY_BYTES.get(model, {}).values())


def chunk_size(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> int | None:
    """Copies per forward: the config's, the budget's (budget // `copy_bytes`, at least 1), the
    smaller of both, or None (all)."""
    n = inp.copies_per_forward
    if inp.forward_budget_bytes is not None and len(copies) > 1:
        per_copy = copy_bytes(inp, copies)
        by_budget = max(1, inp.forward_budget_bytes // per_copy)
        n = by_budget if n is None else min(n, by_budget)
    return n


def masked_recon(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> Tensor:
    """Mean `recon_loss` over all copies, in chunks of `chunk_size(inp, copies)` copies."""
    if inp.copies_per_forward is not None or inp.forward_budget_bytes is not None:
        _compute_acts(inp, copies)
    n = chunk_size(inp, copies)
    assert n is None or n >= 1, f"copies_per_forward must be >= 1, got {n}"
    if n is None or n >= len(copies):
        return stacked_recon(inp, copies)
    total: Tensor | float = 0.0
    for start in range(0, len(copies), n):
        chunk = copies[start : start + n]
        if torch.is_grad_enabled():
            loss = checkpoint(stacked_recon, inp, chunk, use_reentrant=False)
        else:
            loss = stacked_recon(inp, chunk)
        # recon_loss is a mean over copies of equal size: each chunk weighs by its share.
        total = total + loss * (len(chunk) / len(copies))
    assert isinstance(total, Tensor)
    return total


def stacked_recon(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> Tensor:
    """Mean `recon_loss` over `copies`, all in one forward."""
    out = inp.model.masked_forward(inp.batch, copies, inp.cache)
    return recon_loss(out, inp.target_out, inp.output_loss_type)
