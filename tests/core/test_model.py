"""ComponentModel: wrapping, exact all-ones masks, routing, identities, tied weights, CI fns."""

from __future__ import annotations

import copy

import pytest
import torch
from step_helpers import clean_inputs
from torch import Tensor, nn

from spd_ray import config as C
from spd_ray.core.losses import loss_term
from spd_ray.core.masks import Noise
from spd_ray.core.model import (
    CleanCache,
    ComponentModel,
    DecomposedModule,
    Identity,
    ModuleMask,
    insert_identity_operations,
)


def frozen(module: nn.Module) -> nn.Module:
    return module.requires_grad_(False).eval()


class MLP(nn.Module):
    """l1 -> relu -> l2 -> relu -> l3, with biases."""

    def __init__(self, d_in: int = 3, d_h: int = 5, d_out: int = 2, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.l1 = nn.Linear(d_in, d_h)
        self.l2 = nn.Linear(d_h, d_h)
        self.l3 = nn.Linear(d_h, d_out)
        frozen(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.l3(torch.relu(self.l2(torch.relu(self.l1(x)))))


class SplitMLP(MLP):
    """An MLP behind a fixed input layer l0 (not decomposed), with its forward split there."""

    def __init__(self) -> None:
        super().__init__()
        self.l0 = frozen(nn.Linear(3, 3))
        self.prefix_calls = 0

    def forward_prefix(self, x: Tensor) -> Tensor:
        self.prefix_calls += 1
        return torch.tanh(self.l0(x))

    def forward_from_prefix(self, h: Tensor) -> Tensor:
        return super().forward(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_from_prefix(self.forward_prefix(x))


class EmbedModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(7, 4)
        self.head = nn.Linear(4, 3)
        frozen(self)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(self.emb(ids))


class Twice(nn.Module):
    """Runs the same linear layer twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(2)
        self.l1 = nn.Linear(3, 3)
        frozen(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.l1(self.l1(x))


def build(target: nn.Module, info: list[tuple[str, int]], **kw: object) -> ComponentModel:
    torch.manual_seed(123)
    return ComponentModel(target, info, ci_fn_hidden_dims=[4], **kw)  # type: ignore[arg-type]


def all_ones(model: ComponentModel, batch_shape: tuple[int, ...]) -> dict[str, ModuleMask]:
    return {
        p: ModuleMask(mask=torch.ones(*batch_shape, model.C(p)), delta=torch.ones(batch_shape))
        for p in model.module_paths
    }


X = torch.randn(6, 3, generator=torch.Generator().manual_seed(0))
MLP_INFO = [("l1", 4), ("l2", 3), ("l3", 2)]


# -- exactness of all-ones masks ---------------------------------------------------------------


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("use_cache", [True, False])
def test_all_ones_masks_reproduce_linear_target_exactly(reuse, use_cache):
    target = MLP()
    expected = target(X)
    model = build(target, MLP_INFO, reuse_clean_activations=reuse)
    out, cache = model.clean_forward(X)
    assert torch.equal(out, expected)
    masked = model.masked_forward(X, [all_ones(model, (6,))], cache if use_cache else None)
    assert torch.equal(masked, expected)


def test_all_ones_masks_exact_with_sequence_dims():
    target = MLP()
    x = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    expected = target(x)
    model = build(target, MLP_INFO)
    _, cache = model.clean_forward(x)
    assert torch.equal(model.masked_forward(x, [all_ones(model, (2, 5))], cache), expected)


def test_all_ones_masks_reproduce_embedding_exactly():
    target = EmbedModel()
    ids = torch.tensor([[0, 3, 6, 3], [1, 1, 2, 5]])
    expected = target(ids)
    model = build(target, [("emb", 5), ("head", 2)], ci_fn_type="mlp")
    out, cache = model.clean_forward(ids)
    assert torch.equal(out, expected)
    assert torch.equal(cache.inputs["emb"], ids)  # the cache holds the token ids
    assert model.causal_importances(ids)["emb"].shape == (2, 4, 5)
    for c in (cache, None):
        assert torch.equal(model.masked_forward(ids, [all_ones(model, (2, 4))], c), expected)


def test_all_ones_masks_reproduce_inserted_identity_exactly():
    target = MLP()
    expected = target(X)
    model = build(target, [("l1", 2), ("l2.pre_identity", 3)], identity_patterns=["l2"])
    assert model.module_paths == ["l1", "l2.pre_identity"]
    out, cache = model.clean_forward(X)
    assert torch.allclose(out, expected, atol=1e-6, rtol=1e-6)
    for c in (cache, None):
        assert torch.equal(model.masked_forward(X, [all_ones(model, (6,))], c), out)


def test_conv1d_all_ones_exact_and_target_weight():
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            torch.manual_seed(3)
            self.c_fc = Conv1D(5, 3)  # d_in 3 -> d_out 5, weight [3, 5]
            nn.init.normal_(self.c_fc.bias)
            frozen(self)

        def forward(self, x: Tensor) -> Tensor:
            return self.c_fc(x)

    target = Block()
    expected = target(X)
    weight = target.c_fc.weight.clone()
    model = build(target, [("c_fc", 4)])
    assert torch.equal(model.target_weight("c_fc"), weight.T)
    out, cache = model.clean_forward(X)
    assert torch.equal(out, expected)
    assert torch.equal(model.masked_forward(X, [all_ones(model, (6,))], cache), expected)
    delta = model.weight_deltas()["c_fc"]
    assert torch.allclose(model.comps("c_fc").weight() + delta, weight.T, atol=1e-6)


# -- weights ----------------------------------------------------------------------------------


def test_target_weight_is_component_weight_plus_delta():
    target = MLP()
    originals = {p: getattr(target, p).weight.clone() for p in ("l1", "l2", "l3")}
    model = build(target, MLP_INFO)
    deltas = model.weight_deltas()
    for p, w in originals.items():
        assert torch.equal(model.target_weight(p), w)
        assert torch.allclose(model.comps(p).weight() + deltas[p], w, atol=1e-6)
        # The subcomponent weights sum to the component weight.
        assert torch.allclose(model.component_weights(p).sum(0), model.comps(p).weight(), atol=1e-6)

    emb = build(EmbedModel(), [("emb", 3)], ci_fn_type="mlp")
    w = emb.target_weight("emb")
    assert w.shape == (7, 4)
    assert torch.allclose(emb.comps("emb").weight() + emb.weight_deltas()["emb"], w, atol=1e-6)

    ident = build(MLP(), [("l2.pre_identity", 3)], identity_patterns=["l2"])
    assert torch.equal(ident.target_weight("l2.pre_identity"), torch.eye(5))


def test_component_forward_matches_target_when_W_equals_VU():
    target = MLP()
    model = build(target, MLP_INFO)
    with torch.no_grad():
        for p in model.module_paths:
            comps = model.comps(p)
            getattr(target, p).original.weight.copy_(comps.weight())
    expected = target(X)
    _, cache = model.clean_forward(X)
    masks = {p: ModuleMask(mask=torch.ones(6, model.C(p))) for p in model.module_paths}
    assert torch.allclose(model.masked_forward(X, [masks], cache), expected, atol=1e-6)


# -- masked forwards -------------------------------------------------------------------------


def test_stacked_copies_equal_separate_forwards():
    model = build(MLP(), MLP_INFO)
    _, cache = model.clean_forward(X)
    g = torch.Generator().manual_seed(4)
    copies = [
        {},
        {"l2": ModuleMask(mask=torch.rand(6, 3, generator=g))},
        {p: ModuleMask(mask=torch.rand(6, model.C(p), generator=g)) for p in ("l1", "l3")},
        {"l1": ModuleMask(mask=torch.rand(6, 4, generator=g), delta=torch.rand(6, generator=g))},
    ]
    stacked = model.masked_forward(X, copies, cache)
    assert stacked.shape == (24, 2)
    for k, c in enumerate(copies):
        alone = model.masked_forward(X, [c], cache)
        assert torch.allclose(stacked[6 * k : 6 * (k + 1)], alone, atol=1e-6)
    assert torch.equal(stacked[:6], model(X))  # no masks: the target


@pytest.mark.parametrize("reuse", [True, False])
def test_routing_mask_applies_per_example(reuse):
    target = MLP()
    expected = target(X)
    model = build(target, MLP_INFO, reuse_clean_activations=reuse)
    _, cache = model.clean_forward(X)
    route = torch.tensor([True, False, True, False, False, True])
    masks = {"l1": ModuleMask(mask=torch.zeros(6, 4), route=route)}
    out = model.masked_forward(X, [masks], cache)
    assert torch.equal(out[~route], expected[~route])
    assert not torch.allclose(out[route], expected[route])
    # The routed rows equal a forward where every row is replaced.
    full = model.masked_forward(X, [{"l1": ModuleMask(mask=torch.zeros(6, 4))}], cache)
    assert torch.allclose(out[route], full[route], atol=1e-6)


def test_record_inputs_holds_stacked_module_inputs():
    target = MLP()
    model = build(target, MLP_INFO)
    _, cache = model.clean_forward(X)
    assert torch.equal(cache.inputs["l1"], X)
    assert torch.allclose(cache.inputs["l3"], torch.relu(target.l2(torch.relu(target.l1(X)))))
    recorded: dict[str, Tensor] = {}
    model.masked_forward(X, [{}, all_ones(model, (6,))], cache, record_inputs=recorded)
    assert set(recorded) == {"l1", "l2", "l3"}
    for p in model.module_paths:
        assert torch.allclose(recorded[p], torch.cat([cache.inputs[p]] * 2), atol=1e-6)


def _all_loss_configs() -> list[C.LossConfig]:
    pgd = {"init": "random", "step_size": 0.1, "n_steps": 2}
    return [
        C.FaithfulnessLoss(coeff=1.0),
        C.ImportanceMinimalityLoss(coeff=1.0, pnorm=1.0, beta=0.5),
        C.UnmaskedReconLoss(coeff=1.0),
        C.CIMaskedReconLoss(coeff=1.0),
        C.CIMaskedReconLayerwiseLoss(coeff=1.0),
        C.CIMaskedReconSubsetLoss(coeff=1.0),
        C.StochasticReconLoss(coeff=1.0),
        C.StochasticReconLayerwiseLoss(coeff=1.0),
        C.StochasticReconSubsetLoss(coeff=1.0),
        C.StochasticReconSubsetLoss(coeff=1.0, routing=C.StaticProbabilityRouting(p=0.5)),
        C.StochasticHiddenActsReconLoss(coeff=1.0),
        C.PGDReconLoss(coeff=1.0, **pgd),  # type: ignore[arg-type]
        C.PGDReconLoss(coeff=1.0, mask_scope="shared_across_batch", **pgd),  # type: ignore[arg-type]
        C.PGDReconLayerwiseLoss(coeff=1.0, **pgd),  # type: ignore[arg-type]
        C.PGDReconSubsetLoss(coeff=1.0, **pgd),  # type: ignore[arg-type]
    ]


def test_every_loss_class_is_covered():
    assert {c.classname for c in _all_loss_configs()} == set(C.LOSS_CLASSNAMES)


def loss_with_grads(
    model: ComponentModel, x: Tensor, cfg: C.LossConfig, delta: bool
) -> tuple[Tensor, CleanCache]:
    """One loss term on `x` (2 mask samples, fixed noise), its gradients accumulated; the value
    and the clean forward's cache."""
    inp = clean_inputs(model, x, "mse", delta, noise_seed=6)
    value = loss_term(cfg, inp)
    value.backward()
    return value, inp.cache


@pytest.mark.parametrize("cfg", _all_loss_configs(), ids=lambda c: c.classname)
@pytest.mark.parametrize("delta", [True, False])
@pytest.mark.parametrize("split", [False, True], ids=["whole", "split_forward"])
def test_reuse_clean_activations_does_not_change_losses(cfg, delta, split):
    """Masked forwards from the clean activations (and, `split_forward`, from the clean
    forward's prefix: the target's forward_prefix runs once per step) give the losses and
    gradients of masked forwards from scratch."""
    target = SplitMLP() if split else MLP()
    model = build(target, MLP_INFO)
    x = torch.randn(8, 3, generator=torch.Generator().manual_seed(5))
    values = {}
    grads = {}
    for reuse in (True, False):
        model.reuse_clean_activations = reuse
        model.zero_grad()
        calls = getattr(target, "prefix_calls", 0)
        value, cache = loss_with_grads(model, x, cfg, delta)
        assert (cache.prefix is not None) == split
        if split and reuse:  # the clean forward's prefix only: no masked forward recomputed it
            assert target.prefix_calls == calls + 1  # type: ignore[union-attr]
        values[reuse] = value.detach()
        grads[reuse] = [
            p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for p in model.parameters()
            if p.requires_grad
        ]
    assert values[True].item() > 0
    assert torch.allclose(values[True], values[False], rtol=1e-5, atol=1e-7)
    for a, b in zip(grads[True], grads[False], strict=True):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


def test_a_forward_prefix_that_runs_a_decomposed_module_is_refused():
    target = SplitMLP()
    model = build(target, [("l0", 2), ("l1", 2)])
    with pytest.raises(RuntimeError, match=r"forward_prefix ran a decomposed module \(l0\)"):
        model.clean_forward(X)


def test_wrapper_called_twice_raises_with_reuse():
    model = build(Twice(), [("l1", 2)])
    _, cache = model.clean_forward(X)
    with pytest.raises(RuntimeError, match="'l1' ran twice"):
        model.masked_forward(X, [all_ones(model, (6,))], cache)


def test_wrapper_called_twice_runs_without_reuse():
    target = Twice()
    expected = target(X)
    model = build(target, [("l1", 2)], reuse_clean_activations=False)
    _, cache = model.clean_forward(X)
    assert torch.equal(model.masked_forward(X, [all_ones(model, (6,))], cache), expected)
    comps, b = model.comps("l1"), target.l1.original.bias
    m = torch.tensor([1.0, 0.0])

    def f(x: Tensor) -> Tensor:
        return (comps.acts(x) * m) @ comps.get_U() + b

    masks = {"l1": ModuleMask(mask=m.expand(6, 2))}
    assert torch.allclose(model.masked_forward(X, [masks], cache), f(f(X)), atol=1e-6)


# -- identity insertion ----------------------------------------------------------------------


def test_identity_insertion_preserves_output_and_is_idempotent():
    target = MLP()
    expected = target(X)
    assert insert_identity_operations(target, ["l2", "l3"]) == [
        "l2.pre_identity",
        "l3.pre_identity",
    ]
    assert isinstance(target.l2.pre_identity, Identity)
    assert target.l2.pre_identity.d == 5
    assert torch.allclose(target(X), expected, atol=1e-6, rtol=1e-6)
    n_hooks = len(target.l2._forward_pre_hooks)
    n_modules = len(list(target.modules()))
    assert insert_identity_operations(target, ["l2"]) == ["l2.pre_identity"]
    assert len(target.l2._forward_pre_hooks) == n_hooks == 1
    assert len(list(target.modules())) == n_modules
    assert torch.allclose(target(X), expected, atol=1e-6, rtol=1e-6)


def test_identity_decomposition_sees_the_module_input():
    model = build(MLP(), [("l3.pre_identity", 2)], identity_patterns=["l3"])
    _, cache = model.clean_forward(X)
    masks = {"l3.pre_identity": ModuleMask(mask=torch.zeros(6, 2))}
    # A zero mask on the identity zeroes l3's input: l3 outputs its bias.
    out = model.masked_forward(X, [masks], cache)
    bias = model.target.l3.bias
    assert torch.allclose(out, bias.expand(6, 2), atol=1e-6)


def test_module_and_its_identity_decomposed_together():
    target = MLP()
    expected = target(X)
    model = build(target, [("l3", 2), ("l3.pre_identity", 2)], identity_patterns=["l3"])
    assert set(model.module_paths) == {"l3", "l3.pre_identity"}
    out, cache = model.clean_forward(X)
    assert torch.allclose(out, expected, atol=1e-6)
    ones = all_ones(model, (6,))
    assert torch.equal(model.masked_forward(X, [ones], cache), out)
    # Identity zeroed, l3 at all-ones masks with the delta: l3 sees zeros and returns its bias.
    masks = {**ones, "l3.pre_identity": ModuleMask(mask=torch.zeros(6, 2))}
    bias = target.l3.original.bias
    assert torch.allclose(model.masked_forward(X, [masks], cache), bias.expand(6, 2), atol=1e-6)


def test_identity_insertion_errors():
    with pytest.raises(ValueError, match="'nope'"):
        insert_identity_operations(MLP(), ["nope"])
    with pytest.raises(ValueError, match="'emb'"):
        insert_identity_operations(EmbedModel(), ["emb"])


# -- construction errors ---------------------------------------------------------------------


def test_pattern_matching_nothing_raises():
    with pytest.raises(ValueError, match="'missing\\*'"):
        build(MLP(), [("l1", 2), ("missing*", 2)])


def test_module_matched_by_two_patterns_raises():
    with pytest.raises(ValueError, match="module 'l2' is matched by two patterns"):
        build(MLP(), [("l[12]", 2), ("l2", 3)])


def test_unsupported_module_raises():
    class ConvNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 3)
            frozen(self)

    with pytest.raises(ValueError, match="'conv'.*Conv2d"):
        build(ConvNet(), [("conv", 2)])


def test_embedding_needs_mlp_ci_fn():
    with pytest.raises(ValueError, match="'emb'"):
        build(EmbedModel(), [("emb", 2)], ci_fn_type="vector_mlp")


def test_trainable_target_raises():
    target = MLP().requires_grad_(True)
    with pytest.raises(ValueError, match="l1.weight"):
        build(target, [("l1", 2)])


def test_wrappers_replace_modules_in_order():
    target = MLP()
    model = build(target, [("l3", 2), ("l1", 2)])
    assert model.module_paths == ["l1", "l3"]  # registration order, not pattern order
    assert isinstance(target.l1, DecomposedModule) and isinstance(target.l3, DecomposedModule)
    assert isinstance(target.l2, nn.Linear)
    assert model.C("l1") == 2


# -- tied weights ----------------------------------------------------------------------------


class TiedAE(nn.Module):
    """x -> l1 (4 -> 2) -> relu -> l2 (2 -> 4) with l2.weight = l1.weight^T."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.l1 = nn.Linear(4, 2, bias=False)
        self.l2 = nn.Linear(2, 4)
        with torch.no_grad():
            self.l2.weight.copy_(self.l1.weight.T)
        frozen(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.l2(torch.relu(self.l1(x)))


def test_tied_components_share_one_parameter_set():
    info = [("l1", 3), ("l2", 3)]
    tied = build(TiedAE(), info, tied_pairs=[("l1", "l2")])
    untied = build(TiedAE(), info)
    params = list(tied.parameters())
    assert len({p.data_ptr() for p in params}) == len(params)
    assert len(params) == len(list(untied.parameters())) - 2
    comp_params, _ = tied.trainable_parameters()
    assert len(comp_params) == 2
    w1, w2 = tied.comps("l1").weight(), tied.comps("l2").weight()
    assert torch.equal(w2, w1.T)
    assert torch.equal(tied.component_weights("l2"), tied.component_weights("l1").transpose(1, 2))
    deltas = tied.weight_deltas()
    assert torch.allclose(deltas["l2"], deltas["l1"].T)


def test_tied_components_stay_tied_after_an_optimizer_step():
    model = build(TiedAE(), [("l1", 3), ("l2", 3)], tied_pairs=[("l1", "l2")])
    comp_params, ci_params = model.trainable_parameters()
    opt = torch.optim.AdamW(comp_params + ci_params, lr=0.1)
    before = model.comps("l1").V.detach().clone()
    x = torch.randn(5, 4, generator=torch.Generator().manual_seed(8))
    _, cache = model.clean_forward(x)
    masks = {p: ModuleMask(mask=torch.full((5, 3), 0.5)) for p in model.module_paths}
    loss = ((model.masked_forward(x, [masks], cache) - 1) ** 2).mean()
    loss.backward()
    opt.step()
    assert not torch.equal(model.comps("l1").V, before)
    assert torch.equal(model.comps("l2").weight(), model.comps("l1").weight().T)


def test_tied_source_must_come_first():
    with pytest.raises(ValueError, match="tied source 'l2'"):
        build(TiedAE(), [("l1", 3), ("l2", 3)], tied_pairs=[("l2", "l1")])


def test_tied_modules_must_agree_in_C():
    with pytest.raises(ValueError, match="'l1' and 'l2'"):
        build(TiedAE(), [("l1", 3), ("l2", 2)], tied_pairs=[("l1", "l2")])


# -- causal importances ----------------------------------------------------------------------


@pytest.mark.parametrize("ci_fn_type", ["mlp", "vector_mlp", "shared_mlp"])
@pytest.mark.parametrize("hidden", [[4], [4, 3]])
@pytest.mark.parametrize("batch_shape", [(6,), (2, 3)])
def test_ci_fn_output_shapes(ci_fn_type, hidden, batch_shape):
    model = ComponentModel(MLP(), MLP_INFO, ci_fn_type=ci_fn_type, ci_fn_hidden_dims=hidden)
    x = torch.randn(*batch_shape, 3)
    _, cache = model.clean_forward(x)
    ci = model.ci_from_cache(cache)
    for p, c in MLP_INFO:
        for values in (ci.lower, ci.upper, ci.pre_sigmoid):
            assert values[p].shape == (*batch_shape, c)


def test_shared_mlp_without_hidden_layers():
    model = ComponentModel(MLP(), MLP_INFO, ci_fn_type="shared_mlp", ci_fn_hidden_dims=[])
    assert model.causal_importances(X)["l2"].shape == (6, 3)


# swish_hard is left out: a smooth approximation that overshoots [0, 1] slightly (by ~2 %).
@pytest.mark.parametrize("sigmoid_type", ["leaky_hard", "hard", "normal"])
def test_causal_importances_in_unit_interval(sigmoid_type):
    model = build(MLP(), MLP_INFO, sigmoid_type=sigmoid_type)
    with torch.no_grad():
        for p in model.ci_fns.parameters():
            p.mul_(10)  # push pre-activations well outside [0, 1]
    ci = model.causal_importances(torch.randn(50, 3, generator=torch.Generator().manual_seed(9)))
    for v in ci.values():
        assert bool(((v >= 0) & (v <= 1)).all())
    if sigmoid_type in ("leaky_hard", "hard"):
        flat = torch.cat([v.flatten() for v in ci.values()])
        assert bool((flat == 0).any()) and bool((flat == 1).any())


def test_leaky_hard_upper_and_lower():
    model = build(MLP(), MLP_INFO)
    _, cache = model.clean_forward(X)
    ci = model.ci_from_cache(cache)
    for p in model.module_paths:
        z = ci.pre_sigmoid[p]
        assert torch.equal(ci.lower[p], z.clamp(0, 1))
        assert torch.allclose(ci.upper[p], torch.where(z > 1, 1 + 0.01 * (z - 1), z.clamp(0, 1)))


def test_binomial_sampling_perturbs_lower_ci():
    model = build(MLP(), MLP_INFO, sigmoid_type="hard")
    _, cache = model.clean_forward(X)
    ci = model.ci_from_cache(cache, "binomial", Noise(torch.Generator().manual_seed(10)))
    g = torch.Generator().manual_seed(10)
    for p in model.module_paths:
        z = ci.pre_sigmoid[p]
        u = torch.rand(z.shape, generator=g)
        assert torch.allclose(ci.lower[p], (1.05 * z - 0.05 * u).clamp(0, 1), atol=1e-7)
        assert torch.equal(ci.upper[p], z.clamp(0, 1))


def test_mlp_ci_fn_backpropagates_into_V():
    model = build(MLP(), MLP_INFO, ci_fn_type="mlp")
    _, cache = model.clean_forward(X)
    model.ci_from_cache(cache).upper["l2"].sum().backward()
    assert model.comps("l2").V.grad is not None
    assert model.comps("l2").U.grad is None


def test_deepcopy_keeps_outputs():
    model = build(MLP(), MLP_INFO)
    clone = copy.deepcopy(model)
    assert torch.equal(clone(X), model(X))


class TupleOut(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(11)
        self.l1 = nn.Linear(3, 2)
        frozen(self)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.l1(x), x


def test_output_attr_selects_tuple_item():
    target = TupleOut()
    model = build(target, [("l1", 2)], output_attr="idx_0")
    expected = target(X)[0]
    assert torch.equal(model(X), expected)
    out, cache = model.clean_forward(X)
    assert torch.equal(out, expected)
    assert torch.equal(model.masked_forward(X, [all_ones(model, (6,))], cache), expected)


def test_init_scales():
    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l1 = nn.Linear(400, 300)
            frozen(self)

    model = build(Wide(), [("l1", 100)])
    comps = model.comps("l1")
    assert comps.V.shape == (400, 100) and comps.U.shape == (100, 300)
    assert comps.V.std().item() == pytest.approx(400**-0.5, rel=0.05)
    assert comps.U.std().item() == pytest.approx(100**-0.5, rel=0.05)
