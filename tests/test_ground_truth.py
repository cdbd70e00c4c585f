"""Full-length registry decompositions recover known mechanisms (slow: `make test-all`)."""

from pathlib import Path

import pytest
import torch

import spd_ray
from spd_ray.registry import load_experiment


@pytest.mark.slow
def test_tms_5_2_recovers_its_features(tmp_path: Path) -> None:
    torch.set_num_threads(2)
    _, config = load_experiment("tms_5-2")
    result = spd_ray.decompose(config, out=tmp_path, name="gt", progress=False)
    m = result.metrics
    assert m["eval/mmcs/linear1"] >= 0.99
    assert 0.95 <= m["eval/ml2r/linear1"] <= 1.05
    assert m["eval/target_solution_error/linear1"] == 0
    assert m["eval/target_solution_error/linear2"] == 0
    # Clustered down to k = 5, every group is one feature's linear1 subcomponent (input direction
    # V[:, c] on that feature) with the same feature's linear2 one (output direction U[c, :]).
    from spd_ray.clustering import store
    from spd_ray.clustering.ensemble import ClusteringOptions, run_member

    model = spd_ray.load_run(result.run_dir).model
    feature = {
        f"linear1:{c}": int(model.comps("linear1").get_V()[:, c].abs().argmax()) for c in range(20)
    }
    feature |= {
        f"linear2:{c}": int(model.comps("linear2").get_U()[c].abs().argmax()) for c in range(20)
    }
    root = tmp_path / "clustering"
    (root / "members").mkdir(parents=True)
    for member in range(4):
        run_member(str(result.run_dir), None, ClusteringOptions(), member, str(root))
        history, _ = store.load_member(store.member_path(root, member))
        assert history.n == 10  # one live subcomponent per feature and layer
        ids = history.group_idxs[history.row_for_k(5)]
        groups: dict[int, list[str]] = {}
        for label, g in zip(history.labels, ids.tolist(), strict=True):
            groups.setdefault(g, []).append(label)
        for members in groups.values():
            assert sorted(x.split(":")[0] for x in members) == ["linear1", "linear2"], groups
            assert len({feature[x] for x in members}) == 1, groups

    # Attributions: every output feature's strongest input source is its own input, by a margin.
    from attributions.attr_models import input_to_output

    io = input_to_output(spd_ray.load_run(result.run_dir), n_batches=10, batch_size=1024)
    assert io.argmax(1).tolist() == list(range(5))
    off = io - torch.diag(io.diagonal())
    assert (io.diagonal() > 3 * off.abs().max(1).values).all()


@pytest.mark.slow
def test_resid_mlp1_splits_mlp_in_per_feature_and_mlp_out_densely(tmp_path: Path) -> None:
    """The registry resid_mlp1 (20k steps; ~11 min on 2 CPU cores): every mlp_in subcomponent
    that fires answers one feature, mlp_out the dense k = 50 pattern (README table).

    Measured 2026-12-07 (20k steps each): mlp_in 0 at tolerance 0.1 in every run. mlp_out at 0.2 is
    0 in every run; at 0.1 it counts single-feature CIs just above 0.1 on columns past the 50 dense
    ones (which all reach >= 0.95): seed 0 low-rank 1 (feature 60: 0.114), seed 0 dense forward 2
    (feature 60: 0.111, feature 93: 0.102), seed 1 low-rank 0. So mlp_out is held to the pattern
    at 0.2, where no run sits near the line.
    """
    torch.set_num_threads(2)
    _, config = load_experiment("resid_mlp1")
    m = spd_ray.decompose(config, out=tmp_path, name="gt", progress=False).metrics
    assert m["eval/target_solution_error/layers.0.mlp_in"] == 0
    assert m["eval/target_solution_error/total_0p2"] == 0
    assert m["eval/loss/StochasticReconLoss"] < 1e-4


# The other rows of the README's ground-truth table: (experiment, bounds on final eval metrics).
# Bounds are the paper's Table 1 where it has numbers (MMCS 1.000; ML2R within ~3 std of its mean or
# of the recorded run), and exact 0 for every target-solution error the table records. Recorded
# runs (README): tms_5-2-id ML2R 1.0003, tms_40-10 1.0079, tms_40-10-id 1.0324; resid_mlp2 and ih
# as in the table, with room for another machine's float rounding (the paper calls the 2- and
# 3-layer ResidMLP results somewhat seed-sensitive).
TABLE: dict[str, dict[str, tuple[float, float]]] = {
    "tms_5-2-id": {
        "eval/mmcs/linear1": (0.999, 1.0),
        "eval/ml2r/linear1": (0.96, 1.03),
        "eval/target_solution_error/linear1": (0, 0),
        "eval/target_solution_error/linear2": (0, 0),
        "eval/target_solution_error/hidden_layers.0": (0, 0),
    },
    "tms_40-10": {
        "eval/mmcs/linear1": (0.999, 1.0),
        "eval/ml2r/linear1": (0.99, 1.035),
        "eval/target_solution_error/linear1": (0, 0),
        "eval/target_solution_error/linear2": (0, 0),
    },
    "tms_40-10-id": {
        "eval/mmcs/linear1": (0.999, 1.0),
        "eval/ml2r/linear1": (1.01, 1.05),
        "eval/target_solution_error/linear1": (0, 0),
        "eval/target_solution_error/linear2": (0, 0),
        "eval/target_solution_error/hidden_layers.0": (0, 0),
    },
    "resid_mlp2": {  # recorded: identity 0 / 22 on mlp_in, dense 0 / 4 on mlp_out (README)
        "eval/target_solution_error/layers.1.mlp_in": (0, 5),
        "eval/target_solution_error/layers.0.mlp_in": (0, 40),
        "eval/target_solution_error/total": (0, 60),  # 589 at step 5000, 26 at the end
        "eval/loss/StochasticReconSubsetLoss": (0.0, 1e-4),  # recorded 5.2e-5
        "eval/l0/total": (5.0, 15.0),  # recorded 10.1: ~one subcomponent per active feature
    },
    "ih": {
        "eval/loss/StochasticReconLoss": (0.0, 0.05),  # recorded 0.019, from 1.0 at step 0
        "eval/l0/total": (0.0, 60.0),  # recorded 39.0, from 90.7 at step 0
    },
}


# How often a row's run evaluates, where the shipped schedule would double its time on a CPU (the
# final eval and everything trained are the same: spd_ray.runs.RESCHEDULABLE).
SCHEDULE = {"resid_mlp2": ["eval_freq=5000"]}


@pytest.mark.slow
@pytest.mark.parametrize("experiment", sorted(TABLE))
def test_registry_toys_reproduce_the_ground_truth_table(experiment: str, tmp_path: Path) -> None:
    """Minutes (tms_5-2-id, ih) to hours (tms_40-10-id: ~2.6 h on one thread, resid_mlp2 ~2 h)
    on 2 CPU cores."""
    torch.set_num_threads(2)
    _, config = load_experiment(experiment, SCHEDULE.get(experiment, []))
    m = spd_ray.decompose(config, out=tmp_path, name="gt", progress=False).metrics
    for key, (low, high) in TABLE[experiment].items():
        assert low <= m[key] <= high, (key, m[key])
