"""End to end: `spd-ray run tiny_llama --in-process` on the offline tiny-LM assets, and the bad
inputs that must fail before any training (exit code 2, one line naming the culprit).

The output root of each test gets `assets/tiny-lm`, so the registry config's `@tiny-lm/...` names
resolve to the session's assets (untrained models: the run contract) or to a briefly trained
tiny Llama (the recovery test, where the decomposition has something to recover).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from cli_args import spd_ray_cmd

from spd_ray.targets.tiny_lm import CORPUS, LLAMA, TOKENIZER, TinyLMAssets

CE_KL = "eval/ce_kl/"


def _cli(*args: str, out: Path, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "SPD_RAY_OUT": str(out),
        "SPD_RAY_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(cache),
    }
    return subprocess.run(
        spd_ray_cmd(*args, "--in-process"),
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _out_with_assets(tmp_path: Path, assets: TinyLMAssets) -> Path:
    out = tmp_path / "out"
    (out / "assets").mkdir(parents=True)
    (out / "assets" / "tiny-lm").symlink_to(assets.root)
    return out


# Fewer eval batches and no figures: the test checks the run, not the plots.
FAST = [
    "--set",
    "n_eval_steps=1",
    "--set",
    "faithfulness_warmup_steps=20",
    "--set",
    "eval_metric_configs=[{classname: CEandKLLosses}, {classname: CI_L0}]",
]


def test_tiny_llama_run_contract(
    tiny_lm_assets: TinyLMAssets, hf_datasets_cache: Path, tmp_path: Path
):
    out = _out_with_assets(tmp_path, tiny_lm_assets)
    res = _cli(
        "run",
        "tiny_llama",
        "--steps",
        "6",
        "--name",
        "t",
        "--set",
        "eval_freq=3",
        "--set",
        "slow_eval_freq=6",
        "--set",
        "train_log_freq=3",
        *FAST,
        out=out,
        cache=hf_datasets_cache,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    assert run_dir == out / "t"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt"):
        assert (run_dir / name).exists(), name
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if "train/loss/total" in m] == [3, 6]
    assert [m["step"] for m in metrics if f"{CE_KL}kl_ci_masked" in m] == [0, 3, 6]
    summary = json.loads((run_dir / "summary.json").read_text())
    final = summary["final_eval"]
    for kind in ("ci_masked", "stoch_masked", "unmasked", "random_masked", "rounded_masked"):
        for stat in ("kl", "ce_difference", "ce_unrecovered"):
            assert math.isfinite(final[f"{CE_KL}{stat}_{kind}"]), (stat, kind)
    assert final[f"{CE_KL}ce_unrecovered_zero"] == pytest.approx(1.0)
    assert final[f"{CE_KL}ce_target"] > 0
    # The summary's evals are the logged ones at steps 0 and 6.
    (step0,) = [m for m in metrics if m["step"] == 0 and f"{CE_KL}kl_ci_masked" in m]
    (step6,) = [m for m in metrics if m["step"] == 6 and f"{CE_KL}kl_ci_masked" in m]
    initial = summary["initial_eval"]
    for key in (f"{CE_KL}kl_ci_masked", f"{CE_KL}ce_target", "eval/l0/total"):
        assert initial[key] == pytest.approx(step0[key], rel=1e-6), key
        assert final[key] == pytest.approx(step6[key], rel=1e-6), key
    # Random components do not reproduce the target: a positive KL at step 0, and the
    # unrecovered CE is the CE difference over that of the zero masks, by hand.
    assert initial[f"{CE_KL}kl_ci_masked"] > 1e-4
    for evals in (initial, final):
        zero = evals[f"{CE_KL}ce_difference_zero"]
        assert zero > 0
        for kind in ("ci_masked", "stoch_masked", "unmasked", "random_masked", "rounded_masked"):
            unrecovered = evals[f"{CE_KL}ce_difference_{kind}"] / zero
            assert evals[f"{CE_KL}ce_unrecovered_{kind}"] == pytest.approx(unrecovered, rel=1e-5)


@pytest.fixture(scope="module")
def trained_assets(tiny_lm_assets: TinyLMAssets, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The session's corpus and tokenizer with a tiny Llama trained for 80 steps (~20 s)."""
    from spd_ray.targets.pretrain import PretrainConfig, pretrain

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("trained-tiny-lm")
    (root / CORPUS).symlink_to(tiny_lm_assets.corpus)
    (root / TOKENIZER).symlink_to(tiny_lm_assets.tokenizer)
    params: dict[str, Any] = dict(tiny_lm_assets.build["params"][LLAMA])
    params.update(steps=80, lr=5e-3)
    pretrain(
        PretrainConfig.model_validate(
            {
                **params,
                "tokenizer_name": str(tiny_lm_assets.tokenizer),
                "dataset_name": str(tiny_lm_assets.corpus),
                "column_name": "story",
                "split": "train",
                "eval_split": "test",
                "out_dir": str(root / LLAMA),
                "cache_dir": str(root / "token-cache"),
            }
        ),
        progress=False,
    )
    return root


