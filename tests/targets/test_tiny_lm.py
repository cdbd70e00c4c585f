"""Tiny-LM assets and the small-LM pretrainer: layout, tokenizer, models, determinism, resume of
an interrupted build, training, and the two CLI subcommands."""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2LMHeadModel,
    LlamaForCausalLM,
)
from transformers.pytorch_utils import Conv1D

import spd_ray.targets.tiny_lm as tiny_lm
from spd_ray.cli import main as cli_main
from spd_ray.config import ConfigError
from spd_ray.targets.hf import resolve_name
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


# ---- Reliability: arguments, interrupted builds, half-written parts, out_dir -----------------


def _snapshot(root: Path) -> dict[str, tuple[str, int]]:
    """sha256 and mtime of every file under `root` (hidden ones included)."""
    return {
        str(p.relative_to(root)): (_sha(p), p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _part_shas(root: Path) -> dict[str, str]:
    """sha256 of every file of every part (the content a reader loads)."""
    return {
        str(p.relative_to(root)): _sha(p)
        for part in tiny_lm.PARTS
        for p in sorted((root / part).rglob("*"))
        if p.is_file()
    }


def _copy_assets(assets: TinyLMAssets, dest: Path) -> Path:
    shutil.copytree(assets.root, dest, symlinks=True)
    (dest / tiny_lm.LOCK).unlink(missing_ok=True)
    return dest


@pytest.mark.parametrize(
    "argv",
    [["--steps", "-1"], ["--steps", "x"], ["--steps", "1.5"], ["--seed", "-1"], ["--seed", "y"]],
)
def test_bad_make_tiny_lm_arguments_fail_at_parse_time_and_touch_nothing(
    tiny_lm_assets, tmp_path, capsys, argv
):
    root = _copy_assets(tiny_lm_assets, tmp_path / "assets")
    before = _snapshot(root)
    assert len(before) >= 20  # every part's files, the markers and DONE.json
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["make-tiny-lm", str(root), *argv, "--force"])
    assert exc.value.code == 2
    assert f"argument {argv[0]}" in capsys.readouterr().err
    assert _snapshot(root) == before


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"steps": -1}, "steps must be None or a whole number >= 0, got -1"),
        ({"steps": 1.5}, "steps must be None or a whole number >= 0, got 1.5"),
        ({"seed": -3}, "seed must be a whole number >= 0, got -3"),
    ],
)
def test_make_tiny_lm_api_checks_arguments_before_touching_the_folder(
    tiny_lm_assets, tmp_path, kwargs, message
):
    root = _copy_assets(tiny_lm_assets, tmp_path / "assets")
    before = _snapshot(root)
    with pytest.raises(ValueError, match=re.escape(message)):
        make_tiny_lm(root, force=True, progress=False, **kwargs)
    assert _snapshot(root) == before
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        make_tiny_lm(tmp_path / "file", steps=0, progress=False)
    assert (tmp_path / "file").read_text() == "not a folder"


