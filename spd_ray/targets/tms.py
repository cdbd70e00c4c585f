"""Toy Model of Superposition: x_hat = ReLU(W2 H_k ... H_1 W1 x + b2), and its trainer.

`train_tms` guarantees a good target: after training it checks that every input feature is
represented (`tms_features_represented`) and retrains from a derived seed when one is not.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor, nn
from tqdm import tqdm

from spd_ray.config import TMSTargetConfig
from spd_ray.data.toy import SparseFeatureDataset

MAX_TRAIN_ATTEMPTS = 5
SEED_STRIDE = 1000
RECON_VALUES = (0.75, 1.0)
RECON_TOL = 0.3


def _uniform_(param: Tensor, lo: float, hi: float, fan_in: int, gen: torch.Generator) -> None:
    """U(lo, hi) / sqrt(fan_in) from an explicit generator; (-1, 1) is nn.Linear's default init."""
    scale = 1.0 / math.sqrt(fan_in)
    param.uniform_(lo * scale, hi * scale, generator=gen)


class TMSModel(nn.Module):
    """linear1 (n_features -> n_hidden, no bias), hidden_layers (n_hidden -> n_hidden, no bias),
    linear2 (n_hidden -> n_features, bias), ReLU on the output.

    With `tied_weights` the model stays a plain module whose linear2.weight equals linear1.weight^T;
    `tied_module_pairs` names the pair so a decomposition can tie its components too. The trainer
    shares one parameter between them while training.
    """

    # Each output row depends on its own input row alone (`spd_ray.core.rows`).
    rows_independent = True

    def __init__(self, config: TMSTargetConfig, generator: torch.Generator | None = None):
        super().__init__()
        self.config = config
        self.model_type = config.model_type
        self.n_features = config.n_features
        gen = generator if generator is not None else torch.Generator().manual_seed(config.seed)
        n_f, n_h = config.n_features, config.n_hidden

        self.linear1 = nn.Linear(n_f, n_h, bias=False)
        if config.n_hidden_layers > 0:
            self.hidden_layers = nn.ModuleList(
                [nn.Linear(n_h, n_h, bias=False) for _ in range(config.n_hidden_layers)]
            )
        self.linear2 = nn.Linear(n_h, n_f, bias=True)

        with torch.no_grad():
            _uniform_(self.linear1.weight, -1.0, 1.0, n_f, gen)
            for layer in self.hidden_layers_at_init():
                _uniform_(layer.weight, -1.0, 1.0, n_h, gen)
            # linear2 starts as linear1^T and the bias non-negative, tied or not: then every
            # feature's own output starts positive (alive). A random linear2 or a negative bias
            # starts some output ReLUs dead for their own feature, and they never learn it.
            self.linear2.weight.copy_(self.linear1.weight.T)
            if config.init_bias_to_zero:
                self.linear2.bias.zero_()
            else:
                _uniform_(self.linear2.bias, 0.0, 1.0, n_h, gen)
            if config.fix_hidden_identity:
                for layer in self.hidden_layers_at_init():
                    layer.weight.copy_(torch.eye(n_h))
            if config.fix_hidden_identity or config.fixed_random_hidden_layers:
                for layer in self.hidden_layers_at_init():
                    layer.weight.requires_grad_(False)

        self.tied_module_pairs: list[tuple[str, str]] = (
            [("linear1", "linear2")] if config.tied_weights else []
        )

    def hidden_layers_at_init(self) -> list[nn.Linear]:
        # Before any SPD wrapping every hidden module is still the Linear built above.
        layers = self.hidden_list
        assert all(isinstance(m, nn.Linear) for m in layers)
        return layers  # type: ignore[return-value]

    @property
    def hidden_list(self) -> list[nn.Module]:
        # Every hidden module, whatever it is now: SPD swaps decomposed ones for wrappers.
        if self.config.n_hidden_layers == 0:
            return []
        return list(self.hidden_layers)

    def forward(self, x: Float[Tensor, "... n_features"]) -> Float[Tensor, "... n_features"]:
        h = self.linear1(x)
        for layer in self.hidden_list:
            h = layer(h)
        return F.relu(self.linear2(h))


