"""Tiny-LM assets and the small-LM pretrainer: layout, tokenizer, models, determinism, resume of
an interrupted build, training, and the two CLI subcommands."""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import spd_ray.targets.tiny_lm as tiny_lm
from spd_ray.config import ConfigError
from spd_ray.targets.pretrain import (
    PretrainConfig,
    build_model,
    fit,
    load_pretrain_config,
    pretrain,
    save_pretrained,
)
from spd_ray.targets.tiny_lm import GPT2, LLAMA, TinyLMAssets, add_cli, make_tiny_lm

SHIPPED_YAML = Path(__file__).resolve().parents[2] / "experiments" / "pretrain" / "tiny_llama.yaml"
SMALL_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 128,
}
SMALL_GPT2 = {"n_embd": 64, "n_layer": 1, "n_head": 2, "n_inner": 128, "n_positions": 128}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _config(assets: TinyLMAssets, tmp: Path, **kw) -> PretrainConfig:
    data = {
        "model_class": "transformers.LlamaForCausalLM",
        "model_config": SMALL_LLAMA,
        "tokenizer_name": str(assets.tokenizer),
        "dataset_name": str(assets.corpus),
        "max_seq_len": 64,
        "batch_size": 8,
        "steps": 3,
        "out_dir": str(tmp / "out"),
        "cache_dir": str(tmp / "cache"),
        **kw,
    }
    return PretrainConfig.model_validate(data)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spd-ray")
    add_cli(parser.add_subparsers(dest="command", required=True))
    return parser


def test_layout_and_build_record(tiny_lm_assets: TinyLMAssets):
    a = tiny_lm_assets
    for split in ("train", "test"):
        assert (a.corpus / f"{split}.jsonl").is_file()
    assert (a.tokenizer / "tokenizer.json").is_file()
    for folder in (a.llama, a.gpt2):
        assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    done = json.loads((a.root / "DONE.json").read_text())
    assert done == a.build
    assert done["params"]["tiny-simplestories"]["n_train"] == 2000
    assert done["results"][LLAMA]["steps"] == 0 and done["results"][LLAMA]["final_loss"] is None
    train_lines = (a.corpus / "train.jsonl").read_text().splitlines()
    assert len(train_lines) == 2000


def test_tokenizer_round_trips_corpus_text(tiny_lm_assets: TinyLMAssets):
    tok = AutoTokenizer.from_pretrained(str(tiny_lm_assets.tokenizer))
    assert len(tok) == 4096
    assert tok.eos_token == tok.bos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == 0 and tok.model_max_length == 512
    lines = (tiny_lm_assets.corpus / "test.jsonl").read_text().splitlines()[:50]
    n_tokens = n_chars = 0
    for line in lines:
        text = json.loads(line)["story"]
        ids = tok(text)["input_ids"]
        assert tok.decode(ids) == text and tok.eos_token_id not in ids
        n_tokens, n_chars = n_tokens + len(ids), n_chars + len(text)
    assert n_chars / n_tokens > 3.5  # merges are used: well above one byte per token


def test_models_have_the_hub_module_names(tiny_lm_assets: TinyLMAssets):
    llama = LlamaForCausalLM.from_pretrained(str(tiny_lm_assets.llama))
    names = dict(llama.named_modules())
    for i in (0, 1):
        for proj in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "self_attn.q_proj",
                     "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"):  # fmt: skip
            assert isinstance(names[f"model.layers.{i}.{proj}"], nn.Linear)
    assert llama.config.vocab_size == 4096 and llama.config.max_position_embeddings >= 512
    assert names["model.layers.0.mlp.gate_proj"].weight.shape == (341, 128)
    gpt2 = AutoModelForCausalLM.from_pretrained(str(tiny_lm_assets.gpt2))
    assert isinstance(gpt2, GPT2LMHeadModel)
    gnames = dict(gpt2.named_modules())
    for i in (0, 1):
        for conv in ("mlp.c_fc", "mlp.c_proj", "attn.c_attn", "attn.c_proj"):
            assert isinstance(gnames[f"transformer.h.{i}.{conv}"], Conv1D)


