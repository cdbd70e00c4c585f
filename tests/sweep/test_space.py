"""Search spaces: the reference grid format, distributions in Optuna and Tune form, bad files
naming the key, trial configs on a registry base, and the shipped sweep files."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import optuna
import pytest
import yaml
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.samplers import RandomSampler

from spd_ray.config import ConfigError
from spd_ray.registry import load_experiment, registry
from spd_ray.sweep import (
    Choice,
    IntRange,
    LogUniform,
    Uniform,
    Values,
    load_space,
    short_class,
    short_name,
    trial_config,
    validate_space,
)

SWEEPS = Path(__file__).resolve().parents[2] / "experiments" / "sweeps"
IMP = "loss_metric_configs.ImportanceMinimalityLoss"


@pytest.fixture(scope="module")
def tms():
    return load_experiment("tms_5-2", [])[1]


def write(tmp_path: Path, data: dict, name: str = "space.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


ALL_KINDS = {
    "global": {
        "seed": {"values": [0, 1, 2]},
        "lr_schedule": {"start_val": {"loguniform": [1.0e-6, 1.0e-1]}},
        "loss_metric_configs": [
            {"classname": "ImportanceMinimalityLoss", "pnorm": {"uniform": [0.5, 2.0]}}
        ],
        "n_mask_samples": {"int": [1, 4]},
        "sampling": {"choice": ["continuous", "binomial"]},
    }
}


# ---------------------------------------------------------------------------------------------
# Grid format and merging
# ---------------------------------------------------------------------------------------------


def test_grid_example_is_the_cartesian_product():
    seeds, coeffs, pnorms = [0, 1], [1.0e-3, 3.0e-3, 1.0e-2], [1.0, 2.0]
    # tms_40-10 has no block: the global block alone.
    space = load_space(SWEEPS / "grid_example.yaml", "tms_40-10")
    grid = space.grid()
    assert space.is_grid and space.grid_size == len(grid) == 6
    assert {(p["seed"], p[f"{IMP}.coeff"]) for p in grid} == set(itertools.product(seeds, coeffs))
    assert all(set(p) == {"seed", f"{IMP}.coeff"} for p in grid)

    space = load_space(SWEEPS / "grid_example.yaml", "tms_5-2")
    grid = space.grid()
    assert space.grid_size == len(grid) == 12
    triples = {(p["seed"], p[f"{IMP}.coeff"], p[f"{IMP}.pnorm"]) for p in grid}
    assert triples == set(itertools.product(seeds, coeffs, pnorms))
    assert grid[0] == {"seed": 0, f"{IMP}.coeff": 1.0e-3, f"{IMP}.pnorm": 1.0}
    assert grid[1][f"{IMP}.pnorm"] == 2.0  # the last key varies fastest


def test_experiment_block_merges_over_global(tmp_path):
    path = write(
        tmp_path,
        {
            "global": {
                "seed": {"values": [0, 1]},
                "lr_schedule": {"start_val": {"values": [1.0e-3]}},
                "steps": {"values": [100]},
                "loss_metric_configs": [
                    {"classname": "ImportanceMinimalityLoss", "coeff": {"values": [1.0]}},
                    {"classname": "StochasticReconLoss", "coeff": {"values": [2.0]}},
                ],
                f"{IMP}.pnorm": {"values": [1.5]},  # flat: not part of the list form
            },
            "tms_5-2": {
                "seed": {"values": [7]},
                "lr_schedule.start_val": {"values": [5.0e-3]},  # flat over nested
                "loss_metric_configs": [
                    {"classname": "ImportanceMinimalityLoss", "coeff": {"values": [9.0]}}
                ],
            },
        },
    )
    space = load_space(path, "tms_5-2")
    assert space.params == {
        "seed": Values((7,)),
        "lr_schedule.start_val": Values((5.0e-3,)),
        "steps": Values((100,)),
        f"{IMP}.pnorm": Values((1.5,)),
        f"{IMP}.coeff": Values((9.0,)),  # the list replaced the global list wholesale
    }
    assert set(load_space(path, "resid_mlp1").params) == {
        "seed",
        "lr_schedule.start_val",
        "steps",
        f"{IMP}.coeff",
        "loss_metric_configs.StochasticReconLoss.coeff",
        f"{IMP}.pnorm",
    }
    assert load_space(path, "resid_mlp1").params["seed"] == Values((0, 1))


# ---------------------------------------------------------------------------------------------
# Distributions
# ---------------------------------------------------------------------------------------------


def test_parsed_kinds_and_optuna_forms(tmp_path):
    space = load_space(write(tmp_path, ALL_KINDS), "tms_5-2")
    assert space.params == {
        "seed": Values((0, 1, 2)),
        "lr_schedule.start_val": LogUniform(1.0e-6, 1.0e-1),
        f"{IMP}.pnorm": Uniform(0.5, 2.0),
        "n_mask_samples": IntRange(1, 4),
        "sampling": Choice(("continuous", "binomial")),
    }
    assert not space.is_grid and space.grid_size == 3
    with pytest.raises(ConfigError, match="lr_schedule.start_val"):
        space.grid()
    dists = space.to_optuna()
    assert dists["seed"] == CategoricalDistribution((0, 1, 2))
    lr = dists["lr_schedule.start_val"]
    assert isinstance(lr, FloatDistribution)
    assert (lr.low, lr.high, lr.log) == (1.0e-6, 1.0e-1, True)
    p = dists[f"{IMP}.pnorm"]
    assert isinstance(p, FloatDistribution) and (p.low, p.high, p.log) == (0.5, 2.0, False)
    n = dists["n_mask_samples"]
    assert isinstance(n, IntDistribution) and (n.low, n.high, n.log) == (1, 4, False)
    assert dists["sampling"] == CategoricalDistribution(("continuous", "binomial"))


def test_sample_optuna_stays_in_bounds_and_spreads_over_decades(tmp_path):
    space = load_space(write(tmp_path, ALL_KINDS), "tms_5-2")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=RandomSampler(seed=0))
    samples = []
    for _ in range(200):
        trial = study.ask()
        samples.append(space.sample_optuna(trial))
        study.tell(trial, 0.0)
    assert set(study.trials[0].params) == set(space.params)
    lrs = [s["lr_schedule.start_val"] for s in samples]
    assert all(1.0e-6 <= x <= 1.0e-1 for x in lrs)
    decades = [math.floor(math.log10(x)) for x in lrs]
    counts = {d: decades.count(d) for d in range(-6, -1)}
    assert all(c >= 20 for c in counts.values()), counts  # 40 each when log-uniform
    assert all(0.5 <= s[f"{IMP}.pnorm"] <= 2.0 for s in samples)
    assert {s["n_mask_samples"] for s in samples} == {1, 2, 3, 4}  # both ends inclusive
    assert {s["seed"] for s in samples} == {0, 1, 2}
    assert {s["sampling"] for s in samples} == {"continuous", "binomial"}


def test_non_scalar_choices_travel_as_json(tmp_path, tms):
    path = write(tmp_path, {"global": {"ci_fn_hidden_dims": {"choice": [[8], [16, 16]]}}})
    space = load_space(path, "tms_5-2")
    dist = space.to_optuna()["ci_fn_hidden_dims"]
    assert isinstance(dist, CategoricalDistribution) and dist.choices == ("[8]", "[16, 16]")
    study = optuna.create_study(sampler=RandomSampler(seed=1))
    drawn = {tuple(space.sample_optuna(study.ask())["ci_fn_hidden_dims"]) for _ in range(20)}
    assert drawn == {(8,), (16, 16)}
    assert space.decode_optuna({"ci_fn_hidden_dims": "[16, 16]"}) == {"ci_fn_hidden_dims": [16, 16]}
    cfg = trial_config(tms, {"ci_fn_hidden_dims": [16, 16]})
    assert cfg.ci_fn_hidden_dims == [16, 16]


def test_tune_form(tmp_path):
    from ray.tune.search.sample import Categorical, Float, Integer

    tune_space = load_space(write(tmp_path, ALL_KINDS), "tms_5-2").to_tune()
    assert tune_space["seed"] == {"grid_search": [0, 1, 2]}
    lr = tune_space["lr_schedule.start_val"]
    assert isinstance(lr, Float) and (lr.lower, lr.upper) == (1.0e-6, 1.0e-1)
    assert str(lr.get_sampler()) == "LogUniform"
    p = tune_space[f"{IMP}.pnorm"]
    assert isinstance(p, Float) and str(p.get_sampler()) == "Uniform"
    n = tune_space["n_mask_samples"]
    assert isinstance(n, Integer) and (n.lower, n.upper) == (1, 5)  # randint excludes upper
    c = tune_space["sampling"]
    assert isinstance(c, Categorical) and c.categories == ["continuous", "binomial"]


# ---------------------------------------------------------------------------------------------
# Bad spaces
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "key", "what"),
    [
        ({"seed": 3}, "seed", "not a search-space leaf"),
        ({"ci_fn_hidden_dims": [8, 16]}, "ci_fn_hidden_dims", "not a search-space leaf"),
        ({"seed": {"gaussian": [0, 1]}}, "seed", "unknown distribution 'gaussian'"),
        ({"lr_schedule": {"start_val": {"uniform": [2.0, 1.0]}}}, "lr_schedule.start_val", "lo <"),
        ({"n_mask_samples": {"int": [3, 3]}}, "n_mask_samples", "lo < hi"),
        ({f"{IMP}.coeff": {"loguniform": [0.0, 1.0]}}, f"{IMP}.coeff", "lo > 0"),
        ({"seed": {"values": []}}, "seed", "non-empty list"),
        ({"seed": {"choice": 3}}, "seed", "non-empty list"),
        ({"steps": {"uniform": ["a", 3]}}, "steps", "must be numeric"),
        ({"steps": {"int": [1.5, 3]}}, "steps", "must be integer"),
        ({"steps": {"uniform": [1]}}, "steps", r"takes \[lo, hi\]"),
        ({"steps": {"loguniform": ["1e-4", 1.0]}}, "steps", "1.000000e-04"),
        ({"steps": {"values": [1], "uniform": [1, 2]}}, "steps", "exactly one key"),
        ({"lr_schedule": {}}, "lr_schedule", "empty mapping"),
        ({"loss_metric_configs": [{"coeff": {"values": [1]}}]}, "loss_metric_configs", "classname"),
        (
            {"loss_metric_configs": [{"classname": "ImportanceMinimalityLoss"}]},
            "loss_metric_configs",
            "nothing to sweep",
        ),
    ],
)
def test_bad_space_names_file_and_key(tmp_path, block, key, what):
    path = write(tmp_path, {"global": block})
    with pytest.raises(ConfigError) as err:
        load_space(path, "tms_5-2")
    assert str(path) in str(err.value) and key in str(err.value)
    assert re.search(what, str(err.value)), str(err.value)


def test_bad_top_level(tmp_path):
    with pytest.raises(ConfigError, match="unknown block.*tms_5_2"):
        load_space(write(tmp_path, {"tms_5_2": {"seed": {"values": [1]}}}), "tms_5-2")
    with pytest.raises(ConfigError, match="no parameters to sweep for tms_5-2"):
        load_space(write(tmp_path, {"resid_mlp1": {"seed": {"values": [1]}}}), "tms_5-2")
    with pytest.raises(ConfigError, match="given twice"):
        block = {
            "lr_schedule": {"start_val": {"values": [1]}},
            "lr_schedule.start_val": {"values": [2]},
        }
        load_space(write(tmp_path, {"global": block}), "tms_5-2")
    with pytest.raises(ConfigError, match="not found"):
        load_space(tmp_path / "missing.yaml", "tms_5-2")


# ---------------------------------------------------------------------------------------------
# Trial configs
# ---------------------------------------------------------------------------------------------


def test_trial_config_sets_the_named_item_only(tms):
    cfg = trial_config(tms, {f"{IMP}.coeff": 0.02, "lr_schedule.start_val": 4.0e-3, "seed": 3})
    before, after = tms.model_dump(), cfg.model_dump()
    imp = [i for i, m in enumerate(tms.loss_metric_configs) if m.classname in IMP]
    assert len(imp) == 1 and after["loss_metric_configs"][imp[0]]["coeff"] == 0.02
    assert tms.loss_metric_configs[imp[0]].coeff == 3.0e-3
    before["loss_metric_configs"][imp[0]]["coeff"] = 0.02
    before["lr_schedule"]["start_val"] = 4.0e-3
    before["seed"] = 3
    assert after == before  # nothing else moved, the other losses included


def test_trial_config_rejects_bad_values_and_keys(tms):
    with pytest.raises(ConfigError, match=rf"{IMP}.coeff='lots'.*valid number"):
        trial_config(tms, {f"{IMP}.coeff": "lots"})
    with pytest.raises(ConfigError, match=r"lr_schedule.warmup=0.1: not a config key"):
        trial_config(tms, {"lr_schedule.warmup": 0.1})
    with pytest.raises(ConfigError, match="loss_metric_configs.NoSuchLoss.coeff=1.0"):
        trial_config(tms, {"loss_metric_configs.NoSuchLoss.coeff": 1.0})
    with pytest.raises(ConfigError, match=r"slow_eval_freq=333.*multiple of eval_freq"):
        trial_config(tms, {"slow_eval_freq": 333})
    with pytest.raises(ConfigError, match="sweep parameter seed.x"):
        trial_config(tms, {"seed.x": 1})


def test_validate_space_reports_every_bad_key(tmp_path, tms):
    path = write(
        tmp_path,
        {
            "global": {
                "stepz": {"values": [10]},
                "lr_schedule": {"warmup": {"uniform": [0.0, 0.1]}},
                "steps": {"uniform": [100.0, 200.0]},  # a float range over an int field
                f"{IMP}.coeff": {"loguniform": [1.0e-4, 1.0e-2]},
            }
        },
    )
    with pytest.raises(ConfigError) as err:
        validate_space(tms, load_space(path, "tms_5-2"))
    msg = str(err.value)
    assert str(path) in msg
    assert "stepz=10: not a config key" in msg
    assert "lr_schedule.warmup=0.0: not a config key" in msg
    assert re.search(r"steps=13\d\.\d+: .*integer", msg)
    assert f"{IMP}.coeff" not in msg


SHIPPED = [
    ("tms_5-2.yaml", "tms_5-2", 3),
    ("resid_mlp1.yaml", "resid_mlp1", 3),
    ("grid_example.yaml", "tms_5-2", 3),
    ("grid_example.yaml", "resid_mlp1", 2),
    ("tiny_llama.yaml", "tiny_llama", 3),
]


@pytest.mark.parametrize(("name", "experiment", "n_params"), SHIPPED)
def test_shipped_sweep_files(name, experiment, n_params):
    path = SWEEPS / name
    assert path.read_text().startswith("#")
    space = load_space(path, experiment)
    assert len(space.params) == n_params
    validate_space(load_experiment(experiment, [])[1], space)
    if name != "grid_example.yaml":
        assert isinstance(space.params[f"{IMP}.coeff"], LogUniform)
        assert isinstance(space.params["lr_schedule.start_val"], LogUniform)
        assert f"{IMP}.pnorm" in space.params
        assert f"spd-ray sweep {experiment} --space experiments/sweeps/{name}" in path.read_text()


def test_every_sweep_file_is_covered():
    assert {p.name for p in SWEEPS.glob("*.yaml")} == {name for name, _, _ in SHIPPED}


@pytest.mark.parametrize("path", sorted(SWEEPS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_file_is_valid_for_every_experiment_it_covers(path: Path):
    """Each block of the file on its experiment, and a `global` block on every registry
    experiment, gives a space whose every probe is a valid trial config."""
    data = yaml.safe_load(path.read_text())
    assert path.read_text().startswith("#") and isinstance(data, dict)
    covered = set(registry()) if "global" in data else set(data)
    assert covered, path
    for experiment in sorted(covered):
        space = load_space(path, experiment)
        assert space.params, (path, experiment)
        validate_space(load_experiment(experiment, [])[1], space)


# ---------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------


def test_short_names():
    assert short_class("ImportanceMinimalityLoss") == "ImpMin"
    assert short_class("StochasticReconLoss") == "StochRecon"
    assert short_class("StochasticReconLayerwiseLoss") == "StochReconLayer"
    assert short_class("CIMaskedReconSubsetLoss") == "CIMaskReconSub"
    name = short_name({f"{IMP}.coeff": 0.0031234, "seed": 1, "ci_fn_hidden_dims": [8, 8]})
    assert name == "ImpMin.coeff-0.00312_seed-1_ci_fn_hidden_dims-~8~8~"
    long_a = {f"key_{i}": i / 7 for i in range(20)}
    long_b = {**long_a, "key_19": 99.0}
    a, b = short_name(long_a, max_len=60), short_name(long_b, max_len=60)
    assert len(a) == len(b) == 60 and a != b and a[:40] == b[:40]
    assert re.fullmatch(r"[A-Za-z0-9._+~-]+_[0-9a-f]{8}", a)
