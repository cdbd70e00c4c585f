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
