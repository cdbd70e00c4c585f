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
from spd_ray.core.lowrank import LowRank, Term, linear_dense, linear_low_rank
from spd_ray.data.toy import SparseFeatureDataset


def _uniform_(param: Tensor, fan_in: int, generator: torch.Generator) -> None:
    """nn.Linear's default init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), from an explicit generator."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        param.uniform_(-bound, bound, generator=generator)


class ResidMLPBlock(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int, in_bias: bool = False, out_bias: bool = False):
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=in_bias)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=out_bias)


class ResidMLP(nn.Module):
    """residual = x @ W_E; per block residual += mlp_out(act(mlp_in(residual)));
    out = residual @ W_E^T.

    W_E (n_features x d_embed, unit-norm rows) and the label coefficients are buffers drawn from
    `config.seed` (the coefficients from `label_fn_seed` when set), so the same config always gives
    the same embedding and labels; the MLP weights (and biases, with `in_bias` / `out_bias`, zero
    at init) are initialised from `generator` (default: a generator seeded with `config.seed`,
    continued). `embedding: identity` makes W_E the identity; `trainable` makes it a parameter
    (random unit rows at init) trained with the MLPs.
    """

    W_E: Tensor
    label_coeffs: Tensor
    # Each output row depends on its own input row alone (`spd_ray.core.rows`).
    rows_independent = True

    def __init__(self, config: ResidMLPTargetConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.n_features = config.n_features
        fixed = torch.Generator().manual_seed(config.seed)
        w_e = torch.randn(config.n_features, config.d_embed, generator=fixed)
        w_e = w_e / w_e.norm(dim=1, keepdim=True)
        if config.embedding == "identity":
            w_e = torch.eye(config.n_features)
        if config.embedding == "trainable":
            self.W_E = nn.Parameter(w_e)
        else:
            self.register_buffer("W_E", w_e)
        label_gen = fixed
        if config.label_fn_seed is not None:
            label_gen = torch.Generator().manual_seed(config.label_fn_seed)
        if config.use_trivial_label_coeffs:
            coeffs = torch.ones(config.n_features)
        else:
            coeffs = 1.0 + torch.rand(config.n_features, generator=label_gen)
        self.register_buffer("label_coeffs", coeffs)

        self.layers = nn.ModuleList(
            [
                ResidMLPBlock(config.d_embed, config.d_mlp, config.in_bias, config.out_bias)
                for _ in range(config.n_layers)
            ]
        )
        gen = generator if generator is not None else fixed
        for block in self.blocks:
            _uniform_(block.mlp_in.weight, config.d_embed, gen)
            _uniform_(block.mlp_out.weight, config.d_mlp, gen)
            for linear in (block.mlp_in, block.mlp_out):
                if linear.bias is not None:
                    nn.init.zeros_(linear.bias)

    @property
    def blocks(self) -> list[ResidMLPBlock]:
        return [b for b in self.layers if isinstance(b, ResidMLPBlock)]

    def act(self, x: Tensor) -> Tensor:
        return F.relu(x) if self.config.act_fn_name == "relu" else F.gelu(x)

    def residual(self, x: Float[Tensor, "... n_features"]) -> Float[Tensor, "... d_embed"]:
        """The residual stream after the last block."""
        return self._blocks(self.forward_prefix(x))

    def _blocks(self, residual: Float[Tensor, "... d_embed"]) -> Float[Tensor, "... d_embed"]:
        for block in self.blocks:
            residual = residual + block.mlp_out(self.act(block.mlp_in(residual)))
        return residual

    def forward(self, x: Float[Tensor, "... n_features"]) -> Float[Tensor, "... n_features"]:
        return self.forward_from_prefix(self.forward_prefix(x))

    # The forward in two parts, the first before any module a decomposition can replace, so a
    # masked forward starts from the clean forward's embedding (`ComponentModel`).
    def forward_prefix(self, x: Float[Tensor, "... n_features"]) -> Float[Tensor, "... d_embed"]:
        return x @ self.W_E

    def forward_from_prefix(
        self, embedded: Float[Tensor, "... d_embed"] | LowRank
    ) -> Float[Tensor, "... n_features"]:
        """The read-off output from the embedded input, dense or as `low_rank_prefix` gives it
        (then the residual stream is never formed: `spd_ray.core.lowrank`)."""
        if isinstance(embedded, LowRank):
            return self.low_rank_blocks(embedded).matmul(self.W_E.T)
        return self._blocks(embedded) @ self.W_E.T

    def low_rank_prefix(self, x: Float[Tensor, "rows n_features"]) -> LowRank:
        """forward_prefix(x) as a LowRank: x @ W_E."""
        return LowRank([Term("W_E", x, self.W_E)])

    def low_rank_blocks(self, residual: LowRank) -> LowRank:
        """The residual stream after the last block, each block's input read through the terms
        (x @ (W_E @ W_in^T) rather than (x @ W_E) @ W_in^T) and its output added as terms."""
        for i, block in enumerate(self.blocks):
            h = self.act(linear_dense(block.mlp_in, residual))
            residual = residual + linear_low_rank(block.mlp_out, h, f"layers.{i}.mlp_out")
        return residual

    def labels(self, x: Float[Tensor, "... n_features"]) -> Float[Tensor, "... n_features"]:
        """act(c * x) + x for label_type act_plus_resid, |c * x| for abs."""
        cx = self.label_coeffs * x
        if self.config.label_type == "act_plus_resid":
            return self.act(cx) + x
        return cx.abs()


def low_rank_forward(
    model: ResidMLP, x: Float[Tensor, "batch n_features"], read_off: bool = True
) -> Float[Tensor, "batch n_features"]:
    """`model(x)` without forming the d_embed-wide residual stream (`spd_ray.core.lowrank`); used
    for training. With `read_off=False` it returns the residual stream itself."""
    residual = model.low_rank_blocks(model.low_rank_prefix(x))
    return residual.matmul(model.W_E.T) if read_off else residual.dense()


def training_loss(model: ResidMLP, x: Float[Tensor, "batch n_features"]) -> Tensor:
    """The target's training loss: mean squared error of the read-off output against the labels,
    feature i weighted by feature_importance_decay**i (`loss_type: readoff`), or of the final
    residual stream against the labels embedded, labels @ W_E (`loss_type: resid`)."""
    cfg = model.config
    labels = model.labels(x)
    if cfg.loss_type == "resid":
        return F.mse_loss(low_rank_forward(model, x, read_off=False), labels @ model.W_E)
    err = (low_rank_forward(model, x) - labels) ** 2
    if cfg.feature_importance_decay != 1.0:
        weights = cfg.feature_importance_decay ** torch.arange(cfg.n_features, dtype=err.dtype)
        err = err * weights
    return err.mean()


def cosine_lr(step: int, total: int, peak: float) -> float:
    """Cosine decay from `peak` at step 0 to 0 at step `total`."""
    return peak * 0.5 * (1.0 + math.cos(math.pi * step / total))


def train_resid_mlp(cfg: ResidMLPTargetConfig, progress: bool = False) -> ResidMLP:
    """Train the MLP weights (and W_E when trainable) on `training_loss`: AdamW with cosine decay
    to 0 over `steps`, features active w.p. feature_probability with values U[-1, 1]."""
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
        loss = training_loss(model, x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    bar.close()
    return model.eval()
