import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

import spd_ray.targets.loading as loading
from spd_ray.config import Config, ResidMLPTargetConfig, TMSTargetConfig, config_from_dict
from spd_ray.io import atomic_write
from spd_ray.targets import (
    ResidMLP,
    TMSModel,
    cached_target_path,
    load_target,
    load_target_file,
    save_target,
    target_fingerprint,
)

TINY_RESID = {
    "model_type": "resid_mlp",
    "n_features": 5,
    "d_embed": 16,
    "d_mlp": 4,
    "n_layers": 1,
    "steps": 20,
    "batch_size": 64,
    "feature_probability": 0.1,
}


def make_config(**target: Any) -> Config:
    data: dict[str, Any] = {
        "n_mask_samples": 1,
        "module_info": [{"module_pattern": "layers.*.mlp_in", "C": 4}],
        "loss_metric_configs": [{"classname": "StochasticReconLoss", "coeff": 1.0}],
        "output_loss_type": "mse",
        "lr_schedule": {"start_val": 1e-3},
        "steps": 10,
        "batch_size": 8,
        "eval_freq": 10,
        "n_eval_steps": 1,
        "pretrained_model_class": "spd_ray.targets.resid_mlp.ResidMLP",
        "target_model": TINY_RESID,
        "task_config": {"task_name": "resid_mlp", "feature_probability": 0.1},
    }
    return config_from_dict(data | target)


def assert_frozen(model: torch.nn.Module) -> None:
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())


