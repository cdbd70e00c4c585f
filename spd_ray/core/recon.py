"""One step's inputs and the reconstruction distance every loss term is built on.

`mse` is the mean squared error over all output elements, `kl` the mean over positions of
KL(softmax(target) || softmax(pred)); `pred` may hold K stacked copies of the batch, and since every
copy has the same size the mean over the stacked output is the mean over copies.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

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


def masked_recon(inp: StepInputs, copies: list[dict[str, ModuleMask]]) -> Tensor:
    out = inp.model.masked_forward(inp.batch, copies, inp.cache)
    return recon_loss(out, inp.target_out, inp.output_loss_type)
