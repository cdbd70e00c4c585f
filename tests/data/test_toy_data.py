import pytest
import torch

from spd_ray.config import ResidMLPTargetConfig, ResidMLPTaskConfig, TMSTargetConfig, TMSTaskConfig
from spd_ray.data.toy import SparseFeatureDataset, ToyBatches, make_toy_dataset
from spd_ray.targets.resid_mlp import ResidMLP
from spd_ray.targets.tms import TMSModel


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_at_least_zero_active_fraction_and_range():
    p = 0.2
    ds = SparseFeatureDataset(50, p, "at_least_zero_active", value_range=(-1.0, 1.0))
    x = ds.generate_batch(20_000, gen())
    assert x.shape == (20_000, 50)
    assert abs((x != 0).float().mean().item() - p) < 0.05
    assert x.min() >= -1.0 and x.max() < 1.0
    assert (x < 0).any() and (x > 0).any()


@pytest.mark.parametrize(
    ("kind", "n"),
    [
        ("exactly_one_active", 1),
        ("exactly_two_active", 2),
        ("exactly_three_active", 3),
        ("exactly_four_active", 4),
        ("exactly_five_active", 5),
    ],
)
def test_exactly_n_active(kind: str, n: int):
    ds = SparseFeatureDataset(7, 0.5, kind, value_range=(0.0, 1.0))  # type: ignore[arg-type]
    x = ds.generate_batch(5_000, gen(1))
    assert ((x != 0).sum(dim=1) == n).all()
    assert x.min() >= 0.0 and x.max() < 1.0
    # Every feature gets picked about equally often.
    counts = (x != 0).sum(dim=0).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.1


def test_synced_inputs_fire_together_and_leave_other_features_alone():
    groups = [[0, 3], [1, 4, 5]]
    ds = SparseFeatureDataset(8, 0.2, "at_least_zero_active", (0.0, 1.0), synced_inputs=groups)
    plain = SparseFeatureDataset(8, 0.2, "at_least_zero_active", (0.0, 1.0))
    x, base = ds.generate_batch(4_000, gen(2)), plain.generate_batch(4_000, gen(2))
    active = x != 0
    for group in groups:
        # all or none of a group, in every row
        assert (active[:, group].all(dim=1) | ~active[:, group].any(dim=1)).all()
        # a group fires where any of its features fired in the unsynced draw, and keeps those values
        fired = (base[:, group] != 0).any(dim=1)
        assert torch.equal(active[:, group].any(dim=1), fired)
        kept = base[:, group] != 0
        assert torch.equal(x[:, group][kept], base[:, group][kept])
    # features outside the groups are the unsynced draw exactly; filled values are in range
    assert torch.equal(x[:, [2, 6, 7]], base[:, [2, 6, 7]])
    assert x.min() >= 0.0 and x.max() < 1.0
    # P(group of 2 fires) = 1 - 0.8^2 = 0.36; of 3: 1 - 0.8^3 = 0.488
    assert abs(active[:, 0].float().mean().item() - 0.36) < 0.03
    assert abs(active[:, 1].float().mean().item() - 0.488) < 0.03


def test_synced_inputs_are_checked():
    with pytest.raises(
        ValueError, match=r"synced_inputs group \[1, 9\] names a feature >= n_features 8"
    ):
        SparseFeatureDataset(8, 0.2, "at_least_zero_active", (0.0, 1.0), synced_inputs=[[1, 9]])
    with pytest.raises(ValueError, match=r"feature\(s\) \[2\] in two groups"):
        TMSTaskConfig(feature_probability=0.1, synced_inputs=[[1, 2], [2, 3]])
    with pytest.raises(ValueError, match="two or more distinct features"):
        TMSTaskConfig(feature_probability=0.1, synced_inputs=[[1]])


def test_generate_batch_uses_only_the_given_generator():
    ds = SparseFeatureDataset(10, 0.3, "at_least_zero_active", value_range=(0.0, 1.0))
    torch.manual_seed(0)
    a = ds.generate_batch(64, gen(3))
    torch.manual_seed(1)
    b = ds.generate_batch(64, gen(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("world_size", [2, 4])
def test_rank_shards_concatenate_to_the_single_worker_batch(world_size: int):
    ds = SparseFeatureDataset(5, 0.1, "at_least_zero_active", value_range=(0.0, 1.0))
    single = ToyBatches(ds, 64, seed=7)
    shards = [ToyBatches(ds, 64, seed=7, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(3):
        local = [next(s) for s in shards]
        assert all(b.shape == (64 // world_size, 5) for b in local)
        assert torch.equal(torch.cat(local), next(single))


def test_batch_size_must_divide_by_world_size():
    ds = SparseFeatureDataset(5, 0.1, "at_least_zero_active", value_range=(0.0, 1.0))
    with pytest.raises(ValueError, match="not divisible by world_size 3"):
        ToyBatches(ds, 64, seed=0, rank=0, world_size=3)


def test_state_dict_resume_gives_identical_batches():
    ds = SparseFeatureDataset(5, 0.1, "exactly_two_active", value_range=(0.0, 1.0))
    stream = ToyBatches(ds, 32, seed=3)
    for _ in range(5):
        next(stream)
    state = stream.state_dict()
    expected = [next(stream) for _ in range(3)]

    # A fresh stream, here on 2 ranks: the state is independent of the world size.
    resumed = [ToyBatches(ds, 32, seed=3, rank=r, world_size=2) for r in range(2)]
    for r in resumed:
        r.load_state_dict(state)
        assert r.batches_served == 5
    for batch in expected:
        assert torch.equal(torch.cat([next(r) for r in resumed]), batch)


def test_make_toy_dataset_value_ranges():
    tms = TMSModel(TMSTargetConfig(n_features=5, n_hidden=2))
    ds = make_toy_dataset(TMSTaskConfig(feature_probability=0.05), tms)
    assert (ds.n_features, ds.value_range, ds.feature_probability) == (5, (0.0, 1.0), 0.05)

    resid = ResidMLP(ResidMLPTargetConfig(n_features=6, d_embed=8, d_mlp=3, n_layers=1))
    task = ResidMLPTaskConfig(feature_probability=0.01, data_generation_type="exactly_one_active")
    ds = make_toy_dataset(task, resid)
    assert (ds.n_features, ds.value_range, ds.data_generation_type) == (
        6,
        (-1.0, 1.0),
        "exactly_one_active",
    )
    with pytest.raises(ValueError, match="task_name 'tms'"):
        make_toy_dataset(TMSTaskConfig(feature_probability=0.05), resid)