def test_toy_target_is_trained_once_then_loaded_from_cache(tmp_path, monkeypatch, capsys):
    config = make_config()
    first = load_target(config, tmp_path)
    assert isinstance(first, ResidMLP)
    assert_frozen(first)
    path = cached_target_path(config.target_model, tmp_path)  # type: ignore[arg-type]
    assert path.parent.name.startswith("resid_mlp-")
    assert "training target resid_mlp-" in capsys.readouterr().err
    saved_cfg = yaml.safe_load((path.parent / "target_config.yaml").read_text())
    assert ResidMLPTargetConfig(**saved_cfg) == config.target_model
    assert [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")] == []
    mtime = path.stat().st_mtime_ns

    def no_training(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the cached target was retrained")

    monkeypatch.setattr(loading, "train_toy", no_training)
    second = load_target(config, tmp_path)
    assert path.stat().st_mtime_ns == mtime
    assert capsys.readouterr().err == ""
    for a, b in zip(first.state_dict().values(), second.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_pretrained_model_path_relative_to_cwd(tmp_path, monkeypatch):
    cfg = TMSTargetConfig(n_features=5, n_hidden=2, tied_weights=True)
    model = TMSModel(cfg)
    with torch.no_grad():
        model.linear1.weight.mul_(2.0)
        model.linear2.weight.copy_(model.linear1.weight.T)
    save_target(model, cfg, tmp_path / "sub" / "tms.pt")
    monkeypatch.chdir(tmp_path)
    config = make_config(
        pretrained_model_path="sub/tms.pt",
        pretrained_model_class="spd_ray.targets.tms.TMSModel",
        target_model=None,
        task_config={"task_name": "tms", "feature_probability": 0.05},
    )
    loaded = load_target(config, tmp_path / "out")
    assert isinstance(loaded, TMSModel)
    assert_frozen(loaded)
    assert loaded.tied_module_pairs == [("linear1", "linear2")]
    assert torch.equal(loaded.linear1.weight, model.linear1.weight)
    assert torch.equal(loaded.linear2.weight, loaded.linear1.weight.T)
    assert not (tmp_path / "out").exists()


def test_missing_target_file_names_the_path(tmp_path):
    missing = tmp_path / "nope" / "target.pt"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_target(make_config(pretrained_model_path=str(missing)), tmp_path)
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_target_file(missing)


def test_wrong_pretrained_model_class(tmp_path):
    save_target(
        ResidMLP(ResidMLPTargetConfig(**TINY_RESID)),
        ResidMLPTargetConfig(**TINY_RESID),
        tmp_path / "t.pt",
    )
    wrong = make_config(
        pretrained_model_path=str(tmp_path / "t.pt"),
        pretrained_model_class="spd_ray.targets.tms.TMSModel",
    )
    with pytest.raises(TypeError, match="pretrained_model_class is 'spd_ray.targets.tms.TMSModel'"):
        load_target(wrong, tmp_path)
    bad = make_config(pretrained_model_class="spd_ray.targets.nowhere.Model")
    with pytest.raises(ValueError, match="pretrained_model_class 'spd_ray.targets.nowhere.Model'"):
        load_target(bad, tmp_path)


def test_not_a_target_file(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a target file"):
        load_target_file(path)


def test_atomic_write_leaves_old_file_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")

    def fail(tmp: Path) -> None:
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


# ---- target_fingerprint ----------------------------------------------------------------------


def test_fingerprint_is_stable_over_save_and_reload_and_sees_every_weight(tiny_lm_assets, tmp_path):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    llama = LlamaForCausalLM.from_pretrained(str(tiny_lm_assets.llama))
    fp = target_fingerprint(llama)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert target_fingerprint(llama) == fp
    llama.save_pretrained(tmp_path / "copy")
    assert target_fingerprint(LlamaForCausalLM.from_pretrained(str(tmp_path / "copy"))) == fp

    # One weight moved by 1e-3 (the last entry of the last layer), then moved back.
    w = llama.model.layers[-1].mlp.down_proj.weight
    old = w[-1, -1].item()
    with torch.no_grad():
        w[-1, -1] += 1e-3
        changed = target_fingerprint(llama)
        w[-1, -1] = old
    assert changed != fp
    assert target_fingerprint(llama) == fp

    # Another architecture, the same class with another shape, another dtype.
    gpt2 = GPT2LMHeadModel.from_pretrained(str(tiny_lm_assets.gpt2))
    one_layer = LlamaForCausalLM.from_pretrained(str(tiny_lm_assets.llama_1l))
    bf16 = LlamaForCausalLM.from_pretrained(str(tiny_lm_assets.llama)).to(torch.bfloat16)
    fps = {fp, target_fingerprint(gpt2), target_fingerprint(one_layer), target_fingerprint(bf16)}
    assert len(fps) == 4
    # Tied embeddings (GPT-2) survive a reload too.
    gpt2.save_pretrained(tmp_path / "gpt2")
    reloaded = GPT2LMHeadModel.from_pretrained(str(tmp_path / "gpt2"))
    assert target_fingerprint(reloaded) == target_fingerprint(gpt2)


def test_fingerprint_of_a_toy_target_file_and_of_its_class(tmp_path):
    cfg = ResidMLPTargetConfig(**TINY_RESID)
    model = loading.build_toy(cfg)
    save_target(model, cfg, tmp_path / "t.pt")
    loaded = load_target_file(tmp_path / "t.pt")
    assert target_fingerprint(loaded) == target_fingerprint(model)

    class Renamed(ResidMLP):
        pass

    other = Renamed(cfg)
    other.load_state_dict(model.state_dict())
    assert target_fingerprint(other) != target_fingerprint(model)  # same weights, other class


def test_fingerprint_is_the_same_in_another_process(tiny_lm_assets):
    from transformers import LlamaForCausalLM

    code = (
        "import sys; from transformers import LlamaForCausalLM; "
        "from spd_ray.targets import target_fingerprint; "
        "print(target_fingerprint(LlamaForCausalLM.from_pretrained(sys.argv[1])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_lm_assets.llama)],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONHASHSEED": "123"},
    ).stdout
    here = target_fingerprint(LlamaForCausalLM.from_pretrained(str(tiny_lm_assets.llama)))
    assert out.strip().splitlines()[-1] == here


def test_fingerprint_hashes_at_least_100_mb_per_s():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        vocab_size=4096,
    )
    model = LlamaForCausalLM(cfg)
    n_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    assert n_bytes > 100e6
    start = time.perf_counter()
    target_fingerprint(model)
    seconds = time.perf_counter() - start
    # About 1.3 GB/s on one core of the development machine; 13x slack for a busy host.
    assert n_bytes / seconds > 100e6, f"{n_bytes / seconds / 1e6:.0f} MB/s"
