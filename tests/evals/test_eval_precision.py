"""Evals run in fp32 by default while training keeps bf16 autocast; `eval_autocast_bf16` keeps
bf16 evals."""

from __future__ import annotations

from pathlib import Path

import torch

from spd_ray.config import Config, load_config
from spd_ray.core.masks import Noise
from spd_ray.core.step import autocast, build_component_model
from spd_ray.data.toy import ToyBatches, make_toy_dataset
from spd_ray.evals.evaluate import evaluate
from spd_ray.targets.loading import build_toy

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_resid_mlp.yaml"
KEY = "eval/loss/StochasticReconLoss"


def _eval(config: Config) -> tuple[dict[str, float], set[torch.dtype]]:
    """Eval metrics of an untrained tiny ResidMLP decomposition (the same components, batch and
    noise every call) and the dtypes the decomposed MLP produced during the eval."""
    assert config.target_model is not None
    target = build_toy(config.target_model).requires_grad_(False)  # type: ignore[arg-type]
    torch.manual_seed(0)
    model = build_component_model(config, target)
    dataset = make_toy_dataset(config.task_config, target)  # type: ignore[arg-type]
    batch = next(ToyBatches(dataset, 64, seed=1))
    dtypes: set[torch.dtype] = set()
    handle = model.target.get_submodule("layers.0.mlp_in").register_forward_hook(
        lambda mod, args, out: dtypes.add(out.dtype)
    )
    noise = Noise.for_run(2, "eval", "cpu")
    scalars, _ = evaluate(config, model, [batch], noise, step=0, slow=False)
    handle.remove()
    return {k: float(v) for k, v in scalars.items()}, dtypes


def test_evals_are_fp32_by_default_and_bf16_on_request():
    base = ["eval_metric_configs=[]", "autocast_bf16=true"]
    default, dtypes = _eval(load_config(TINY, base))
    assert dtypes == {torch.float32}
    fp32, _ = _eval(load_config(TINY, [*base[:1], "autocast_bf16=false"]))
    assert default == fp32, "default evals are exactly the fp32 evals"
    bf16, dtypes = _eval(load_config(TINY, [*base, "eval_autocast_bf16=true"]))
    assert dtypes == {torch.bfloat16}
    assert bf16.keys() == fp32.keys() and bf16[KEY] != fp32[KEY]
    assert abs(bf16[KEY] - fp32[KEY]) < 0.05 * fp32[KEY]


def test_training_forwards_keep_bf16_autocast():
    config = load_config(TINY, ["autocast_bf16=true"])
    cpu = torch.device("cpu")
    with autocast(config, cpu):
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled(
            "cpu"
        )
    with autocast(config, cpu, evaluating=True):
        assert not torch.is_autocast_enabled("cpu")
