import pytest
import torch

from spd_ray.config import TMSTargetConfig
from spd_ray.targets.tms import TMSModel, shared_tied_weight, tms_features_represented, train_tms


def test_module_names_and_shapes():
    model = TMSModel(TMSTargetConfig(n_features=5, n_hidden=2, n_hidden_layers=2))
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "linear1.weight",
        "hidden_layers.0.weight",
        "hidden_layers.1.weight",
        "linear2.weight",
        "linear2.bias",
    ]
    assert model.hidden_layers[0] is not model.hidden_layers[1]
    out = model(torch.rand(3, 5))
    assert out.shape == (3, 5) and (out >= 0).all()
    assert model.tied_module_pairs == []
    assert not hasattr(TMSModel(TMSTargetConfig(n_features=5, n_hidden=2)), "hidden_layers")


def test_init_is_deterministic_in_the_config():
    cfg = TMSTargetConfig(n_features=5, n_hidden=2, seed=3)
    a, b = TMSModel(cfg), TMSModel(cfg)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_tied_training_shares_one_parameter():
    cfg = TMSTargetConfig(n_features=5, n_hidden=2, tied_weights=True)
    model = TMSModel(cfg)
    with shared_tied_weight(model):
        params = list(model.parameters())
        assert len(params) == 2  # linear1.weight and linear2.bias
        model(torch.rand(4, 5)).sum().backward()
        assert model.linear1.weight.grad is not None
    assert isinstance(model.linear2.weight, torch.nn.Parameter)
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)
    assert model.linear2.weight.data_ptr() != model.linear1.weight.data_ptr()


def test_train_tms_5_2_represents_every_feature():
    model = train_tms(TMSTargetConfig(n_features=5, n_hidden=2))
    assert tms_features_represented(model) == [True] * 5
    x = 0.75 * torch.eye(5)
    torch.testing.assert_close(model(x).diagonal(), x.diagonal(), atol=0.15, rtol=0)


def test_train_tms_tied_with_identity_hidden_layer():
    cfg = TMSTargetConfig(
        n_features=5,
        n_hidden=2,
        n_hidden_layers=1,
        fix_hidden_identity=True,
        tied_weights=True,
        steps=3000,
    )
    model = train_tms(cfg)
    assert model.tied_module_pairs == [("linear1", "linear2")]
    assert torch.equal(model.linear2.weight, model.linear1.weight.T)
    assert torch.equal(model.hidden_layers[0].weight, torch.eye(2))
    assert not model.hidden_layers[0].weight.requires_grad
    assert all(tms_features_represented(model))


def test_features_represented_flags_a_dead_feature():
    model = TMSModel(TMSTargetConfig(n_features=3, n_hidden=3, init_bias_to_zero=True))
    with torch.no_grad():
        model.linear1.weight.copy_(torch.eye(3))
        model.linear2.weight.copy_(torch.eye(3))
        model.linear2.weight[1, 1] = -1.0  # feature 1's output is dead
    assert tms_features_represented(model) == [True, False, True]


def test_train_tms_raises_when_no_seed_works():
    # Three steps never learn 5 features in 2 dims.
    with pytest.raises(RuntimeError, match="failed to represent every feature"):
        train_tms(TMSTargetConfig(n_features=5, n_hidden=2, steps=3, lr=1e-6))


def test_decomposed_hidden_layer_still_runs_in_the_forward() -> None:
    """SPD swaps hidden_layers.0 for a wrapper; the TMS forward must still call it."""
    from spd_ray.config import TMSTargetConfig
    from spd_ray.core.model import ComponentModel
    from spd_ray.targets.tms import TMSModel

    cfg = TMSTargetConfig(n_features=5, n_hidden=2, n_hidden_layers=1, fix_hidden_identity=True)
    target = TMSModel(cfg).requires_grad_(False)
    x = torch.rand(4, 5)
    expected = target(x)
    model = ComponentModel(target, [("linear1", 3), ("hidden_layers.0", 3), ("linear2", 3)])
    out, cache = model.clean_forward(x)
    assert list(cache.inputs) == ["linear1", "hidden_layers.0", "linear2"]
    torch.testing.assert_close(out, expected)


def test_fixed_random_hidden_layers_stay_at_their_init_while_the_rest_trains() -> None:
    from spd_ray.targets.tms import _train_once

    cfg = TMSTargetConfig(
        n_features=5, n_hidden=3, n_hidden_layers=2, fixed_random_hidden_layers=True, steps=30
    )
    init = TMSModel(cfg, generator=torch.Generator().manual_seed(4))
    trained = _train_once(cfg, seed=4, progress=False)
    for before, after in zip(init.hidden_layers, trained.hidden_layers, strict=True):
        assert torch.equal(before.weight, after.weight)
        assert not after.weight.requires_grad
        assert not torch.equal(before.weight, torch.eye(3))  # random, not the identity
    assert not torch.equal(init.linear1.weight, trained.linear1.weight)
    with pytest.raises(ValueError, match="exclude each other"):
        TMSTargetConfig(
            n_features=5, n_hidden=2, fix_hidden_identity=True, fixed_random_hidden_layers=True
        )
