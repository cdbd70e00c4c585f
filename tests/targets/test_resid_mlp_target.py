import pytest
import torch
import torch.nn.functional as F

from spd_ray.config import ResidMLPTargetConfig
from spd_ray.data.toy import SparseFeatureDataset
from spd_ray.targets.resid_mlp import ResidMLP, low_rank_forward, train_resid_mlp, training_loss


def small_cfg(**kw: object) -> ResidMLPTargetConfig:
    base: dict[str, object] = dict(n_features=12, d_embed=40, d_mlp=6, n_layers=2)
    return ResidMLPTargetConfig(**(base | kw))  # type: ignore[arg-type]


def test_module_names_shapes_and_unit_embedding():
    model = ResidMLP(small_cfg())
    names = [n for n, _ in model.named_modules()]
    assert [n for n in names if n.startswith("layers.") and n.count(".") == 2] == [
        "layers.0.mlp_in",
        "layers.0.mlp_out",
        "layers.1.mlp_in",
        "layers.1.mlp_out",
    ]
    assert model.layers[0].mlp_in.weight.shape == (6, 40)
    assert model.layers[0].mlp_out.weight.shape == (40, 6)
    assert model.W_E.shape == (12, 40)
    torch.testing.assert_close(model.W_E.norm(dim=1), torch.ones(12))
    assert [n for n, _ in model.named_parameters()] == [
        "layers.0.mlp_in.weight",
        "layers.0.mlp_out.weight",
        "layers.1.mlp_in.weight",
        "layers.1.mlp_out.weight",
    ]
    assert model(torch.randn(3, 12)).shape == (3, 12)
    assert model(torch.randn(2, 4, 12)).shape == (2, 4, 12)


def test_forward_formula_and_low_rank_forward():
    model = ResidMLP(small_cfg(act_fn_name="gelu"))
    x = torch.randn(5, 12)
    resid = x @ model.W_E
    for block in model.layers:
        resid = resid + block.mlp_out(F.gelu(block.mlp_in(resid)))
    torch.testing.assert_close(model(x), resid @ model.W_E.T)
    torch.testing.assert_close(low_rank_forward(model, x), model(x), rtol=1e-4, atol=1e-5)


def test_embedding_and_labels_fixed_by_seed():
    a, b = ResidMLP(small_cfg(seed=1)), ResidMLP(small_cfg(seed=1))
    assert torch.equal(a.W_E, b.W_E)
    assert not torch.equal(a.W_E, ResidMLP(small_cfg(seed=2)).W_E)


def test_labels():
    x = torch.linspace(-1, 1, 12).repeat(2, 1)
    trivial = ResidMLP(small_cfg())
    assert torch.equal(trivial.label_coeffs, torch.ones(12))
    torch.testing.assert_close(trivial.labels(x), F.relu(x) + x)

    coeffs = ResidMLP(small_cfg(use_trivial_label_coeffs=False, label_type="abs"))
    c = coeffs.label_coeffs
    assert ((c >= 1) & (c <= 2)).all() and not torch.equal(c, torch.ones(12))
    torch.testing.assert_close(coeffs.labels(x), (c * x).abs())

    gelu = ResidMLP(small_cfg(use_trivial_label_coeffs=False, act_fn_name="gelu"))
    torch.testing.assert_close(gelu.labels(x), F.gelu(gelu.label_coeffs * x) + x)


def eval_losses(model: ResidMLP, n: int = 50_000) -> dict[str, float]:
    """Trained loss vs two trivial baselines: MLPs off (residual only), and the monosemantic
    solution where each of the first n_layers * d_mlp features gets its own neuron."""
    cfg = model.config
    ds = SparseFeatureDataset(
        cfg.n_features, cfg.feature_probability, "at_least_zero_active", (-1, 1)
    )
    x = ds.generate_batch(n, torch.Generator().manual_seed(123))
    y = model.labels(x)
    mono = ResidMLP(cfg)
    with torch.no_grad():
        off = F.mse_loss(x @ model.W_E @ model.W_E.T, y).item()
        for i, block in enumerate(mono.layers):
            feats = model.W_E[i * cfg.d_mlp : (i + 1) * cfg.d_mlp]
            block.mlp_in.weight.zero_()
            block.mlp_out.weight.zero_()
            block.mlp_in.weight[: len(feats)] = feats
            block.mlp_out.weight[:, : len(feats)] = feats.T
        return {
            "trained": F.mse_loss(model(x), y).item(),
            "mlp_off": off,
            "monosemantic": F.mse_loss(mono(x), y).item(),
        }


