"""Residual MLP toy model (compressed computation): n_features inputs embedded in a residual stream
by a fixed random W_E, MLP blocks that add to the stream, and W_E^T to read the features out.

It learns labels act(c * x) + x (or |c * x|) of sparse inputs with fewer neurons than features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm import tqdm

from spd_ray.config import ResidMLPTargetConfig
from spd_ray.data.toy import SparseFeatureDataset


def _uniform_(param: Tensor, fan_in: int, generator: torch.Generator) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from an explicit generator."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        param.uniform_(-bound, bound, generator=generator)


class ResidMLPBlock(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int):
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)


class ResidMLP(nn.Module):
    """residual = x @ W_E; per block residual += mlp_out(act(mlp_in(residual)));
    out = residual @ W_E^T.

    W_E (n_features x d_embed, unit-norm rows) and the label coefficients are buffers drawn from
    `config.seed`, so the same config always gives the same embedding and labels; the MLP weights
    are initialised from `generator` (default: a generator seeded with `config.seed`, continued).
    """

    W_E: Tensor
    label_coeffs: Tensor

    def __init__(self, config: ResidMLPTargetConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.n_features = config.n_features
        fixed = torch.Generator().manual_seed(config.seed)
        w_e = torch.randn(config.n_features, config.d_embed, generator=fixed)
        self.register_buffer("W_E", w_e / w_e.norm(dim=1, keepdim=True))
        if config.use_trivial_label_coeffs:
            coeffs = torch.ones(config.n_features)
        else:
            coeffs = 1.0 + torch.rand(config.n_features, generator=fixed)
        self.register_buffer("label_coeffs", coeffs)

        self.layers = nn.ModuleList(
            [ResidMLPBlock(config.d_embed, config.d_mlp) for _ in range(config.n_layers)]
        )
        gen = generator if generator is not None else fixed
        for block in self.blocks:
            _uniform_(block.mlp_in.weight, config.d_embed, gen)
            _uniform_(block.mlp_out.weight, config.d_mlp, gen)

    @property
    def blocks(self) -> list[ResidMLPBlock]:
        return [b for b in self.layers if isinstance(b, ResidMLPBlock)]

    def act(self, x: Tensor) -> Tensor:
        return F.relu(x) if self.config.act_fn_name == "relu" else F.gelu(x)

    def forward(self, x: Float[Tensor, "... n_features"]) -> Float[Tensor, "... n_features"]:
        residual = x @ self.W_E
        for block in self.blocks:
            residual = residual + block.mlp_out(self.act(block.mlp_in(residual)))
        return residual @ self.W_E.T

    def labels(self, x: Float[Tensor, "... n_features"]) -> Float[Tensor, "... n_features"]:
        """act(c * x) + x for label_type act_plus_resid, |c * x| for abs."""
        cx = self.label_coeffs * x
        if self.config.label_type == "act_plus_resid":
            return self.act(cx) + x
        return cx.abs()


def low_rank_forward(
    model: ResidMLP, x: Float[Tensor, "batch n_features"]
) -> Float[Tensor, "batch n_features"]:
    """`model(x)` without materialising the d_embed-wide residual stream; used for training.

    The residual is a sum of narrow reads times fixed writes: x @ W_E plus, per block, h @ W_out^T.
    Contracting the (small) weight products first, e.g. x @ (W_E @ W_in^T) instead of
    (x @ W_E) @ W_in^T, gives the same function and gradients at a fraction of the FLOPs when
    d_embed is much larger than n_features and d_mlp (1000 vs 100 and 50 for ResidMLP 1).
    """
    reads: list[Tensor] = [x]
    writes: list[Tensor] = [model.W_E]  # residual = sum_i reads[i] @ writes[i]

    def residual_times(m: Tensor) -> Tensor:
        terms = [r @ (w @ m) for r, w in zip(reads, writes, strict=True)]
        return sum(terms[1:], terms[0])

    for block in model.blocks:
        reads.append(model.act(residual_times(block.mlp_in.weight.T)))
        writes.append(block.mlp_out.weight.T)
    return residual_times(model.W_E.T)


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Cosine decay from `peak` at step 0 to 0 at step `total`."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_resid_mlp(cfg: ResidMLPTargetConfig, progress: bool = False) -> ResidMLP:
    """Train the MLP weights (W_E stays fixed) on loss mean((out - labels)^2): AdamW with cosine
    decay to 0 over `steps`, features active w.p. feature_probability with values U[-1, 1]."""
    gen = torch.Generator().manual_seed(cfg.seed)
    model = ResidMLP(cfg, generator=gen)
    data = SparseFeatureDataset(
        cfg.n_features, cfg.feature_probability, "at_least_zero_active", value_range=(-1.0, 1.0)
    )
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    bar = tqdm(range(cfg.steps), desc="resid_mlp", disable=not progress)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.steps, cfg.lr)
        x = data.generate_batch(cfg.batch_size, gen)
        loss = F.mse_loss(low_rank_forward(model, x), model.labels(x))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    bar.close()
    return model.eval()