def test_rebuild_is_deterministic_idempotent_and_resumes_parts(
    tiny_lm_assets: TinyLMAssets, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    again = make_tiny_lm(tmp_path / "again", steps=0, progress=False)
    for rel in ("tiny-simplestories/train.jsonl", "tiny-simplestories/test.jsonl",
                "tokenizer/tokenizer.json", "tiny-llama/model.safetensors",
                "tiny-gpt2/model.safetensors"):  # fmt: skip
        assert _sha(again.root / rel) == _sha(tiny_lm_assets.root / rel), rel

    calls: list[str] = []
    real = dict(tiny_lm._BUILDERS)

    def counting(part: str):
        def build(*args, **kwargs):
            calls.append(part)
            return real[part](*args, **kwargs)

        return build

    monkeypatch.setattr(tiny_lm, "_BUILDERS", {p: counting(p) for p in real})
    # Finished: nothing is rebuilt.
    done_mtime = (again.root / "DONE.json").stat().st_mtime_ns
    assert make_tiny_lm(again.root, steps=0, progress=False).build == again.build
    assert calls == [] and (again.root / "DONE.json").stat().st_mtime_ns == done_mtime
    # Interrupted while training GPT-2: only that part is redone.
    llama_mtime = (again.llama / "model.safetensors").stat().st_mtime_ns
    (again.root / "DONE.json").unlink()
    (again.root / ".parts" / f"{GPT2}.json").unlink()
    resumed = make_tiny_lm(again.root, steps=0, progress=False)
    assert calls == [GPT2] and (again.root / "DONE.json").exists()
    assert (again.llama / "model.safetensors").stat().st_mtime_ns == llama_mtime
    assert _sha(resumed.gpt2 / "model.safetensors") == _sha(
        tiny_lm_assets.gpt2 / "model.safetensors"
    )
    # force rebuilds everything.
    make_tiny_lm(again.root, steps=0, force=True, progress=False)
    assert calls == [
        GPT2,
        "tiny-simplestories",
        "tokenizer",
        LLAMA,
        GPT2,
        "tokenizer-512",
        "tiny-llama-1L",
    ]


@pytest.mark.parametrize(
    ("model_class", "arch"),
    [("transformers.LlamaForCausalLM", SMALL_LLAMA), ("transformers.GPT2LMHeadModel", SMALL_GPT2)],
)
def test_saved_model_reloads_with_identical_logits(tiny_lm_assets, tmp_path, model_class, arch):
    config = _config(tiny_lm_assets, tmp_path, model_class=model_class, model_config=arch)
    model, tok, summary = fit(config, progress=False)
    x = torch.randint(0, len(tok), (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = model(x).logits
    save_pretrained(tmp_path / "saved", model, tok, config, summary)
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "saved")).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(x).logits, before)
    saved_config = load_pretrain_config(tmp_path / "saved" / "pretrain_config.yaml")
    assert saved_config == config
    assert json.loads((tmp_path / "saved" / "pretrain_summary.json").read_text()) == summary


def test_brief_pretraining_reduces_the_loss(tiny_lm_assets, tmp_path):
    config = _config(tiny_lm_assets, tmp_path, steps=40, lr=1e-2, eval_split="test")
    summary = pretrain(config, progress=False)
    assert summary["initial_loss"] > 7.5  # about ln(4096) = 8.3 at initialization
    assert summary["final_loss"] < summary["initial_loss"] - 2.0, summary
    assert summary["eval_loss"] < summary["initial_loss"] - 2.0, summary
    assert summary["tokens"] == 40 * 8 * 64 and summary["tokens_per_s"] > 0
    out = Path(config.out_dir)
    assert isinstance(AutoModelForCausalLM.from_pretrained(str(out)), LlamaForCausalLM)
    assert len(AutoTokenizer.from_pretrained(str(out))) == 4096


