"""Every SPD loss term against a hand calculation on tiny linear fixtures.

Fixtures are bias-free linear stacks l1 -> l2 -> ... with V and U set by hand, and CI values set
by hand (a `CIOutputs` built directly), so every mask is known. Stochastic terms are checked against
the same formula evaluated on numbers drawn from an identically seeded generator in the documented
order: per copy, per module (in `module_paths` order), the component-mask noise and then, with the
delta component, the delta-mask noise.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from spd_ray import config as C
from spd_ray.core.losses import (
    faithfulness_loss,
    importance_minimality_loss,
    loss_term,
    total_loss,
)
from spd_ray.core.masks import Noise, all_routes
from spd_ray.core.model import CIOutputs, ComponentModel
from spd_ray.core.pgd import pgd_multibatch_recon_loss
from spd_ray.core.recon import StepInputs, recon_loss

RTOL = 1e-5


class LinearStack(nn.Module):
    """Linear layers l1, l2, ... applied in order, with the given weights (d_out x d_in)."""

    def __init__(self, *weights: Tensor, biases: list[Tensor] | None = None):
        super().__init__()
        self.n = len(weights)
        for i, w in enumerate(weights):
            layer = nn.Linear(w.shape[1], w.shape[0], bias=biases is not None)
            with torch.no_grad():
                layer.weight.copy_(w)
                if biases is not None:
                    layer.bias.copy_(biases[i])
            setattr(self, f"l{i + 1}", layer)
        self.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        for i in range(self.n):
            x = getattr(self, f"l{i + 1}")(x)
        return x


def decomposed(
    weights: list[Tensor],
    VU: list[tuple[Tensor, Tensor]],
    biases: list[Tensor] | None = None,
) -> ComponentModel:
    """A LinearStack with every layer decomposed, V [d_in, C] and U [C, d_out] as given."""
    target = LinearStack(*weights, biases=biases)
    info = [(f"l{i + 1}", V.shape[1]) for i, (V, _) in enumerate(VU)]
    model = ComponentModel(target, info, ci_fn_type="vector_mlp", ci_fn_hidden_dims=[2])
    for i, (V, U) in enumerate(VU):
        comps = model.comps(f"l{i + 1}")
        with torch.no_grad():
            comps.V.copy_(V)
            comps.U.copy_(U)
    return model


def inputs(
    model: ComponentModel,
    batch: Tensor,
    ci: dict[str, Tensor],
    *,
    upper: dict[str, Tensor] | None = None,
    loss_type: str = "mse",
    delta: bool = False,
    sampling: str = "continuous",
    n_samples: int = 1,
    seed: int = 0,
    step_frac: float = 0.0,
    generator: torch.Generator | None = None,
) -> StepInputs:
    with torch.no_grad():
        target_out, cache = model.clean_forward(batch)
    return StepInputs(
        model=model,
        batch=batch,
        target_out=target_out,
        cache=cache,
        ci=CIOutputs(lower=ci, upper=upper if upper is not None else ci, pre_sigmoid=ci),
        output_loss_type=loss_type,  # type: ignore[arg-type]
        use_delta_component=delta,
        sampling=sampling,  # type: ignore[arg-type]
        n_mask_samples=n_samples,
        noise=Noise(generator or torch.Generator().manual_seed(seed)),
        step_frac=step_frac,
    )


def rand(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def masked_linear(
    x: Tensor, W: Tensor, V: Tensor, U: Tensor, m: Tensor, d: Tensor | None
) -> Tensor:
    """The SPD masked layer, written out: ((x V) * m) U + d * x (W - (VU)^T)^T."""
    out = ((x @ V) * m) @ U
    if d is not None:
        out = out + d.unsqueeze(-1) * (x @ (W - (V @ U).T).T)
    return out


def mse(a: Tensor, b: Tensor) -> Tensor:
    return ((a - b) ** 2).mean()


def close(value: Tensor, expected: float | Tensor) -> None:
    expected = torch.as_tensor(expected, dtype=value.dtype)
    assert value.shape == ()
    assert torch.allclose(value.detach(), expected, rtol=RTOL, atol=1e-7), (value, expected)


# -- a two-layer fixture with random weights and CI, shared by the stochastic tests ---------

X2 = rand(3, 2, seed=1)  # batch 3, d_in 2
W1, W2 = rand(3, 2, seed=2), rand(2, 3, seed=3)  # d_in 2 -> d_h 3 -> d_out 2
V1, U1 = rand(2, 2, seed=4), rand(2, 3, seed=5)  # C = 2
V2, U2 = rand(3, 4, seed=6), rand(4, 2, seed=7)  # C = 4
CI2 = {
    "l1": torch.tensor([[0.0, 1.0], [0.5, 0.2], [0.9, 0.0]]),
    "l2": torch.tensor([[0.1, 0.0, 1.0, 0.3], [0.6, 0.6, 0.0, 0.0], [1.0, 1.0, 0.4, 0.7]]),
}


def two_layer() -> ComponentModel:
    return decomposed([W1, W2], [(V1, U1), (V2, U2)])


# -- faithfulness and importance minimality ---------------------------------------------------


def test_faithfulness_by_hand():
    # l1: W = [[1, 2], [3, 4]], (V U)^T = [[1, 0], [1, 0]] -> delta [[0, 2], [2, 4]], sum sq. 24
    # l2: W = [[1, 1]],         (V U)^T = [[0.5, 0.5]]     -> delta [[0.5, 0.5]],       sum sq. 0.5
    model = decomposed(
        [torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 1.0]])],
        [
            (torch.tensor([[1.0], [0.0]]), torch.tensor([[1.0, 1.0]])),
            (torch.tensor([[1.0], [1.0]]), torch.tensor([[0.5]])),
        ],
    )
    close(faithfulness_loss(model), 24.5 / 6)
    inp = inputs(model, torch.ones(1, 2), {"l1": torch.ones(1, 1), "l2": torch.ones(1, 1)})
    close(loss_term(C.FaithfulnessLoss(coeff=1.0), inp), 24.5 / 6)


def test_faithfulness_zero_when_components_equal_target():
    W = rand(3, 4, seed=0)
    model = decomposed([W], [(torch.eye(4), W.T.clone())])
    assert faithfulness_loss(model).item() == pytest.approx(0.0, abs=1e-12)


G = {"a": torch.tensor([[1.0, 2.0], [0.0, 1.0]]), "b": torch.tensor([[0.5], [0.5]])}


@pytest.mark.parametrize(
    ("pnorm", "beta", "eps", "expected"),
    [
        # a: S = [1, 3], m = [0.5, 1.5];  b: S = 1, m = 0.5
        (1.0, 0.0, 0.0, 2.5),
        # a: S = [1, 5], m = [0.5, 2.5];  b: S = 0.5, m = 0.25
        (2.0, 0.0, 0.0, 3.25),
        # sum_c m_c (1 + log2(1 + S_c)): a: 0.5 * 2 + 1.5 * 3; b: 0.5 * 2
        (1.0, 1.0, 0.0, 6.5),
        # (g + 0.1)^2: a: S = [1.22, 5.62]; b: S = 0.72
        (2.0, 0.0, 0.1, (1.22 + 5.62 + 0.72) / 2),
        (
            2.0,
            0.5,
            0.0,
            3.25 + 0.5 * (0.5 * 1 + 2.5 * math.log2(6) + 0.25 * math.log2(1.5)),
        ),
    ],
)
def test_importance_minimality_by_hand(pnorm, beta, eps, expected):
    close(importance_minimality_loss(G, pnorm, beta, eps), expected)


def test_importance_minimality_counts_every_position():
    # [batch 2, pos 2, C 1]: N = 4 positions, S = 1 + 4 + 0 + 1 = 6 at p = 2.
    g = {"x": torch.tensor([[[1.0], [2.0]], [[0.0], [1.0]]])}
    close(importance_minimality_loss(g, 2.0, 0.0, 0.0), 6 / 4)


def test_importance_minimality_p_annealing_through_loss_term():
    # p anneals 2 -> 1 over the whole run; halfway p = 1.5 and a single CI value 2 gives 2^1.5.
    model = decomposed([torch.eye(1)], [(torch.eye(1), torch.eye(1))])
    cfg = C.ImportanceMinimalityLoss(
        coeff=1.0,
        pnorm=2.0,
        p_anneal_start_frac=0.0,
        p_anneal_final_p=1.0,
        p_anneal_end_frac=1.0,
        eps=0.0,
    )
    ci = {"l1": torch.tensor([[0.5]])}
    upper = {"l1": torch.tensor([[2.0]])}  # the loss reads the upper-leaky CI
    for frac, expected in [(0.0, 4.0), (0.5, 2**1.5), (1.0, 2.0)]:
        inp = inputs(model, torch.ones(1, 1), ci, upper=upper, step_frac=frac)
        close(loss_term(cfg, inp), expected)


def test_importance_minimality_gradient():
    # d/dg of sum (g + eps) / N at p = 1 is 1 / N everywhere.
    g = torch.tensor([[0.2, 0.4], [0.6, 0.8]], requires_grad=True)
    importance_minimality_loss({"a": g}, 1.0, 0.0, 0.0).backward()
    assert g.grad is not None
    assert torch.allclose(g.grad, torch.full((2, 2), 0.5))


# -- deterministic masks ---------------------------------------------------------------------


def test_ci_masked_recon_identity_V():
    # V = I, U = W^T: the masked layer is (x * m) W^T + b, the target x W^T + b.
    # row 0: x = [1, 1], m = [1, 0]   -> 1 + b vs 3 + b -> 4
    # row 1: x = [2, 1], m = [1, 0.5] -> 3 + b vs 4 + b -> 1
    W = torch.tensor([[1.0, 2.0]])
    model = decomposed([W], [(torch.eye(2), W.T.clone())], biases=[torch.tensor([0.5])])
    batch = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
    inp = inputs(model, batch, {"l1": torch.tensor([[1.0, 0.0], [1.0, 0.5]])})
    close(loss_term(C.CIMaskedReconLoss(coeff=1.0), inp), 2.5)
    # All modules at mask 1: exactly the target here.
    close(loss_term(C.UnmaskedReconLoss(coeff=1.0), inp), 0.0)


def test_unmasked_recon_uses_components_without_delta():
    # Component weight 0.5 W: pred = 0.5 t + b, target t + b with t = [3, 4] -> (9 + 16) / 4 / 2.
    W = torch.tensor([[1.0, 2.0]])
    model = decomposed([W], [(torch.eye(2), 0.5 * W.T)], biases=[torch.tensor([-1.0])])
    batch = torch.tensor([[1.0, 1.0], [2.0, 1.0]])
    inp = inputs(model, batch, {"l1": torch.zeros(2, 2)}, delta=True)
    close(loss_term(C.UnmaskedReconLoss(coeff=1.0), inp), 25 / 8)


def test_ci_masked_two_layers_full_and_layerwise():
    model = two_layer()
    inp = inputs(model, X2, CI2)
    target = X2 @ W1.T @ W2.T
    h_masked = masked_linear(X2, W1, V1, U1, CI2["l1"], None)
    full = masked_linear(h_masked, W2, V2, U2, CI2["l2"], None)
    close(loss_term(C.CIMaskedReconLoss(coeff=1.0), inp), mse(full, target))
    only_l1 = h_masked @ W2.T
    only_l2 = masked_linear(X2 @ W1.T, W2, V2, U2, CI2["l2"], None)
    layerwise = (mse(only_l1, target) + mse(only_l2, target)) / 2
    close(loss_term(C.CIMaskedReconLayerwiseLoss(coeff=1.0), inp), layerwise)


def test_ci_masked_layerwise_equals_full_for_one_layer():
    W, V, U = rand(3, 4, seed=10), rand(4, 5, seed=11), rand(5, 3, seed=12)
    model = decomposed([W], [(V, U)])
    ci = {"l1": torch.rand(6, 5, generator=torch.Generator().manual_seed(13))}
    inp = inputs(model, rand(6, 4, seed=14), ci)
    full = loss_term(C.CIMaskedReconLoss(coeff=1.0), inp)
    layerwise = loss_term(C.CIMaskedReconLayerwiseLoss(coeff=1.0), inp)
    assert full.item() > 0
    close(layerwise, full)


def test_ci_masked_subset_static_p1_equals_full():
    model = two_layer()
    inp = inputs(model, X2, CI2)
    full = loss_term(C.CIMaskedReconLoss(coeff=1.0), inp)
    cfg = C.CIMaskedReconSubsetLoss(coeff=1.0, routing=C.StaticProbabilityRouting(p=1.0))
    close(loss_term(cfg, inp), full)


def test_ci_masked_subset_static_routing_by_hand():
    # Routes: rand(batch, n_modules) < p, then unrouted positions run the target weights.
    model = two_layer()
    inp = inputs(model, X2, CI2, seed=21)
    cfg = C.CIMaskedReconSubsetLoss(coeff=1.0, routing=C.StaticProbabilityRouting(p=0.5))
    routed = torch.rand((3, 2), generator=torch.Generator().manual_seed(21)) < 0.5
    r1, r2 = routed[:, :1], routed[:, 1:]
    h = torch.where(r1, masked_linear(X2, W1, V1, U1, CI2["l1"], None), X2 @ W1.T)
    out = torch.where(r2, masked_linear(h, W2, V2, U2, CI2["l2"], None), h @ W2.T)
    close(loss_term(cfg, inp), mse(out, X2 @ W1.T @ W2.T))


# -- stochastic masks ------------------------------------------------------------------------


def _draw_masks(
    g: torch.Generator, ci: Tensor, delta: bool, sampling: str
) -> tuple[Tensor, Tensor | None]:
    u = torch.rand(ci.shape, generator=g)
    if sampling == "binomial":
        u = (u < 0.5).float()
    d = torch.rand(ci.shape[:-1], generator=g) if delta else None
    return ci + (1 - ci) * u, d


@pytest.mark.parametrize("delta", [False, True])
@pytest.mark.parametrize("sampling", ["continuous", "binomial"])
def test_stochastic_recon_one_layer_by_hand(delta, sampling):
    W, V, U = rand(2, 3, seed=30), rand(3, 2, seed=31), rand(2, 2, seed=32)
    x = rand(4, 3, seed=33)
    ci = {"l1": torch.tensor([[0.0, 1.0], [0.5, 0.5], [0.2, 0.9], [1.0, 0.0]])}
    model = decomposed([W], [(V, U)])
    inp = inputs(model, x, ci, delta=delta, sampling=sampling, n_samples=2, seed=3)
    g = torch.Generator().manual_seed(3)
    errors = []
    for _ in range(2):
        m, d = _draw_masks(g, ci["l1"], delta, sampling)
        errors.append(mse(masked_linear(x, W, V, U, m, d), x @ W.T))
    close(loss_term(C.StochasticReconLoss(coeff=1.0), inp), torch.stack(errors).mean())


@pytest.mark.parametrize("delta", [False, True])
def test_stochastic_recon_two_layers_by_hand(delta):
    inp = inputs(two_layer(), X2, CI2, delta=delta, n_samples=2, seed=5)
    g = torch.Generator().manual_seed(5)
    target = X2 @ W1.T @ W2.T
    errors = []
    for _ in range(2):
        m1, d1 = _draw_masks(g, CI2["l1"], delta, "continuous")
        m2, d2 = _draw_masks(g, CI2["l2"], delta, "continuous")
        h = masked_linear(X2, W1, V1, U1, m1, d1)
        errors.append(mse(masked_linear(h, W2, V2, U2, m2, d2), target))
    close(loss_term(C.StochasticReconLoss(coeff=1.0), inp), torch.stack(errors).mean())


@pytest.mark.parametrize("delta", [False, True])
def test_stochastic_layerwise_two_layers_by_hand(delta):
    # One copy per (sample, module), samples outer: mean over all 2 x 2 copies.
    inp = inputs(two_layer(), X2, CI2, delta=delta, n_samples=2, seed=6)
    g = torch.Generator().manual_seed(6)
    target = X2 @ W1.T @ W2.T
    errors = []
    for _ in range(2):
        m1, d1 = _draw_masks(g, CI2["l1"], delta, "continuous")
        errors.append(mse(masked_linear(X2, W1, V1, U1, m1, d1) @ W2.T, target))
        m2, d2 = _draw_masks(g, CI2["l2"], delta, "continuous")
        errors.append(mse(masked_linear(X2 @ W1.T, W2, V2, U2, m2, d2), target))
    value = loss_term(C.StochasticReconLayerwiseLoss(coeff=1.0), inp)
    close(value, torch.stack(errors).mean())


@pytest.mark.parametrize("delta", [False, True])
def test_stochastic_layerwise_equals_full_for_one_layer(delta):
    W, V, U = rand(3, 4, seed=40), rand(4, 5, seed=41), rand(5, 3, seed=42)
    ci = {"l1": torch.rand(6, 5, generator=torch.Generator().manual_seed(43))}
    x = rand(6, 4, seed=44)
    model = decomposed([W], [(V, U)])
    full = loss_term(
        C.StochasticReconLoss(coeff=1.0), inputs(model, x, ci, delta=delta, n_samples=3, seed=9)
    )
    layerwise = loss_term(
        C.StochasticReconLayerwiseLoss(coeff=1.0),
        inputs(model, x, ci, delta=delta, n_samples=3, seed=9),
    )
    close(layerwise, full)


def test_stochastic_subset_static_p1_equals_full():
    # The subset term first draws every sample's routes (rand(batch, n_modules) each), then masks;
    # with p = 1 every module is routed everywhere, so it equals the full term on the same masks.
    cfg = C.StochasticReconSubsetLoss(coeff=1.0, routing=C.StaticProbabilityRouting(p=1.0))
    subset = loss_term(cfg, inputs(two_layer(), X2, CI2, delta=True, n_samples=2, seed=8))
    g = torch.Generator().manual_seed(8)
    torch.rand((2, 3, 2), generator=g)  # the two samples' route draws
    full_inp = inputs(two_layer(), X2, CI2, delta=True, n_samples=2, generator=g)
    close(subset, loss_term(C.StochasticReconLoss(coeff=1.0), full_inp))


def test_stochastic_hidden_acts_by_hand():
    # l1 (C = 1) has component weight 2 W1 and CI 1, so its mask is 1 and its masked output is
    # (2 - d) y with y = x W1^T: the l2 input is off by (1 - d) y; the l1 input is never off.
    V = torch.tensor([[1.0], [2.0]])
    U = torch.tensor([[1.0, -1.0, 0.5]])
    W1h = 0.5 * (V @ U).T
    model = decomposed([W1h, W2], [(V, U), (V2, U2)])
    ci = {"l1": torch.ones(3, 1), "l2": CI2["l2"]}
    inp = inputs(model, X2, ci, delta=True, n_samples=2, seed=11)
    g = torch.Generator().manual_seed(11)
    y = X2 @ W1h.T
    total = torch.tensor(0.0)
    for _ in range(2):
        torch.rand((3, 1), generator=g)  # l1 component mask (ci = 1: no effect)
        d = torch.rand((3,), generator=g)  # l1 delta mask
        torch.rand((3, 4), generator=g)  # l2 masks: do not change any module input
        torch.rand((3,), generator=g)
        total = total + (((1 - d) ** 2) * (y**2).sum(-1)).sum()
    n = 2 * (3 * 2 + 3 * 3)  # samples x (l1 input + l2 input elements)
    close(loss_term(C.StochasticHiddenActsReconLoss(coeff=1.0), inp), total / n)

    # Without the delta term the l1 output is 2 y: error y^2 on every sample.
    inp = inputs(model, X2, ci, delta=False, n_samples=2, seed=11)
    expected = 2 * (y**2).sum() / n
    close(loss_term(C.StochasticHiddenActsReconLoss(coeff=1.0), inp), expected)


# -- adversarial (PGD) masks -----------------------------------------------------------------


def _pgd(cls: type, init: str, n_steps: int, step_size: float = 0.1, **kw: object) -> C._PGD:
    return cls(coeff=1.0, init=init, n_steps=n_steps, step_size=step_size, **kw)


@pytest.mark.parametrize("cls", [C.PGDReconLoss, C.PGDReconLayerwiseLoss, C.PGDReconSubsetLoss])
@pytest.mark.parametrize("scope", ["unique_per_datapoint", "shared_across_batch"])
def test_pgd_ones_init_with_delta_is_exact(cls, scope):
    # Sources 1: every component mask 1 and delta mask 1 -> exactly the target weights.
    inp = inputs(two_layer(), X2, CI2, delta=True)
    assert loss_term(_pgd(cls, "ones", 0, mask_scope=scope), inp).item() == 0.0


@pytest.mark.parametrize(
    ("pgd_cls", "ci_cls"),
    [
        (C.PGDReconLoss, C.CIMaskedReconLoss),
        (C.PGDReconLayerwiseLoss, C.CIMaskedReconLayerwiseLoss),
    ],
)
def test_pgd_zeroes_init_equals_ci_masked(pgd_cls, ci_cls):
    # Sources 0: component masks = CI and delta mask 0 -> the CI-masked term.
    inp = inputs(two_layer(), X2, CI2, delta=True)
    close(loss_term(_pgd(pgd_cls, "zeroes", 0), inp), loss_term(ci_cls(coeff=1.0), inp))


@pytest.mark.parametrize("scope", ["unique_per_datapoint", "shared_across_batch"])
def test_pgd_random_init_by_hand(scope):
    # One source per module of shape [*batch, C + 1] (or [1, C + 1] shared); the last column is the
    # delta mask, the rest interpolates from CI to 1.
    inp = inputs(two_layer(), X2, CI2, delta=True, seed=12)
    g = torch.Generator().manual_seed(12)
    rows = 1 if scope == "shared_across_batch" else 3
    s1 = torch.rand((rows, 3), generator=g)
    s2 = torch.rand((rows, 5), generator=g)
    m1 = CI2["l1"] + (1 - CI2["l1"]) * s1[:, :2]
    m2 = CI2["l2"] + (1 - CI2["l2"]) * s2[:, :4]
    h = masked_linear(X2, W1, V1, U1, m1, s1[:, 2].expand(3))
    out = masked_linear(h, W2, V2, U2, m2, s2[:, 4].expand(3))
    value = loss_term(_pgd(C.PGDReconLoss, "random", 0, mask_scope=scope), inp)
    close(value, mse(out, X2 @ W1.T @ W2.T))


@pytest.mark.parametrize("scope", ["unique_per_datapoint", "shared_across_batch"])
def test_pgd_ascent_increases_loss(scope):
    # W = 1, component weight 2, CI 0.75, no delta: mask m = 0.75 + 0.25 s gives pred 2 m x, and
    # the error (2 m - 1)^2 x^2 grows with s. From s = 0, steps of 0.5 reach s = 0.5, then s = 1
    # (clamped).
    model = decomposed([torch.tensor([[1.0]])], [(torch.tensor([[1.0]]), torch.tensor([[2.0]]))])
    x = torch.tensor([[1.0], [2.0]])
    inp = inputs(model, x, {"l1": torch.full((2, 1), 0.75)})
    mean_x2 = 2.5
    for n_steps, m in [(0, 0.75), (1, 0.875), (2, 1.0), (5, 1.0)]:
        cfg = _pgd(C.PGDReconLoss, "zeroes", n_steps, step_size=0.5, mask_scope=scope)
        close(loss_term(cfg, inp), (2 * m - 1) ** 2 * mean_x2)


def _multibatch(init: str, n_steps: int, step_size: float, gas: int) -> C.PGDMultiBatchReconLoss:
    return C.PGDMultiBatchReconLoss(
        init=init, n_steps=n_steps, step_size=step_size, gradient_accumulation_steps=gas
    )


def test_multibatch_pgd_of_one_batch_is_batch_shared_pgd():
    inp = inputs(two_layer(), X2, CI2, delta=True)
    for init in ("zeroes", "ones"):
        shared = _pgd(C.PGDReconLoss, init, 3, step_size=0.3, mask_scope="shared_across_batch")
        value = pgd_multibatch_recon_loss(
            lambda: iter([inp]), _multibatch(init, 3, 0.3, 1), lambda i: all_routes(i.paths),
            inp.noise.pgd_init(),
        )  # fmt: skip
        close(value, loss_term(shared, inp))


def test_multibatch_pgd_steps_on_the_summed_gradient_of_all_batches():
    # W = 1, component weight 2, no delta; one source s shared by both batches. Batch A (CI 0.75,
    # mask 0.75 + 0.25 s) has error (0.5 + 0.5 s)^2 x^2, slope 0.5 sum x^2 at s = 0; batch B (CI 0,
    # mask s) has error (2 s - 1)^2 x^2, slope -4 sum x^2. A alone pushes s up; with B's x = 1 the
    # sum of slopes is 2.5 - 4 < 0 and s stays 0, with x = 0.5 it is 2.5 - 1 > 0 and s rises.
    model = decomposed([torch.tensor([[1.0]])], [(torch.tensor([[1.0]]), torch.tensor([[2.0]]))])
    xa = torch.tensor([[1.0], [2.0]])
    a = inputs(model, xa, {"l1": torch.full((2, 1), 0.75)})

    def run(b_x: float, n_steps: int) -> Tensor:
        b = inputs(model, torch.tensor([[b_x]]), {"l1": torch.zeros(1, 1)})
        return pgd_multibatch_recon_loss(
            lambda: iter([a, b]), _multibatch("zeroes", n_steps, 0.5, 2),
            lambda i: all_routes(i.paths), a.noise.pgd_init(),
        )  # fmt: skip

    def expected(b_x: float, s: float) -> float:
        total = (0.5 + 0.5 * s) ** 2 * 5.0 + (2 * s - 1) ** 2 * b_x**2
        return total / 3  # three averaged elements over both batches

    close(run(1.0, 2), expected(1.0, 0.0))
    close(run(0.5, 1), expected(0.5, 0.5))
    # At s = 0.5: slopes 0.75 * 5 + 0 > 0 -> s = 1.
    close(run(0.5, 2), expected(0.5, 1.0))


def test_pgd_sources_stay_fp32_when_the_ci_is_bf16():
    # Under autocast the CI is bf16, whose spacing just below 1 is 2^-8: a source stepping down
    # from 1 by 0.001 would round back to 1 and never move. In fp32 it moves: component weight
    # 0.5, CI 0.75, m = 0.75 + 0.25 s, error (0.5 m - 1)^2 x^2 falls as s grows, so ascent lowers s.
    model = decomposed([torch.tensor([[1.0]])], [(torch.tensor([[1.0]]), torch.tensor([[0.5]]))])
    x = torch.tensor([[1.0], [2.0]])
    inp = inputs(model, x, {"l1": torch.full((2, 1), 0.75, dtype=torch.bfloat16)})
    cfg = _pgd(C.PGDReconLoss, "ones", 3, step_size=0.001)
    m = 0.75 + 0.25 * (1 - 3 * 0.001)
    assert loss_term(cfg, inp).item() == pytest.approx((0.5 * m - 1) ** 2 * 2.5, rel=1e-6)


def test_pgd_final_forward_is_differentiable():
    model = two_layer()
    ci = {k: v.clone().requires_grad_(True) for k, v in CI2.items()}
    inp = inputs(model, X2, ci, delta=True, seed=1)
    loss_term(_pgd(C.PGDReconLoss, "random", 2), inp).backward()
    assert all(v.grad is not None for v in ci.values())
    assert model.comps("l1").V.grad is not None


# -- output distances and the total --------------------------------------------------------


def test_kl_recon_by_hand():
    # [batch 1, pos 2, vocab 2]. Position 0: target probs [1/4, 3/4], pred [1/2, 1/2];
    # position 1: target [1/2, 1/2], pred [1/4, 3/4].
    ln3 = math.log(3)
    target = torch.tensor([[[0.0, ln3], [0.0, 0.0]]])
    pred = torch.tensor([[[0.0, 0.0], [0.0, ln3]]])
    kl0 = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    kl1 = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    close(recon_loss(pred, target, "kl"), (kl0 + kl1) / 2)
    # Two stacked copies: the mean over copies.
    stacked = torch.cat([pred, target])
    close(recon_loss(stacked, target, "kl"), (kl0 + kl1) / 4)
    assert recon_loss(target, target, "kl").item() == pytest.approx(0.0, abs=1e-7)


def test_mse_recon_by_hand():
    target = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    pred = torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    close(recon_loss(pred, target, "mse"), (4 + 1) / 4)
    close(recon_loss(torch.cat([pred, target]), target, "mse"), (4 + 1) / 8)


def test_kl_ci_masked_recon_on_a_model():
    # Logits x I with x = [0, ln 3]; the second component masked off -> pred logits [0, 0].
    model = decomposed([torch.eye(2)], [(torch.eye(2), torch.eye(2))])
    inp = inputs(
        model,
        torch.tensor([[0.0, math.log(3)]]),
        {"l1": torch.tensor([[1.0, 0.0]])},
        loss_type="kl",
    )
    expected = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    close(loss_term(C.CIMaskedReconLoss(coeff=1.0), inp), expected)


def test_total_loss_is_weighted_sum():
    cfgs = [
        C.FaithfulnessLoss(coeff=2.0),
        C.ImportanceMinimalityLoss(coeff=0.5, pnorm=1.0),
        C.CIMaskedReconLoss(coeff=3.0),
        C.StochasticReconLoss(coeff=0.25),
    ]
    total, terms = total_loss(cfgs, inputs(two_layer(), X2, CI2, delta=True, seed=4))
    assert list(terms) == [
        "loss/FaithfulnessLoss",
        "loss/ImportanceMinimalityLoss",
        "loss/CIMaskedReconLoss",
        "loss/StochasticReconLoss",
    ]
    for cfg in cfgs:
        single = loss_term(cfg, inputs(two_layer(), X2, CI2, delta=True, seed=4))
        close(terms[f"loss/{cfg.classname}"], single)
    expected = sum(c.coeff * terms[f"loss/{c.classname}"] for c in cfgs)  # type: ignore[operator]
    close(total, expected)


# -- data-parallel invariance ----------------------------------------------------------------

X4 = rand(4, 2, seed=50)
CI4 = {
    "l1": torch.rand(4, 2, generator=torch.Generator().manual_seed(51)),
    "l2": torch.rand(4, 4, generator=torch.Generator().manual_seed(52)),
}
_PGD_KW: dict[str, object] = {"coeff": 1.0, "init": "random", "step_size": 0.1, "n_steps": 2}


@pytest.mark.parametrize(
    "cfg",
    [
        C.StochasticReconLoss(coeff=1.0),
        C.StochasticReconLayerwiseLoss(coeff=1.0),
        C.StochasticReconSubsetLoss(coeff=1.0),
        C.StochasticReconSubsetLoss(coeff=1.0, routing=C.StaticProbabilityRouting(p=0.5)),
        C.CIMaskedReconSubsetLoss(coeff=1.0),
        C.StochasticHiddenActsReconLoss(coeff=1.0),
        *(
            cls(**_PGD_KW)  # type: ignore[arg-type]
            for cls in (C.PGDReconLoss, C.PGDReconLayerwiseLoss, C.PGDReconSubsetLoss)
        ),
    ],
    ids=lambda c: c.classname,
)
def test_stochastic_terms_invariant_to_worker_split(cfg):
    # Every worker draws the global batch's noise and keeps its rows, so the mean of two workers'
    # losses on equal halves equals one worker's loss on the whole batch.
    model = two_layer()
    whole = loss_term(cfg, inputs(model, X4, CI4, delta=True, n_samples=2, seed=13))
    halves = []
    for rank in range(2):
        rows = slice(2 * rank, 2 * rank + 2)
        inp = inputs(model, X4[rows], {k: v[rows] for k, v in CI4.items()}, delta=True, n_samples=2)
        inp.noise = Noise(torch.Generator().manual_seed(13), rank=rank, world_size=2)
        halves.append(loss_term(cfg, inp))
    close(whole, (halves[0] + halves[1]) / 2)