def test_train_small_resid_mlp_beats_trivial_baselines():
    cfg = ResidMLPTargetConfig(
        n_features=20, d_embed=100, d_mlp=10, n_layers=1, steps=500, feature_probability=0.05
    )
    model = train_resid_mlp(cfg)
    assert not model.training
    losses = eval_losses(model)
    assert losses["trained"] < 0.5 * losses["mlp_off"]
    assert losses["trained"] < losses["monosemantic"]


def test_train_resid_mlp1_beats_trivial_baselines():
    """The resid_mlp1 target (~3 s on 2 idle cores)."""
    cfg = ResidMLPTargetConfig(n_features=100, d_embed=1000, d_mlp=50, n_layers=1, steps=1000)
    losses = eval_losses(train_resid_mlp(cfg))
    assert losses["trained"] < 0.5 * losses["mlp_off"]
    assert losses["trained"] < 0.6 * losses["monosemantic"]


def test_biases_enter_the_forward_and_the_low_rank_forward():
    model = ResidMLP(small_cfg(in_bias=True, out_bias=True))
    for block in model.blocks:
        assert torch.equal(block.mlp_in.bias, torch.zeros(block.mlp_in.out_features))
        with torch.no_grad():
            block.mlp_in.bias.normal_()
            block.mlp_out.bias.normal_()
    x = torch.randn(5, 12)
    resid = x @ model.W_E
    for block in model.blocks:
        pre = resid @ block.mlp_in.weight.T + block.mlp_in.bias
        resid = resid + F.relu(pre) @ block.mlp_out.weight.T + block.mlp_out.bias
    torch.testing.assert_close(model(x), resid @ model.W_E.T)
    torch.testing.assert_close(low_rank_forward(model, x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(
        low_rank_forward(model, x, read_off=False), model.residual(x), rtol=1e-4, atol=1e-5
    )


def test_identity_and_trainable_embeddings():
    ident = ResidMLP(small_cfg(embedding="identity", d_embed=12))
    assert torch.equal(ident.W_E, torch.eye(12)) and "W_E" in dict(ident.named_buffers())
    with pytest.raises(ValueError, match="d_embed == n_features"):
        small_cfg(embedding="identity", d_embed=20)
    trained = ResidMLP(small_cfg(embedding="trainable"))
    fixed = ResidMLP(small_cfg())
    assert "W_E" in dict(trained.named_parameters())
    assert torch.equal(trained.W_E.detach(), fixed.W_E)  # same random unit rows at init
    cfg = small_cfg(embedding="trainable", steps=3)
    model = train_resid_mlp(cfg)
    assert not torch.equal(model.W_E.detach(), fixed.W_E)  # trained
    assert torch.equal(train_resid_mlp(small_cfg(steps=3)).W_E, fixed.W_E)  # fixed stays


def test_label_function_seed_is_separate_from_the_embedding_seed():
    base = {"use_trivial_label_coeffs": False}
    a = ResidMLP(small_cfg(**base, seed=1, label_fn_seed=7))
    b = ResidMLP(small_cfg(**base, seed=2, label_fn_seed=7))
    c = ResidMLP(small_cfg(**base, seed=1))
    assert torch.equal(a.label_coeffs, b.label_coeffs) and not torch.equal(a.W_E, b.W_E)
    expected = 1.0 + torch.rand(12, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a.label_coeffs, expected)
    assert not torch.equal(a.label_coeffs, c.label_coeffs)


def test_training_losses_by_hand():
    x = torch.randn(6, 12)
    readoff = ResidMLP(small_cfg(feature_importance_decay=0.5))
    weights = 0.5 ** torch.arange(12.0)
    expected = ((readoff(x) - readoff.labels(x)) ** 2 * weights).mean()
    torch.testing.assert_close(training_loss(readoff, x), expected, rtol=1e-4, atol=1e-6)
    plain = ResidMLP(small_cfg())
    torch.testing.assert_close(
        training_loss(plain, x), F.mse_loss(plain(x), plain.labels(x)), rtol=1e-4, atol=1e-6
    )
    resid = ResidMLP(small_cfg(loss_type="resid"))
    expected = F.mse_loss(resid.residual(x), resid.labels(x) @ resid.W_E)
    torch.testing.assert_close(training_loss(resid, x), expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="readoff"):
        small_cfg(loss_type="resid", feature_importance_decay=0.9)