def test_build_killed_mid_part_leaves_the_old_parts_whole(tiny_lm_assets, tmp_path):
    """kill -9 of a real `--force` rebuild while tiny-llama is half-saved in its temp folder (the
    build is held just before its last file): every part still reads as before, the half part is
    never accepted, the next build cleans up."""
    out_root = tmp_path / "out"
    root = _copy_assets(tiny_lm_assets, out_root / "assets" / "tiny-lm")
    before = _part_shas(root)
    code = (
        "import sys, time; import spd_ray.targets.pretrain as p; "
        "p.write_json = lambda path, data: (print('held', flush=True), time.sleep(600)); "
        "from spd_ray.targets.tiny_lm import make_tiny_lm; "
        "make_tiny_lm(sys.argv[1], steps=0, force=True, progress=False)"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
    finally:
        proc.kill()
        proc.wait()
    partial = list(root.glob(f".{LLAMA}.partial-*"))
    assert len(partial) == 1
    assert (partial[0] / "model.safetensors").is_file()
    assert not (partial[0] / "pretrain_summary.json").exists()  # killed mid-part
    assert _part_shas(root) == before
    got = resolve_name(f"@tiny-lm/{LLAMA}", "pretrained_model_name", out_root, progress=False)
    assert got == str(root / LLAMA)
    assert isinstance(LlamaForCausalLM.from_pretrained(got), LlamaForCausalLM)
    again = make_tiny_lm(root, steps=0, progress=False)
    assert not list(root.glob(".*.partial-*")) and not list(root.glob(".*.old-*"))
    assert _part_shas(again.root) == before


def test_failing_part_write_keeps_the_old_part_and_its_marker(
    tiny_lm_assets, tmp_path, monkeypatch
):
    root = _copy_assets(tiny_lm_assets, tmp_path / "assets")
    before = _snapshot(root)

    def disk_full(out: Path, *args):
        (out / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setitem(tiny_lm._BUILDERS, GPT2, disk_full)
    with pytest.raises(OSError, match="No space left"):
        make_tiny_lm(root, steps=0, force=True, progress=False)
    after = _snapshot(root)
    gpt2_files = [k for k in before if k.startswith(f"{GPT2}/") or k == f".parts/{GPT2}.json"]
    assert len(gpt2_files) >= 4
    for key in [*gpt2_files, "DONE.json"]:
        assert after[key] == before[key], key  # same bytes, never rewritten
    assert {k for k in after if ".partial-" in k} == set()
    assert tiny_lm.part_complete(root, GPT2)


def test_a_half_written_part_is_repaired_or_rejected_naming_the_folder(
    tiny_lm_assets, tmp_path, monkeypatch
):
    out_root = tmp_path / "out"
    root = _copy_assets(tiny_lm_assets, out_root / "assets" / "tiny-lm")
    good = _sha(root / GPT2 / "model.safetensors")
    # What a build killed by the old code left: a torn file, no summary (written last), no marker.
    (root / ".parts" / f"{GPT2}.json").unlink()
    assert tiny_lm.part_complete(root, GPT2)  # whole: its last file is there
    (root / GPT2 / "model.safetensors").write_bytes(b"torn")
    (root / GPT2 / "pretrain_summary.json").unlink()
    assert not tiny_lm.part_complete(root, GPT2)

    monkeypatch.setattr(tiny_lm, "make_tiny_lm", lambda *a, **k: None)  # a build that fails
    with pytest.raises(FileNotFoundError) as err:
        resolve_name(f"@tiny-lm/{GPT2}", "pretrained_model_name", out_root, progress=False)
    message = str(err.value)
    assert f"{root / GPT2} is incomplete" in message
    assert f"spd-ray make-tiny-lm {root} --steps 0`" in message  # the settings of DONE.json
    monkeypatch.undo()

    # The real build repairs it from DONE.json's settings: the same bytes as before.
    got = resolve_name(f"@tiny-lm/{GPT2}", "pretrained_model_name", out_root, progress=False)
    assert got == str(root / GPT2) and tiny_lm.part_complete(root, GPT2)
    assert _sha(root / GPT2 / "model.safetensors") == good
    with pytest.raises(ValueError, match="a tiny-LM name is"):
        resolve_name("@tiny-lm/../x", "tokenizer_name", out_root, progress=False)


def test_a_part_without_marker_is_whole_only_when_its_last_file_is(tmp_path):
    root = tmp_path
    (root / "tokenizer").mkdir()
    (root / "tiny-simplestories").mkdir()
    assert not tiny_lm.part_complete(root, "tokenizer")
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {"vocab"')  # torn
    (root / "tiny-simplestories" / "test.jsonl").write_text('{"story": "a"}\n{"story": "b')
    assert not tiny_lm.part_complete(root, "tokenizer")
    assert not tiny_lm.part_complete(root, "tiny-simplestories")
    (root / "tokenizer" / "tokenizer.json").write_text('{"model": {"vocab": {}}}')
    (root / "tiny-simplestories" / "test.jsonl").write_text('{"story": "a"}\n{"story": "b"}\n')
    assert tiny_lm.part_complete(root, "tokenizer")
    assert tiny_lm.part_complete(root, "tiny-simplestories")
    assert not tiny_lm.part_complete(root, GPT2)  # no folder


def test_pretrain_refuses_a_filled_out_dir_before_training(tiny_lm_assets, tmp_path, monkeypatch):
    config = _config(tiny_lm_assets, tmp_path)
    out = Path(config.out_dir)
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"the old model")
    with pytest.raises(ValueError, match=re.escape(f"out_dir {out} already holds files")):
        pretrain(config, progress=False)
    assert not (tmp_path / "cache").exists()  # refused before any data was read
    assert (out / "model.safetensors").read_bytes() == b"the old model"

    # The CLI says the same in one line, exit 2, and --overwrite replaces the folder whole.
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config.model_dump(by_alias=True)))
    assert cli_main(["pretrain", str(tmp_path / "c.yaml")]) == 2
    assert (out / "model.safetensors").read_bytes() == b"the old model"

    import spd_ray.targets.pretrain as pretrain_mod

    def torn_save(out_dir: Path, *args):
        (out_dir / "model.safetensors").write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pretrain_mod, "save_pretrained", torn_save)
    with pytest.raises(OSError, match="No space left"):
        pretrain(config, progress=False, overwrite=True)
    assert (out / "model.safetensors").read_bytes() == b"the old model"
    monkeypatch.undo()

    assert cli_main(["pretrain", str(tmp_path / "c.yaml"), "--overwrite"]) == 0
    assert isinstance(AutoModelForCausalLM.from_pretrained(str(out)), LlamaForCausalLM)
    assert sorted(p.name for p in tmp_path.iterdir() if ".partial-" in p.name) == []


def test_pretrain_validates_the_config_before_creating_out_dir(tiny_lm_assets, tmp_path):
    config = _config(tiny_lm_assets, tmp_path, max_seq_len=256)
    with pytest.raises(ValueError, match="max_seq_len 256 exceeds"):
        pretrain(config, progress=False)
    assert not Path(config.out_dir).exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        pretrain(_config(tiny_lm_assets, tmp_path, out_dir=str(tmp_path / "file")))
