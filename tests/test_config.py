"""The config tree: errors name the key, `--set` overrides, IO round trip of the shipped YAMLs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from spd_ray import config as C
from spd_ray.config import ConfigError, apply_overrides, load_config, read_config_dict, save_config

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"
# The registry's run configs (experiments/*.yaml; tests/test_registry.py checks each loads).
RUN_CONFIGS = sorted(EXPERIMENTS.glob("*.yaml"))


def _base() -> dict[str, Any]:
    return read_config_dict(EXPERIMENTS / "tms_5-2.yaml")


def _write(tmp_path: Path, data: dict[str, Any]) -> Path:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_unknown_key_is_named(tmp_path):
    data = _base()
    data["learning_rat"] = 0.1
    with pytest.raises(ConfigError, match="learning_rat"):
        load_config(_write(tmp_path, data))


def test_unknown_nested_key_is_named(tmp_path):
    data = _base()
    data["loss_metric_configs"][0]["pnrom"] = 2.0
    with pytest.raises(ConfigError, match="pnrom") as err:
        load_config(_write(tmp_path, data))
    assert str(tmp_path / "cfg.yaml") in str(err.value)


def test_loss_without_coeff_is_named(tmp_path):
    data = _base()
    data["loss_metric_configs"] = [{"classname": "StochasticReconLoss"}]
    with pytest.raises(ConfigError, match="coeff"):
        load_config(_write(tmp_path, data))


def test_C_zero_is_named(tmp_path):
    data = _base()
    data["module_info"][0]["C"] = 0
    with pytest.raises(ConfigError, match=r"module_info\.0\.C"):
        load_config(_write(tmp_path, data))


def test_unknown_classname_is_rejected(tmp_path):
    data = _base()
    data["loss_metric_configs"].append({"classname": "NoSuchLoss", "coeff": 1.0})
    with pytest.raises(ConfigError, match="NoSuchLoss|classname"):
        load_config(_write(tmp_path, data))


def test_constant_schedule_needs_flat_end():
    with pytest.raises(ValueError, match="final_val_frac"):
        C.ScheduleConfig(start_val=1.0, fn_type="constant", final_val_frac=0.5)


def test_configs_are_frozen():
    cfg = load_config(EXPERIMENTS / "tms_5-2.yaml")
    with pytest.raises(ValueError):
        cfg.steps = 3  # type: ignore[misc]


def test_overrides_scalars_lists_and_mappings():
    data = apply_overrides(
        _base(),
        [
            "steps=5",
            "lr_schedule.start_val=0.25",
            "use_delta_component=false",
            "wandb_project=null",
            "slow_eval_freq=null",
            "ci_fn_hidden_dims=[4, 8]",
            "task_config={task_name: tms, feature_probability: 0.2}",
            "seed=7",
        ],
    )
    cfg = C.config_from_dict(data)
    assert cfg.steps == 5
    assert cfg.lr_schedule.start_val == 0.25
    assert cfg.lr_schedule.fn_type == "cosine"  # untouched siblings stay
    assert cfg.use_delta_component is False
    assert cfg.wandb_project is None
    assert cfg.slow_eval_freq is None
    assert cfg.ci_fn_hidden_dims == [4, 8]
    assert isinstance(cfg.task_config, C.TMSTaskConfig)
    assert cfg.task_config.feature_probability == 0.2
    assert cfg.seed == 7


def test_override_exponent_float():
    # YAML 1.1 reads "1e-3" as a string; the validated config must still hold the number.
    cfg = C.config_from_dict(apply_overrides(_base(), ["lr_schedule.start_val=1e-3"]))
    assert cfg.lr_schedule.start_val == pytest.approx(1e-3)


def test_override_does_not_mutate_input():
    data = _base()
    apply_overrides(data, ["steps=5"])
    assert data["steps"] == _base()["steps"]


def test_override_loss_item_by_classname():
    data = apply_overrides(
        _base(),
        [
            "loss_metric_configs.ImportanceMinimalityLoss.coeff=0.5",
            "loss_metric_configs.ImportanceMinimalityLoss.pnorm=2",
        ],
    )
    cfg = C.config_from_dict(data)
    items = {c.classname: c for c in cfg.loss_metric_configs}
    im = items["ImportanceMinimalityLoss"]
    assert isinstance(im, C.ImportanceMinimalityLoss)
    assert (im.coeff, im.pnorm) == (0.5, 2.0)
    assert len(cfg.loss_metric_configs) == len(_base()["loss_metric_configs"])
    assert [c.classname for c in cfg.loss_metric_configs] == [
        c["classname"] for c in _base()["loss_metric_configs"]
    ]


def test_override_new_classname_appends_item():
    data = apply_overrides(_base(), ["loss_metric_configs.FaithfulnessLoss.coeff=2"])
    cfg = C.config_from_dict(data)
    assert len(cfg.loss_metric_configs) == len(_base()["loss_metric_configs"]) + 1
    last = cfg.loss_metric_configs[-1]
    assert isinstance(last, C.FaithfulnessLoss) and last.coeff == 2.0


def test_override_whole_item():
    data = apply_overrides(
        _base(),
        ["loss_metric_configs.PGDReconLoss={coeff: 1, init: ones, step_size: 0.1, n_steps: 2}"],
    )
    last = C.config_from_dict(data).loss_metric_configs[-1]
    assert isinstance(last, C.PGDReconLoss)
    assert (last.init, last.n_steps) == ("ones", 2)


def test_bad_overrides():
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides(_base(), ["steps"])
    with pytest.raises(ConfigError, match="steps"):
        apply_overrides(_base(), ["steps.inner=1"])


def test_load_config_applies_overrides():
    cfg = load_config(EXPERIMENTS / "tms_5-2.yaml", ["steps=11", "batch_size=3"])
    assert (cfg.steps, cfg.batch_size) == (11, 3)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
@pytest.mark.parametrize("path", RUN_CONFIGS, ids=lambda p: p.stem)
def test_save_load_round_trip(tmp_path, suffix, path):
    cfg = load_config(path)
    out = tmp_path / f"saved{suffix}"
    save_config(cfg, out)
    assert load_config(out) == cfg


def test_all_module_info_adds_identity_paths():
    data = _base()
    data["identity_module_info"] = [{"module_pattern": "linear2", "C": 3}]
    cfg = C.config_from_dict(data)
    pats = [(m.module_pattern, m.C) for m in cfg.all_module_info]
    assert pats[-1] == ("linear2.pre_identity", 3)
    assert pats[:-1] == [(m["module_pattern"], m["C"]) for m in data["module_info"]]


# -- the target: one kind, resolved from the flat (reference-compatible) fields -----------------


def _target_config(**fields: Any) -> C.Config:
    data = {k: v for k, v in _base().items() if not k.startswith("pretrained_model")}
    data.pop("target_model", None)
    return C.config_from_dict({**data, **fields})


TMS = {"model_type": "tms", "n_features": 5, "n_hidden": 2}


def test_a_toy_target_needs_no_model_class() -> None:
    target = _target_config(target_model=TMS).target
    assert isinstance(target, C.ToyTarget)
    assert target.model_class == "spd_ray.targets.tms.TMSModel"
    assert (target.model.n_features, target.model.n_hidden) == (5, 2)


def test_a_saved_file_wins_over_a_toy_config_and_a_toy_over_a_hub_name() -> None:
    both = _target_config(target_model=TMS, pretrained_model_path="/x/target.pt")
    assert both.target == C.FileTarget("/x/target.pt", None)
    toy_and_hub = _target_config(
        target_model=TMS,
        pretrained_model_name="gpt2",
        pretrained_model_class="transformers.GPT2LMHeadModel",
    )
    assert isinstance(toy_and_hub.target, C.ToyTarget)
    assert toy_and_hub.target.model_class == "transformers.GPT2LMHeadModel"


def test_a_hub_target_needs_its_class_and_output_attr() -> None:
    hub = _target_config(
        pretrained_model_name="gpt2",
        pretrained_model_class="transformers.GPT2LMHeadModel",
        pretrained_model_output_attr="logits",
    )
    assert hub.target == C.HubTarget("gpt2", "transformers.GPT2LMHeadModel", "logits")
    with pytest.raises(ConfigError, match="pretrained_model_class is required"):
        _target_config(pretrained_model_name="gpt2", pretrained_model_output_attr="logits")
    with pytest.raises(ConfigError, match="pretrained_model_output_attr is required"):
        _target_config(
            pretrained_model_name="gpt2", pretrained_model_class="transformers.GPT2LMHeadModel"
        )
    with pytest.raises(ConfigError, match="one of pretrained_model_path, pretrained_model_name"):
        _target_config()


def test_config_hash_ignores_defaults_stated_or_added() -> None:
    plain = C.TMSTargetConfig(n_features=5, n_hidden=2)
    stated = C.TMSTargetConfig(n_features=5, n_hidden=2, tied_weights=False, seed=0)
    assert C.config_hash(plain) == C.config_hash(stated)
    assert C.config_hash(plain) != C.config_hash(
        C.TMSTargetConfig(n_features=5, n_hidden=2, seed=1)
    )

    class WithNewField(C.TMSTargetConfig):
        new_option: bool = False

    assert C.config_hash(WithNewField(n_features=5, n_hidden=2)) == C.config_hash(plain)