def test_training_is_deterministic_given_the_seed(tiny_lm_assets, tmp_path):
    first, _, s1 = fit(_config(tiny_lm_assets, tmp_path), progress=False)
    second, _, s2 = fit(_config(tiny_lm_assets, tmp_path), progress=False)
    other, _, _ = fit(_config(tiny_lm_assets, tmp_path, seed=1), progress=False)
    assert s1["final_loss"] == s2["final_loss"]
    for (name, p), q in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    assert not torch.equal(first.lm_head.weight, other.lm_head.weight)


def test_config_errors_name_the_field(tiny_lm_assets, tmp_path):
    (tmp_path / "bad.yaml").write_text(
        "steps: 1\nout_dir: x\ntokenizer_name: t\ndataset_name: d\nlrr: 1\n"
    )
    with pytest.raises(ConfigError, match="lrr: unknown key"):
        load_pretrain_config(tmp_path / "bad.yaml")
    tok = AutoTokenizer.from_pretrained(str(tiny_lm_assets.tokenizer))
    with pytest.raises(ValueError, match="max_seq_len 256 exceeds model_config.max_position"):
        build_model(_config(tiny_lm_assets, tmp_path, max_seq_len=256), tok)
    with pytest.raises(ValueError, match="model_class 'torch.nn.Linear' is not a transformers"):
        build_model(_config(tiny_lm_assets, tmp_path, model_class="torch.nn.Linear"), tok)
    with pytest.raises(ValueError, match="model_config.vocab_size 100 is smaller"):
        build_model(
            _config(tiny_lm_assets, tmp_path, model_config={**SMALL_LLAMA, "vocab_size": 100}), tok
        )


def test_shipped_pretrain_yaml_loads_and_runs(tiny_lm_assets, tmp_path, capsys):
    assert SHIPPED_YAML.read_text().startswith("#")
    config = load_pretrain_config(SHIPPED_YAML)
    assert config.model_class == "transformers.LlamaForCausalLM" and config.steps > 0
    assert config.arch["intermediate_size"] == 341
    out = tmp_path / "run"
    args = _parser().parse_args([
        "pretrain", str(SHIPPED_YAML),
        "--set", f"tokenizer_name={tiny_lm_assets.tokenizer}",
        "--set", f"dataset_name={tiny_lm_assets.corpus}",
        "--set", f"out_dir={out}", "--set", f"cache_dir={tmp_path / 'cache'}",
        "--set", "steps=2", "--set", "batch_size=2", "--set", "max_seq_len=32",
        "--set", "eval_batches=1",
    ])  # fmt: skip
    assert args.func(args) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(out)
    assert (out / "model.safetensors").is_file()


def test_make_tiny_lm_cli(tiny_lm_assets, tmp_path, capsys, monkeypatch):
    parser = _parser()
    args = parser.parse_args(["make-tiny-lm", str(tiny_lm_assets.root), "--steps", "0"])
    assert args.func(args) == 0  # already built: returns at once
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tiny_lm_assets.root)

    seen: dict[str, object] = {}

    def fake(out, **kwargs):
        seen.update(out=out, **kwargs)
        return tiny_lm_assets

    monkeypatch.setattr(tiny_lm, "make_tiny_lm", fake)
    monkeypatch.setenv("SPD_RAY_OUT", str(tmp_path))
    args = parser.parse_args(["make-tiny-lm", "--seed", "3", "--force"])
    assert args.func(args) == 0
    assert seen == {"out": tmp_path / "assets" / "tiny-lm", "steps": None, "seed": 3, "force": True}


@pytest.mark.slow
def test_default_build_trains_both_models(tmp_path):
    torch.set_num_threads(1)
    built = make_tiny_lm(tmp_path, progress=False)
    results = built.build["results"]
    assert results["tokenizer"]["vocab_size"] == 4096
    assert results[LLAMA]["eval_loss"] < 1.6, results[LLAMA]
    assert results[GPT2]["eval_loss"] < 2.5, results[GPT2]
    assert built.build["seconds"] < 240
