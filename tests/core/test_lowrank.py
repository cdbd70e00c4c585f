"""LowRank (wide activations kept as read @ write terms) and ResidMLP's masked forwards on them:
the same outputs, losses and gradients as the dense forwards, for every loss class."""

from __future__ import annotations

import pytest
import torch
from test_model import _all_loss_configs, loss_with_grads

from spd_ray.config import ResidMLPTargetConfig
from spd_ray.core.lowrank import LowRank, Term, linear_terms
from spd_ray.core.model import ComponentModel, ModuleMask
from spd_ray.targets.resid_mlp import ResidMLP


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_low_rank_algebra_against_the_dense_matrices():
    g = _g(0)
    r1, w1 = torch.randn(5, 2, generator=g), torch.randn(2, 7, generator=g)
    r2, w2 = torch.randn(5, 3, generator=g), torch.randn(3, 7, generator=g)
    a = LowRank([Term("one", r1, w1)]) + LowRank([Term("two", r2, w2)])
    dense = r1 @ w1 + r2 @ w2
    assert a.shape == (5, 7)
    torch.testing.assert_close(a.dense(), dense)
    m = torch.randn(7, 4, generator=g)
    torch.testing.assert_close(a.matmul(m), dense @ m)
    torch.testing.assert_close(a.row_slice(1, 4).dense(), dense[1:4])
    torch.testing.assert_close(a.repeat(3).dense(), dense.repeat(3, 1))
    # Rows stacked from pieces: each term stays on its piece's rows (a key's adjacent terms
    # merge), and the products are placed there.
    b = LowRank([Term("two", r2[:2], w2)])
    c = LowRank([Term("one", r1[:3], w1)])
    stacked = LowRank.cat([a, b, c])
    assert [(t.key, t.start, t.stop) for t in stacked.terms] == [
        ("one", 0, 5),
        ("two", 0, 7),
        ("one", 7, 10),
    ]
    want = torch.cat([dense, r2[:2] @ w2, r1[:3] @ w1])
    torch.testing.assert_close(stacked.dense(), want)
    torch.testing.assert_close(stacked.matmul(m), want @ m)
    torch.testing.assert_close(stacked.row_slice(4, 9).dense(), want[4:9])
    torch.testing.assert_close(stacked.row_slice(4, 9).repeat(2).dense(), want[4:9].repeat(2, 1))
    assert [t.stop - t.start for t in stacked.row_slice(5, 7).terms] == [2]  # only "two" there
    # A linear map as terms: scale * (x @ W^T) + b.
    x, W, bias = torch.randn(5, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(4)
    s = torch.rand(5, 1, generator=g)
    torch.testing.assert_close(
        LowRank(linear_terms("l", x, W, bias, s)).dense(), s * (x @ W.T) + bias
    )
    with pytest.raises(AssertionError, match="is not inside"):
        LowRank([Term("one", r1, w1), Term("two", r2, w2, start=1)], rows=5)


class CountingResidMLP(ResidMLP):
    """Counts the forwards that form the residual stream (dense) and those that keep it as terms."""

    dense_calls = 0
    low_rank_calls = 0

    def _blocks(self, residual):  # type: ignore[no-untyped-def]
        self.dense_calls += 1
        return super()._blocks(residual)

    def low_rank_blocks(self, residual):  # type: ignore[no-untyped-def]
        self.low_rank_calls += 1
        return super().low_rank_blocks(residual)


def _resid_mlp(n_layers: int = 2) -> CountingResidMLP:
    cfg = ResidMLPTargetConfig(
        n_features=6, d_embed=24, d_mlp=4, n_layers=n_layers, in_bias=True, out_bias=True
    )
    target = CountingResidMLP(cfg)
    with torch.no_grad():
        for p in target.parameters():  # biases are zero at init; make them count
            p.add_(0.3 * torch.randn(p.shape, generator=_g(1)))
    return target.requires_grad_(False)


def _model(low_rank: bool) -> ComponentModel:
    torch.manual_seed(7)
    info = [("layers.*.mlp_in", 5), ("layers.*.mlp_out", 3)]
    return ComponentModel(
        _resid_mlp(), info, ci_fn_type="mlp", ci_fn_hidden_dims=[4], low_rank_forward=low_rank
    )


def _module_mask(C: int, g: torch.Generator, delta: bool, route: bool) -> ModuleMask:
    return ModuleMask(
        mask=torch.rand(8, C, generator=g),
        delta=torch.rand(8, generator=g) if delta else None,
        route=(torch.rand(8, generator=g) < 0.5) if route else None,
    )


def test_masked_copies_on_terms_equal_the_dense_forward():
    """Stacked copies mixing replaced, kept-target and routed modules with delta masks, the
    second layer's mlp_in reading a stream some copies changed: outputs, recorded inputs and
    gradients as the dense forward."""
    g = _g(2)
    x = torch.randn(8, 6, generator=g)
    x[[1, 5]] = 0
    results = []
    for low_rank in (True, False):
        model = _model(low_rank)
        assert model.low_rank is low_rank
        target = model.target
        assert isinstance(target, CountingResidMLP)
        with torch.no_grad():
            target_out, cache = model.clean_forward(x)
        calls = lambda: (target.low_rank_calls, target.dense_calls)  # noqa: E731, B023
        assert calls() == ((1, 0) if low_rank else (0, 1))  # the clean forward, too
        paths = model.module_paths
        clean = (target_out, [cache.inputs[p] for p in paths], [cache.acts(p) for p in paths])
        gm = _g(3)

        def mm(path: str, delta: bool, route: bool) -> ModuleMask:
            return _module_mask(model.C(path), gm, delta, route)  # noqa: B023 - called at once

        copies = [
            {p: mm(p, True, False) for p in paths},  # every module, with delta
            {paths[0]: mm(paths[0], False, False)},  # layer 0's mlp_in alone
            {paths[3]: mm(paths[3], True, True)},  # the last mlp_out, routed
            {paths[1]: mm(paths[1], False, True), paths[2]: mm(paths[2], True, False)},
            {},  # the target
        ]
        recorded: dict[str, torch.Tensor] = {}
        out = model.masked_forward(x, copies, cache, record_inputs=recorded)
        assert calls() == ((2, 0) if low_rank else (0, 2))
        (out**2).sum().backward()
        grads = [p.grad.clone() for p in model.components.parameters()]
        results.append((out.detach(), recorded, grads, clean))
    (out_lr, rec_lr, grads_lr, clean_lr), (out_d, rec_d, grads_d, clean_d) = results
    torch.testing.assert_close(clean_lr, clean_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_lr, out_d, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out_lr[32:], clean_d[0], rtol=1e-5, atol=1e-6)  # copy 4: the target
    for p in rec_d:
        torch.testing.assert_close(rec_lr[p], rec_d[p], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_lr, grads_d, strict=True):
        assert b.abs().sum() > 0
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("cfg", _all_loss_configs(), ids=lambda c: c.classname)
def test_every_loss_on_terms_equals_the_dense_loss(cfg):
    """Each loss class, with the delta component, on a 2-layer ResidMLP with biases: value and
    every gradient as with dense masked forwards."""
    x = torch.randn(16, 6, generator=_g(5))
    x[::3] = 0
    values, grads = [], []
    for low_rank in (True, False):
        model = _model(low_rank)
        value, _ = loss_with_grads(model, x, cfg, delta=True)
        values.append(value.detach())
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    assert values[0].item() > 0
    torch.testing.assert_close(values[0], values[1], rtol=1e-5, atol=1e-7)
    for a, b in zip(*grads, strict=True):
        if b is None:
            assert a is None
            continue
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
