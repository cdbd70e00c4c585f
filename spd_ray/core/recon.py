"""One step's inputs and the reconstruction distance every loss term is built on.

`mse` is the mean squared error over all output elements, `kl` the mean over positions of
KL(softmax(target) || softmax(pred)); `pred` may hold K stacked copies of the batch, and since every
copy has the same size the mean over the stacked output is the mean over copies.

With `copies_per_forward` set, `masked_recon` runs the copies in chunks of at most that many, each
chunk's forward and loss under activation checkpointing: only one chunk's activations are alive at a
time (the rest are recomputed in backward), so the memory of a layerwise loss no longer grows with
the number of decomposed modules. Masks are drawn before, so recomputation sees the same masks.
With `forward_budget_bytes`, the chunk size follows from a memory budget instead:
budget // (ACTIVATION_FACTOR x the bytes of the clean forward's module inputs and outputs), an
estimate of one copy's activations that grows with depth as the true cost does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from spd_ray.config import OutputLossType, Sampling
from spd_ray.core.masks import Noise
from spd_ray.core.model import CIOutputs, CleanCache, ComponentModel, ModuleMask


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
    step_frac: float = 0.0
    world_size: int = 1
    copies_per_forward: int | None = None  # None: every masked copy in one forward
    forward_budget_bytes: int | None = None  # chunk so a forward's activations fit this

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


# One masked copy keeps about this many times its decomposed modules' inputs and outputs alive for
# backward (the components' inner acts, masks, attention and MLP intermediates).
ACTIVATION_FACTOR = 4


def copy_bytes(inp: StepInputs) -> int:
    """An estimate of one masked copy's activation memory, from the clean forward's cache."""
    tensors = [*inp.cache.inputs.values(), *inp.cache.outputs.values()]
    return ACTIVATION_FACTOR * sum(t.numel() * t.element_size() for t in tensors)


def chunk_size(inp: StepInputs) -> int | None:
    """Copies per forward: the config's, the budget's, the smaller of both, or None (all)."""
    n = inp.copies_per_forward
    if inp.forward_budget_bytes is not None:
        by_budget = max(1, inp.forward_budget_bytes // max(1, copy_bytes(inp)))
        n = by_budget if n is None else min(n, by_budget)
    return n


def masked_recon(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> Tensor:
    """Mean `recon_loss` over all copies, in chunks of `chunk_size(inp)` copies."""
    n = chunk_size(inp)
    assert n is None or n >= 1, f"copies_per_forward must be >= 1, got {n}"
    if n is None or n >= len(copies):
        return stacked_recon(inp, copies)
    if inp.model.reuse_clean_activations:
        # The cache computes component acts lazily; computed inside a checkpointed chunk, they
        # would be missing from its recomputation (and belong to one chunk's graph only).
        for path in dict.fromkeys(p for copy in copies for p in copy):
            inp.cache.acts(path)
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
