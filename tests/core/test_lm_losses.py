"""Every training loss runs on (batch, seq) token inputs of the tiny Llama with the KL output
loss, is finite and backpropagates into the components and CI functions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import TypeAdapter

from spd_ray import config as C
from spd_ray.core.losses import loss_term
from spd_ray.core.masks import Noise
from spd_ray.core.step import autocast, build_component_model, step_inputs
from spd_ray.targets import load_target
from spd_ray.targets.tiny_lm import TinyLMAssets

PGD = {"init": "random", "step_size": 0.1, "n_steps": 2}
LOSSES: list[dict[str, Any]] = [
    {"classname": "FaithfulnessLoss"},
    {
        "classname": "ImportanceMinimalityLoss",
        "pnorm": 2.0,
        "beta": 0.1,
        "p_anneal_start_frac": 0.0,
        "p_anneal_final_p": 0.3,
    },
    {"classname": "UnmaskedReconLoss"},
    {"classname": "CIMaskedReconLoss"},
    {"classname": "CIMaskedReconLayerwiseLoss"},
    {"classname": "CIMaskedReconSubsetLoss"},
    {"classname": "StochasticReconLoss"},
    {"classname": "StochasticReconLayerwiseLoss"},
    {"classname": "StochasticReconSubsetLoss"},
    {
        "classname": "StochasticReconSubsetLoss_static",
        "routing": {"type": "static_probability", "p": 0.5},
    },
    {"classname": "StochasticHiddenActsReconLoss"},
    {"classname": "PGDReconLoss", **PGD},
    {"classname": "PGDReconLayerwiseLoss", **PGD},
    {"classname": "PGDReconSubsetLoss", **PGD, "mask_scope": "shared_across_batch"},
]
_ADAPTER: TypeAdapter[Any] = TypeAdapter(C.LossMetricConfig)


def test_every_loss_is_listed():
    names = {d["classname"].split("_")[0] for d in LOSSES}
    assert names == set(C.LOSS_CLASSNAMES)


@pytest.mark.parametrize("spec", LOSSES, ids=lambda d: d["classname"])
def test_loss_runs_on_token_batches(
    spec: dict[str, Any], tiny_lm_assets: TinyLMAssets, tmp_path: Path
):
    torch.set_num_threads(1)
    spec = {**spec, "classname": spec["classname"].split("_")[0], "coeff": 1.0}
    loss_cfg = _ADAPTER.validate_python(spec)
    config = C.config_from_dict(
        {
            "n_mask_samples": 2,
            "ci_fn_type": "shared_mlp",
            "ci_fn_hidden_dims": [16],
            "module_info": [
                {"module_pattern": "model.layers.0.mlp.*_proj", "C": 6},
                {"module_pattern": "model.layers.1.self_attn.[qv]_proj", "C": 4},
            ],
            "loss_metric_configs": [spec],
            "output_loss_type": "kl",
            "lr_schedule": {"start_val": 1e-3},
            "steps": 10,
            "batch_size": 2,
            "eval_freq": 1,
            "n_eval_steps": 1,
            "pretrained_model_class": "transformers.LlamaForCausalLM",
            "pretrained_model_name": str(tiny_lm_assets.llama),
            "pretrained_model_output_attr": "logits",
            "task_config": {"task_name": "lm", "max_seq_len": 8},
        }
    )
    model = build_component_model(config, load_target(config, tmp_path))
    batch = torch.randint(0, 4096, (2, 8), generator=torch.Generator().manual_seed(0))
    noise = Noise(torch.Generator().manual_seed(1))
    device = torch.device("cpu")
    with autocast(config, device):
        inp = step_inputs(config, model, batch, noise, step_frac=0.5)
        assert inp.batch_shape == (2, 8)
        assert inp.target_out.shape == (2, 8, 4096)
        value = loss_term(loss_cfg, inp)
    assert value.dim() == 0 and torch.isfinite(value), value
    value.float().backward()
    comp_params, ci_params = model.trainable_parameters()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in comp_params + ci_params)
    if loss_cfg.classname not in ("FaithfulnessLoss",):
        assert value > 0
