"""The CI sigmoids: forward values and the straight-through leaks of the leaky-hard pair."""

import pytest
import torch

from spd_ray.core.ci import (
    LEAK,
    hard_sigmoid,
    lower_leaky_hard_sigmoid,
    sigmoid_pair,
    swish_hard_sigmoid,
    upper_leaky_hard_sigmoid,
)

Z = torch.tensor([-2.0, -0.5, 0.0, 0.25, 0.5, 1.0, 1.5, 3.0])


def _grad(fn, z: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor:
    z = z.clone().requires_grad_(True)
    fn(z).backward(upstream)
    assert z.grad is not None
    return z.grad


def test_lower_leaky_hard_forward_is_clamp():
    assert torch.equal(lower_leaky_hard_sigmoid(Z), Z.clamp(0, 1))


def test_lower_leaky_hard_backward():
    z = torch.tensor([-2.0, -0.5, 0.0, 0.25, 1.0, 1.5])
    # Negative upstream gradient (the loss wants z larger): leaks 0.01 g at z <= 0.
    g_neg = _grad(lower_leaky_hard_sigmoid, z, torch.full_like(z, -3.0))
    assert torch.allclose(g_neg, torch.tensor([-0.03, -0.03, -0.03, -3.0, -3.0, 0.0]))
    # Positive upstream gradient: nothing below 0, g inside (0, 1], nothing above 1.
    g_pos = _grad(lower_leaky_hard_sigmoid, z, torch.full_like(z, 2.0))
    assert torch.equal(g_pos, torch.tensor([0.0, 0.0, 0.0, 2.0, 2.0, 0.0]))


def test_upper_leaky_hard_forward_and_grad():
    out = upper_leaky_hard_sigmoid(Z)
    expected = torch.tensor([0.0, 0.0, 0.0, 0.25, 0.5, 1.0, 1.0 + 0.01 * 0.5, 1.0 + 0.01 * 2.0])
    assert torch.allclose(out, expected, rtol=1e-6, atol=0)
    # z = 0 itself is left out: the subgradient there is a convention.
    z = torch.tensor([-2.0, -0.5, 0.25, 0.5, 1.5, 3.0])
    grad = _grad(upper_leaky_hard_sigmoid, z, torch.ones_like(z))
    assert torch.allclose(grad, torch.tensor([0.0, 0.0, 1.0, 1.0, LEAK, LEAK]))


def test_hard_and_swish_hard():
    assert torch.equal(hard_sigmoid(Z), Z.clamp(0, 1))
    s = swish_hard_sigmoid(torch.tensor([-1.0, 0.5, 2.0]))
    assert abs(s[0].item()) < 1e-3
    assert s[1].item() == pytest.approx(0.5, abs=1e-6)  # symmetric around z = 0.5
    assert abs(s[2].item() - 1.0) < 1e-3


@pytest.mark.parametrize(
    ("sigmoid_type", "lower", "upper"),
    [
        ("leaky_hard", lower_leaky_hard_sigmoid, upper_leaky_hard_sigmoid),
        ("hard", hard_sigmoid, hard_sigmoid),
        ("normal", torch.sigmoid, torch.sigmoid),
        ("swish_hard", swish_hard_sigmoid, swish_hard_sigmoid),
        ("upper_leaky_hard", upper_leaky_hard_sigmoid, upper_leaky_hard_sigmoid),
    ],
)
def test_sigmoid_pair(sigmoid_type, lower, upper):
    lo, up = sigmoid_pair(sigmoid_type)
    assert torch.equal(lo(Z), lower(Z))
    assert torch.equal(up(Z), upper(Z))
