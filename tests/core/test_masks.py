"""Stochastic masks, routers and the worker-split-invariant noise."""

import pytest
import torch

from spd_ray.core.masks import (
    Noise,
    all_routes,
    delta_mask,
    single_module_routes,
    static_probability_routes,
    stochastic_mask,
    uniform_k_subset_routes,
)

PATHS = ["a", "b", "c", "d"]
CPU = torch.device("cpu")


def _noise(seed: int = 0, rank: int = 0, world_size: int = 1) -> Noise:
    return Noise(torch.Generator().manual_seed(seed), rank, world_size)


def test_uniform_k_subset_counts():
    n_pos = 40_000
    routes = uniform_k_subset_routes(PATHS, (n_pos,), CPU, _noise())
    assert list(routes) == PATHS
    assert all(r.shape == (n_pos,) and r.dtype == torch.bool for r in routes.values())
    k = torch.stack(list(routes.values()), -1).sum(-1)
    assert int(k.min()) >= 1 and int(k.max()) <= len(PATHS)
    # k ~ U{1..4}: frequency 1/4 each; the std of a frequency is ~0.002, tolerance 0.015.
    freq = torch.bincount(k, minlength=5)[1:].float() / n_pos
    assert torch.allclose(freq, torch.full((4,), 0.25), atol=0.015)
    # Each module is routed with probability E[k] / n = (n + 1) / (2 n) = 0.625 (module symmetry).
    for r in routes.values():
        assert r.float().mean().item() == pytest.approx(0.625, abs=0.015)


def test_uniform_k_subset_batch_dims():
    routes = uniform_k_subset_routes(PATHS[:2], (3, 5), CPU, _noise())
    k = torch.stack(list(routes.values()), -1).sum(-1)
    assert k.shape == (3, 5)
    assert bool(((k >= 1) & (k <= 2)).all())


def test_static_probability_routes():
    ones = static_probability_routes(PATHS, (100,), 1.0, CPU, _noise())
    assert all(bool(r.all()) for r in ones.values())
    part = static_probability_routes(PATHS, (20_000,), 0.3, CPU, _noise(1))
    frac = torch.stack(list(part.values())).float().mean().item()
    assert frac == pytest.approx(0.3, abs=0.01)  # std ~0.0016 over 80k draws


def test_all_and_single_routes():
    assert all_routes(PATHS) == dict.fromkeys(PATHS)
    assert single_module_routes("b") == {"b": None}


def test_noise_split_across_workers_equals_one_worker():
    full = _noise(7).rand((6, 4), CPU, torch.float32)
    r0 = _noise(7, rank=0, world_size=2).rand((3, 4), CPU, torch.float32)
    r1 = _noise(7, rank=1, world_size=2).rand((3, 4), CPU, torch.float32)
    assert torch.equal(torch.cat([r0, r1]), full)

    full_int = _noise(7).randint(0, 100, (6, 2), CPU)
    i0 = _noise(7, rank=0, world_size=2).randint(0, 100, (3, 2), CPU)
    i1 = _noise(7, rank=1, world_size=2).randint(0, 100, (3, 2), CPU)
    assert torch.equal(torch.cat([i0, i1]), full_int)

    u0 = _noise(7, rank=0, world_size=2).rand_unbatched((5,), CPU, torch.float32)
    u1 = _noise(7, rank=1, world_size=2).rand_unbatched((5,), CPU, torch.float32)
    assert torch.equal(u0, u1)


def test_routes_split_across_workers_equal_one_worker():
    full = uniform_k_subset_routes(PATHS, (8,), CPU, _noise(3))
    halves = [uniform_k_subset_routes(PATHS, (4,), CPU, _noise(3, r, 2)) for r in range(2)]
    for p in PATHS:
        assert torch.equal(torch.cat([h[p] for h in halves]), full[p])


def test_continuous_mask_matches_formula():
    ci = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.75, 0.1]])
    mask = stochastic_mask(ci, "continuous", _noise(5))
    u = torch.rand(ci.shape, generator=torch.Generator().manual_seed(5))
    assert torch.allclose(mask, ci + (1 - ci) * u, rtol=1e-6, atol=0)
    assert bool((mask >= ci).all()) and bool((mask <= 1).all())


def test_binomial_masks_are_ci_or_one():
    ci = torch.rand(2000, 3, generator=torch.Generator().manual_seed(0)) * 0.9
    mask = stochastic_mask(ci, "binomial", _noise(1))
    is_ci = mask == ci
    is_one = mask == 1
    assert bool((is_ci | is_one).all())
    assert is_one.float().mean().item() == pytest.approx(0.5, abs=0.03)


def test_delta_mask_is_uniform_per_position():
    like = torch.zeros(4, 3, 7)
    d = delta_mask((4, 3), like, _noise(2))
    assert torch.equal(d, torch.rand((4, 3), generator=torch.Generator().manual_seed(2)))