@pytest.mark.slow  # ~110 s on 2 busy cores: an 80-step pretrain, then a 200-step decomposition
def test_tiny_llama_decomposition_recovers_the_model(
    trained_assets: Path, hf_datasets_cache: Path, tmp_path: Path
):
    out = tmp_path / "out"
    (out / "assets").mkdir(parents=True)
    (out / "assets" / "tiny-lm").symlink_to(trained_assets)
    res = _cli(
        "run",
        "tiny_llama",
        "--steps",
        "200",
        "--name",
        "t",
        "--set",
        "eval_freq=100",
        *FAST,
        out=out,
        cache=hf_datasets_cache,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((Path(res.stdout.strip().splitlines()[-1]) / "summary.json").read_text())
    first, last = summary["initial_eval"], summary["final_eval"]
    for key in ("kl_ci_masked", "ce_unrecovered_ci_masked"):
        assert last[CE_KL + key] < 0.6 * first[CE_KL + key], (key, first[CE_KL + key])
    assert last[CE_KL + "kl_stoch_masked"] < first[CE_KL + "kl_stoch_masked"]
    assert last["eval/l0/total"] < first["eval/l0/total"]


# -- bad inputs: exit 2 with one line, before any training ---------------------------------------


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("task_config.column_name=text", "column_name 'text' is not in dataset"),
        (
            "task_config.max_seq_len=1024",
            "max_seq_len 1024 is longer than the model's max_position_embeddings 512",
        ),
        (
            "module_info=[{module_pattern: model.norm, C: 4}]",
            "module 'model.norm' has type LlamaRMSNorm",
        ),
        (
            "pretrained_model_name=no-org/no-such-model",
            "pretrained_model_name 'no-org/no-such-model'",
        ),
    ],
    ids=["missing-column", "too-long-seq", "unsupported-module", "offline-hub-id"],
)
def test_bad_input_fails_before_training(
    override: str,
    needle: str,
    tiny_lm_assets: TinyLMAssets,
    hf_datasets_cache: Path,
    tmp_path: Path,
):
    out = _out_with_assets(tmp_path, tiny_lm_assets)
    res = _cli(
        "run", "tiny_llama", "--name", "bad", "--set", override, out=out, cache=hf_datasets_cache
    )
    assert res.returncode == 2, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and needle in errors[0], res.stderr[-3000:]
    assert not (out / "bad" / "metrics.jsonl").exists()


@pytest.mark.parametrize(
    "name",
    [
        "tiny_llama",
        pytest.param("tiny_gpt2", marks=pytest.mark.slow),
        pytest.param("tiny_llama_1L", marks=pytest.mark.slow),
    ],
)
def test_tiny_registry_entries_run(
    name: str, tiny_lm_assets: TinyLMAssets, hf_datasets_cache: Path, tmp_path: Path
):
    """Each CPU registry entry runs a few steps in process on the session's assets."""
    from spd_ray import decompose
    from spd_ray.registry import load_experiment

    torch.set_num_threads(1)
    out = _out_with_assets(tmp_path, tiny_lm_assets)
    overrides = [
        "steps=2",
        "eval_freq=2",
        "slow_eval_freq=2",
        "n_eval_steps=1",
        "faithfulness_warmup_steps=2",
        "slow_eval_on_first_step=false",  # figures once, at the end
    ]
    _, config = load_experiment(name, overrides)
    result = decompose(config, out=out, name="r", progress=False)
    assert result.error is None and (result.run_dir / "checkpoint.pt").exists()
    assert math.isfinite(result.metrics[f"{CE_KL}kl_ci_masked"])
    assert result.metrics[f"{CE_KL}ce_unrecovered_zero"] == pytest.approx(1.0)
    assert any((result.run_dir / "figures").glob("ci_histograms_2.png"))
