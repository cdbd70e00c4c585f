"""Hugging Face targets: loading (local folders, `@tiny-lm/` assets, offline hub ids), Conv1D and
embedding decomposition, and exactness of the component model on the tiny Llama and GPT-2."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import spd_ray.targets.tiny_lm as tiny_lm
from spd_ray.config import Config, config_from_dict
from spd_ray.core.model import ComponentModel, ModuleMask
from spd_ray.core.step import build_component_model
from spd_ray.targets import load_target
from spd_ray.targets.hf import TINY_LM_PREFIX, resolve_name
from spd_ray.targets.tiny_lm import TinyLMAssets

LLAMA_PATTERNS = ["model.layers.*.mlp.*_proj", "model.layers.*.self_attn.*_proj"]
GPT2_PATTERNS = [
    "transformer.h.*.mlp.c_fc",
    "transformer.h.*.mlp.c_proj",
    "transformer.h.*.attn.c_attn",
    "transformer.h.*.attn.c_proj",
]


def lm_config(
    name: str,
    model_class: str = "transformers.LlamaForCausalLM",
    patterns: list[str] | None = None,
    C: int = 8,
    **overrides: Any,
) -> Config:
    data: dict[str, Any] = {
        "n_mask_samples": 1,
        "ci_fn_type": "mlp",
        "ci_fn_hidden_dims": [4],
        "module_info": [
            {"module_pattern": p, "C": C} for p in (patterns or ["model.layers.*.mlp.*_proj"])
        ],
        "loss_metric_configs": [{"classname": "StochasticReconLoss", "coeff": 1.0}],
        "output_loss_type": "kl",
        "lr_schedule": {"start_val": 1e-3},
        "steps": 2,
        "batch_size": 2,
        "eval_freq": 1,
        "n_eval_steps": 1,
        "pretrained_model_class": model_class,
        "pretrained_model_name": name,
        "pretrained_model_output_attr": "logits",
        "task_config": {"task_name": "lm", "max_seq_len": 16},
    }
    data.update(overrides)
    return config_from_dict(data)


def tokens(vocab: int = 4096, shape: tuple[int, int] = (2, 12), seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def ones_with_delta(model: ComponentModel, batch_shape: tuple[int, ...]) -> dict[str, ModuleMask]:
    return {
        p: ModuleMask(mask=torch.ones(*batch_shape, model.C(p)), delta=torch.ones(batch_shape))
        for p in model.module_paths
    }


# -- loading ----------------------------------------------------------------------------------


def test_loads_local_folder_frozen_in_eval_mode(tiny_lm_assets: TinyLMAssets, tmp_path: Path):
    from transformers import GPT2LMHeadModel, LlamaForCausalLM

    llama = load_target(lm_config(str(tiny_lm_assets.llama)), tmp_path)
    assert isinstance(llama, LlamaForCausalLM) and not llama.training
    assert not any(p.requires_grad for p in llama.parameters())
    assert llama.config.use_cache is False  # full-sequence forwards only
    auto = lm_config(str(tiny_lm_assets.gpt2), "transformers.AutoModelForCausalLM", GPT2_PATTERNS)
    assert isinstance(load_target(auto, tmp_path), GPT2LMHeadModel)


def test_relative_folder_resolves_against_the_working_directory(
    tiny_lm_assets: TinyLMAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.chdir(tiny_lm_assets.root)
    assert resolve_name("tiny-llama", "pretrained_model_name", tmp_path) == str(
        tiny_lm_assets.llama
    )
    assert resolve_name("./tokenizer", "tokenizer_name", tmp_path) == str(tiny_lm_assets.tokenizer)
    with pytest.raises(FileNotFoundError, match="pretrained_model_name './nowhere'"):
        resolve_name("./nowhere", "pretrained_model_name", tmp_path)
    assert resolve_name("org/model", "pretrained_model_name", tmp_path) == "org/model"  # hub id


def test_tiny_lm_prefix_resolves_under_the_output_root_and_builds_once(
    tiny_lm_assets: TinyLMAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    (tmp_path / "assets").mkdir()
    (tmp_path / "assets" / "tiny-lm").symlink_to(tiny_lm_assets.root)
    path = resolve_name(f"{TINY_LM_PREFIX}tiny-llama", "pretrained_model_name", tmp_path)
    assert Path(path).resolve() == tiny_lm_assets.llama

    calls: list[tuple[Path, Any]] = []

    def fake_build(out: Path, **kwargs: Any) -> None:
        calls.append((out, kwargs["steps"]))
        (out / "tiny-llama").mkdir(parents=True, exist_ok=True)
        (out / ".parts").mkdir(exist_ok=True)  # a part counts as built once its marker is there
        (out / ".parts" / "tiny-llama.json").write_text("{}")

    monkeypatch.setattr(tiny_lm, "make_tiny_lm", fake_build)
    fresh = tmp_path / "fresh"
    got = resolve_name("@tiny-lm/tiny-llama", "pretrained_model_name", fresh, progress=False)
    assert got == str(fresh / "assets" / "tiny-lm" / "tiny-llama")
    assert calls == [(fresh / "assets" / "tiny-lm", None)]  # default (trained) settings
    resolve_name("@tiny-lm/tiny-llama", "pretrained_model_name", fresh, progress=False)
    assert len(calls) == 1  # present now: not rebuilt
    calls.clear()
    with pytest.raises(FileNotFoundError, match="tiny-LM assets have no"):
        resolve_name("@tiny-lm/no-such-part", "tokenizer_name", fresh, progress=False)
    assert len(calls) == 1  # a missing part triggers one build attempt, then a clear error


def test_unreachable_hub_id_fails_at_once_naming_field_and_id(tmp_path: Path):
    import time

    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("needs HF_HUB_OFFLINE=1 at import time (set by tests/conftest.py)")
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"pretrained_model_name 'no-org/no-such-model'.*OFFLINE"):
        load_target(lm_config("no-org/no-such-model"), tmp_path)
    assert time.perf_counter() - start < 30


def test_hf_target_needs_an_output_attr(tiny_lm_assets: TinyLMAssets):
    """Refused when the config is read, before any model is loaded."""
    with pytest.raises(ValueError, match="pretrained_model_output_attr is required"):
        lm_config(str(tiny_lm_assets.llama), pretrained_model_output_attr=None)


# -- module types -----------------------------------------------------------------------------


def test_unsupported_module_type_is_named(tiny_lm_assets: TinyLMAssets, tmp_path: Path):
    config = lm_config(str(tiny_lm_assets.llama), patterns=["model.layers.0.input_layernorm"])
    target = load_target(config, tmp_path)
    with pytest.raises(ValueError, match="'model.layers.0.input_layernorm' has type LlamaRMSNorm"):
        build_component_model(config, target)


def test_conv1d_weights_in_linear_orientation(tiny_lm_assets: TinyLMAssets, tmp_path: Path):
    config = lm_config(str(tiny_lm_assets.gpt2), "transformers.GPT2LMHeadModel", GPT2_PATTERNS)
    target = load_target(config, tmp_path)
    raw = target.transformer.h[0].attn.c_attn.weight.clone()  # Conv1D: [d_in 128, d_out 384]
    model = build_component_model(config, target)
    path = "transformer.h.0.attn.c_attn"
    assert model.module_paths[:4] == [
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    ]
    assert torch.equal(model.target_weight(path), raw.T)
    assert model.component_weights(path).shape == (8, 384, 128)
    delta = model.weight_deltas()[path]
    total = model.component_weights(path).sum(0) + delta
    torch.testing.assert_close(total, raw.T, rtol=1e-5, atol=1e-6)


# -- exactness --------------------------------------------------------------------------------


CASES = {
    "llama": ("llama", "transformers.LlamaForCausalLM", LLAMA_PATTERNS, "mlp"),
    "llama+embedding": (
        "llama",
        "transformers.LlamaForCausalLM",
        ["model.embed_tokens", *LLAMA_PATTERNS],
        "mlp",
    ),
    "gpt2": ("gpt2", "transformers.GPT2LMHeadModel", GPT2_PATTERNS, "vector_mlp"),
    "gpt2+embedding": (
        "gpt2",
        "transformers.GPT2LMHeadModel",
        ["transformer.wte", *GPT2_PATTERNS],
        "mlp",
    ),
}


@pytest.mark.parametrize("reuse", [True, False], ids=["reuse", "no-reuse"])
@pytest.mark.parametrize("case", list(CASES))
def test_all_ones_masks_plus_delta_reproduce_the_logits(
    case: str, reuse: bool, tiny_lm_assets: TinyLMAssets, tmp_path: Path
):
    torch.set_num_threads(1)
    part, cls, patterns, ci_fn_type = CASES[case]
    config = lm_config(
        str(getattr(tiny_lm_assets, part)),
        cls,
        patterns,
        ci_fn_type=ci_fn_type,
        reuse_clean_activations=reuse,
    )
    target = load_target(config, tmp_path)
    x = tokens()
    expected = target(x).logits
    model = build_component_model(config, target)
    assert model.module_paths[0] in ("model.embed_tokens", "transformer.wte") or "+" not in case
    out, cache = model.clean_forward(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    masked = model.masked_forward(x, [ones_with_delta(model, tuple(x.shape))], cache)
    torch.testing.assert_close(masked, expected, rtol=1e-5, atol=1e-6)
    # Stacked copies: copy 0 replaces everything, copy 1 nothing; both give the target's logits.
    two = model.masked_forward(x, [ones_with_delta(model, tuple(x.shape)), {}], cache)
    torch.testing.assert_close(two, torch.cat([expected, expected]), rtol=1e-5, atol=1e-6)


def _set_exact_components(model: ComponentModel) -> None:
    """V, U with (V U)^T == W exactly representable: V = I, U = W^T (embeddings: V = W, U = I)."""
    with torch.no_grad():
        for path in model.module_paths:
            comps, w = model.comps(path), model.target_weight(path)
            if model.wrappers[path].kind == "embedding":
                comps.V.copy_(w)
                comps.U.copy_(torch.eye(comps.C))
            else:
                comps.V.copy_(torch.eye(comps.d_in, comps.C))
                comps.U.copy_(w.T)


@pytest.mark.parametrize("part", ["llama", "gpt2"])
def test_components_equal_to_the_weights_reproduce_the_logits_without_delta(
    part: str, tiny_lm_assets: TinyLMAssets, tmp_path: Path
):
    """A non-trivial exactness check: the component path alone (no delta term) computes x W^T + b
    when V U^T equals W."""
    torch.set_num_threads(1)
    if part == "llama":
        cls = "transformers.LlamaForCausalLM"
        info = {"model.embed_tokens": 128, "model.layers.*.self_attn.*_proj": 128}
        info |= {"model.layers.*.mlp.gate_proj": 128, "model.layers.*.mlp.up_proj": 128}
        info |= {"model.layers.*.mlp.down_proj": 341}
    else:
        cls = "transformers.GPT2LMHeadModel"
        info = {"transformer.wte": 128, "transformer.h.*.attn.c_attn": 128}
        info |= {"transformer.h.*.attn.c_proj": 128, "transformer.h.*.mlp.c_fc": 128}
        info |= {"transformer.h.*.mlp.c_proj": 512}
    config = lm_config(
        str(getattr(tiny_lm_assets, part)),
        cls,
        ci_fn_type="mlp",
        module_info=[{"module_pattern": p, "C": c} for p, c in info.items()],
    )
    target = load_target(config, tmp_path)
    x = tokens(shape=(2, 10), seed=1)
    expected = target(x).logits
    model = build_component_model(config, target)
    _set_exact_components(model)
    ones = {p: ModuleMask(mask=torch.ones(*x.shape, model.C(p))) for p in model.module_paths}
    for cache in (model.clean_forward(x)[1], None):
        out = model.masked_forward(x, [ones], cache)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_frozen_target_is_required(tiny_lm_assets: TinyLMAssets, tmp_path: Path):
    config = lm_config(str(tiny_lm_assets.llama))
    target = load_target(config, tmp_path)
    target.lm_head.weight.requires_grad_(True)
    (thawed,) = [name for name, p in target.named_parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=rf"target parameter '{re.escape(thawed)}' requires grad"):
        build_component_model(config, target)
    target.lm_head.weight.requires_grad_(False)
    model = build_component_model(config, target)  # frozen again: builds
    assert model.module_paths == [
        f"model.layers.{i}.mlp.{p}_proj" for i in range(2) for p in ("gate", "up", "down")
    ]