@contextmanager
def shared_tied_weight(model: TMSModel) -> Iterator[None]:
    """While inside, linear2.weight is linear1.weight^T recomputed each forward: one parameter, so
    gradients of both uses add up and the optimizer updates it once. On exit linear2.weight becomes
    a plain parameter again, an exact copy of linear1.weight^T."""
    if not model.config.tied_weights:
        yield
        return
    lin1, lin2 = model.linear1, model.linear2
    del lin2.weight

    def tie(module: nn.Module, args: tuple[Tensor, ...]) -> None:
        module.weight = lin1.weight.T

    handle = lin2.register_forward_pre_hook(tie)
    try:
        yield
    finally:
        handle.remove()
        lin2.__dict__.pop("weight", None)
        lin2.weight = nn.Parameter(
            lin1.weight.detach().T.clone(memory_format=torch.contiguous_format)
        )


@torch.no_grad()
def tms_features_represented(model: TMSModel) -> list[bool]:
    """Per input feature f: does the model reconstruct v * e_f, |x_hat[f] - v| <= RECON_TOL, at
    every v in RECON_VALUES? Two values pin both the slope and the offset of the feature's own
    response, so a dead feature (x_hat[f] = 0) or one carried by the bias alone fails.

    The check is on the input-output map rather than on linear1's column norms: an untied model can
    shrink linear1 and grow linear2 by the same factor and still represent every feature.
    """
    eye = torch.eye(model.n_features, device=model.linear1.weight.device)
    ok = torch.ones(model.n_features, dtype=torch.bool, device=eye.device)
    for v in RECON_VALUES:
        ok &= (model(v * eye).diagonal() - v).abs() <= RECON_TOL
    return [bool(b) for b in ok.tolist()]


def _train_once(cfg: TMSTargetConfig, seed: int, progress: bool) -> TMSModel:
    gen = torch.Generator().manual_seed(seed)
    model = TMSModel(cfg, generator=gen)
    data = SparseFeatureDataset(
        cfg.n_features, cfg.feature_probability, "at_least_zero_active", value_range=(0.0, 1.0)
    )
    with shared_tied_weight(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        bar = tqdm(range(cfg.steps), desc=f"tms seed {seed}", disable=not progress)
        for _ in bar:
            x = data.generate_batch(cfg.batch_size, gen)
            loss = F.mse_loss(model(x), x)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        bar.close()
    return model


def train_tms(cfg: TMSTargetConfig, progress: bool = False) -> TMSModel:
    """Train a TMS target: AdamW at constant lr, inputs with features active w.p.
    feature_probability and values U[0, 1], loss mean((x - x_hat)^2).

    Guarantee: the returned model represents every feature (`tms_features_represented` is all True).
    Some seeds leave a feature unlearned (e.g. 4 of 5 in TMS 5-2); then training restarts from seed
    `cfg.seed + SEED_STRIDE * attempt`, at most MAX_TRAIN_ATTEMPTS times, and raises if all fail.
    The returned model's config is `cfg` either way; the seed used only changes the weights.
    Retries are rare: with TMSModel's init (linear2 = linear1^T, bias >= 0) every seed tried of
    the 5-2, 40-10, tied and identity variants represented all features on the first attempt.
    """
    failures: list[str] = []
    for attempt in range(MAX_TRAIN_ATTEMPTS):
        seed = cfg.seed + SEED_STRIDE * attempt
        model = _train_once(cfg, seed, progress)
        represented = tms_features_represented(model)
        if all(represented):
            return model.eval()
        missing = [f for f, ok in enumerate(represented) if not ok]
        failures.append(f"seed {seed}: features {missing} not represented")
        if progress:
            tqdm.write(f"TMS target {failures[-1]}; retrying with another seed")
    raise RuntimeError(
        f"TMS target training failed to represent every feature after {MAX_TRAIN_ATTEMPTS} "
        f"attempts ({'; '.join(failures)}); change target_model.seed or the training settings"
    )
