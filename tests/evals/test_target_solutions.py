import pytest
import torch

from spd_ray.evals.target_solutions import (
    dense_distance,
    identity_distance,
    match_patterns,
    permute_by_pattern,
    permute_to_dense,
    permute_to_identity,
)


def test_perfect_identity_is_zero():
    ci = torch.eye(4)
    permuted, perm = permute_to_identity(ci)
    assert perm.tolist() == [0, 1, 2, 3]
    assert torch.equal(permuted, ci)
    assert identity_distance(ci, 0.1) == 0


def test_permuted_identity_is_recovered():
    perm_true = torch.tensor([2, 0, 3, 1])
    ci = torch.eye(4)[:, perm_true]  # column j of ci is e_{perm_true[j]}
    permuted, perm = permute_to_identity(ci)
    assert torch.equal(permuted, torch.eye(4))
    assert torch.equal(ci[:, perm], permuted)
    assert identity_distance(ci, 0.1) == 0


def test_swapped_pair_is_permuted_back():
    ci = torch.eye(3)[:, [1, 0, 2]]
    _, perm = permute_to_identity(ci)
    assert perm.tolist() == [1, 0, 2]
    assert identity_distance(ci, 0.1) == 0


def test_missing_diagonal_counts_one():
    ci = torch.eye(3)
    ci[1, 1] = 0.5
    assert identity_distance(ci, 0.1) == 1
    # 0.85 misses 1 - 0.1 but not 1 - 0.2.
    ci[1, 1] = 0.85
    assert identity_distance(ci, 0.1) == 1
    assert identity_distance(ci, 0.2) == 0


def test_spurious_entries_count_including_extra_columns():
    ci = torch.zeros(3, 5)
    ci[0, 0] = ci[1, 1] = ci[2, 2] = 1.0
    ci[0, 1] = 0.3  # off-diagonal in the square block
    ci[2, 4] = 0.5  # in an extra column
    ci[1, 3] = 0.05  # below tol
    assert identity_distance(ci, 0.1) == 2
    _, perm = permute_to_identity(ci)
    # Extra columns follow the matched ones by mass: column 4 (0.5) before column 3 (0.05).
    assert perm.tolist() == [0, 1, 2, 4, 3]


def test_two_features_on_one_column():
    # Features 0 and 1 both use column 0; column 1 is dead. One of them gets column 1 (a missing
    # diagonal) and the other's entry in column 0 is off-diagonal: 2 errors.
    ci = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    assert identity_distance(ci, 0.1) == 2


def test_identity_needs_enough_columns():
    with pytest.raises(ValueError, match="C >= n_features"):
        identity_distance(torch.ones(3, 2), 0.1)


def test_fewer_columns_than_features_permutation():
    ci = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    _, perm = permute_to_identity(ci)
    assert perm.tolist() == [1, 0]  # matched to features 1 and 2, in feature order


def test_hungarian_and_greedy_agree_on_easy_case():
    g = torch.Generator().manual_seed(0)
    n, C = 20, 30
    true_perm = torch.randperm(C, generator=g)
    ci = torch.zeros(n, C)
    ci[torch.arange(n), true_perm[:n]] = 0.9 + 0.1 * torch.rand(n, generator=g)
    ci += 0.05 * torch.rand(n, C, generator=g)
    ci = ci.clamp(0, 1)
    p_h, perm_h = permute_to_identity(ci, method="hungarian")
    p_g, perm_g = permute_to_identity(ci, method="greedy")
    assert torch.equal(perm_h, perm_g)
    assert torch.equal(perm_h[:n], true_perm[:n])
    assert torch.equal(p_h, p_g)
    assert identity_distance(ci, 0.1, method="hungarian") == 0
    assert identity_distance(ci, 0.1, method="greedy") == 0


def test_greedy_can_be_suboptimal_but_hungarian_is_not():
    # Greedy takes 0.9 at (0, 0) and is left with (1, 1) = 0; Hungarian takes 0.8 + 0.8.
    ci = torch.tensor([[0.9, 0.8], [0.8, 0.0]])
    assert permute_to_identity(ci, method="greedy")[1].tolist() == [0, 1]
    assert permute_to_identity(ci, method="hungarian")[1].tolist() == [1, 0]


def test_permute_to_dense_sorts_by_mass():
    ci = torch.tensor([[0.1, 1.0, 0.5], [0.0, 1.0, 0.5]])
    permuted, perm = permute_to_dense(ci)
    assert perm.tolist() == [1, 2, 0]
    assert torch.equal(permuted, ci[:, perm])


def test_dense_all_ones_is_zero():
    ci = torch.zeros(5, 6)
    ci[:, [1, 4]] = 1.0
    assert dense_distance(ci, k=2, tol=0.1) == 0


def test_dense_missing_strong_and_spurious():
    ci = torch.zeros(4, 5)
    ci[:, 0] = 1.0
    ci[:, 1] = 0.7  # second dense column never reaches 0.9: 1 error
    ci[2, 3] = 0.4  # a spurious entry in a remaining column: 1 error
    ci[1, 4] = 0.05  # below tol
    assert dense_distance(ci, k=2, tol=0.1) == 2
    assert dense_distance(ci, k=1, tol=0.1) == 5  # column 1 (4 entries) and the 0.4 are spurious
    assert dense_distance(ci, k=2, tol=0.35) == 1  # 0.7 >= 0.65 now; 0.4 > 0.35 still counts


def test_dense_column_needs_only_one_strong_entry():
    ci = torch.zeros(3, 3)
    ci[0, 0] = 1.0
    ci[1, 0] = ci[2, 0] = 0.5
    assert dense_distance(ci, k=1, tol=0.1) == 0


def test_dense_k_out_of_range():
    with pytest.raises(ValueError, match="k <= C"):
        dense_distance(torch.ones(2, 2), k=3, tol=0.1)


def test_match_patterns_errors():
    paths = ["layers.0.mlp_in", "layers.0.mlp_out", "layers.1.mlp_in"]
    assert match_patterns(paths, ["*.mlp_in"], "x") == {
        "layers.0.mlp_in": "*.mlp_in",
        "layers.1.mlp_in": "*.mlp_in",
    }
    with pytest.raises(ValueError, match="'nothing.\\*'"):
        match_patterns(paths, ["nothing.*"], "x")
    with pytest.raises(ValueError, match="matches both"):
        match_patterns(paths, ["*.mlp_in", "layers.0.*"], "x")


def test_permute_by_pattern():
    ci = {"a": torch.eye(3)[:, [2, 0, 1]], "b": torch.tensor([[0.0, 1.0], [0.0, 1.0]])}
    out = permute_by_pattern(ci, identity_patterns=None, dense_patterns=["b"])
    assert torch.equal(out["a"][0], torch.eye(3))
    assert out["b"][1].tolist() == [1, 0]
    with pytest.raises(ValueError, match="both"):
        permute_by_pattern(ci, identity_patterns=["*"], dense_patterns=["b"])
