"""Offline tiny language-model assets: a story corpus, a BPE tokenizer and two tiny causal LMs.

No SimpleStories data or pretrained causal-LM weights are available offline, so `make_tiny_lm`
builds stand-ins into ordinary Hugging Face folders, which load exactly where hub ids do:

    OUT/tiny-simplestories/{train,test}.jsonl  story corpus, column `story`
    OUT/tokenizer/       byte-level BPE, 4096 tokens, <|endoftext|> as bos/eos/unk/pad
    OUT/tiny-llama/      LlamaForCausalLM with SimpleStories module names
    OUT/tiny-gpt2/       GPT2LMHeadModel (Conv1D c_attn, c_proj, c_fc)
    OUT/tokenizer-512/   byte-level BPE, 512 tokens (for the 1-layer model)
    OUT/tiny-llama-1L/   1-layer LlamaForCausalLM (d 128, MLP 512, vocab 512)
    OUT/DONE.json        the build parameters and results

Each part is built in a temp folder beside it (`OUT/.<part>.partial-*`), swapped in whole, and then
committed by its own marker (`OUT/.parts/<part>.json`, holding its parameters, written atomically):
a part folder with its marker is complete, an interrupted build resumes at the first part whose
marker is missing or stale, and a finished build (`DONE.json` and every marker with the same
parameters) returns at once. A rebuild never deletes a part before its replacement is complete.
Everything is deterministic given the seed.

`steps=0` is the fast mode for tests: a 2000-story corpus and untrained models (a few seconds).
`steps=None` trains both models for their default number of steps on a 10000-story corpus.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spd_ray.argtypes import nonneg_int
from spd_ray.errors import InputError
from spd_ray.io import Lock, LockedError, building_dir, write_json

logger = logging.getLogger(__name__)

CORPUS, TOKENIZER, LLAMA, GPT2 = "tiny-simplestories", "tokenizer", "tiny-llama", "tiny-gpt2"
TOKENIZER_512, LLAMA_1L = "tokenizer-512", "tiny-llama-1L"
PARTS = (CORPUS, TOKENIZER, LLAMA, GPT2, TOKENIZER_512, LLAMA_1L)
DONE = "DONE.json"
PARTS_DIR = ".parts"
LOCK = ".build.lock"
EOS = "<|endoftext|>"
VOCAB_SIZE = 4096
MODEL_MAX_LENGTH = 512
BUILD_VERSION = 1

# SimpleStories-1.25M's shape (d_mlp = d * 4 * 2 // 3, 2 KV heads), with 2 layers instead of 4.
LLAMA_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 341,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "tie_word_embeddings": False,
}
GPT2_CONFIG: dict[str, Any] = {
    "n_embd": 128,
    "n_layer": 2,
    "n_head": 4,
    "n_inner": 512,
    "n_positions": MODEL_MAX_LENGTH,
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}
# The shape of the reference's ss_llama_simple_mlp-1L experiment, shrunk: one layer, a small vocab.
LLAMA_1L_CONFIG: dict[str, Any] = {
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 1,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": MODEL_MAX_LENGTH,
    "tie_word_embeddings": False,
}
DEFAULT_STEPS = {LLAMA: 200, GPT2: 200, LLAMA_1L: 200}
LEARNING_RATES = {LLAMA: 5e-3, GPT2: 3e-3, LLAMA_1L: 5e-3}
MODEL_TOKENIZERS = {LLAMA: TOKENIZER, GPT2: TOKENIZER, LLAMA_1L: TOKENIZER_512}
TRAIN_SETTINGS: dict[str, Any] = {"max_seq_len": 128, "batch_size": 16}


@dataclass(frozen=True)
class TinyLMAssets:
    """Paths of a finished build, and the contents of its DONE.json."""

    root: Path
    corpus: Path
    tokenizer: Path
    llama: Path
    gpt2: Path
    build: dict[str, Any]

    @property
    def tokenizer_512(self) -> Path:
        return self.root / TOKENIZER_512

    @property
    def llama_1l(self) -> Path:
        return self.root / LLAMA_1L


def build_params(steps: int | None, seed: int) -> dict[str, dict[str, Any]]:
    """The parameters of every part; a part is rebuilt when its parameters change."""
    fast = steps == 0
    corpus = {
        "version": BUILD_VERSION,
        "seed": seed,
        "n_train": 2000 if fast else 10000,
        "n_test": 200 if fast else 500,
    }
    models = {
        name: {
            "model_class": cls,
            "model_config": arch,
            "steps": DEFAULT_STEPS[name] if steps is None else steps,
            "seed": seed,
            "lr": LEARNING_RATES[name],
            **TRAIN_SETTINGS,
        }
        for name, cls, arch in (
            (LLAMA, "transformers.LlamaForCausalLM", LLAMA_CONFIG),
            (GPT2, "transformers.GPT2LMHeadModel", GPT2_CONFIG),
            (LLAMA_1L, "transformers.LlamaForCausalLM", LLAMA_1L_CONFIG),
        )
    }
    tokenizers = {TOKENIZER: {"vocab_size": VOCAB_SIZE}, TOKENIZER_512: {"vocab_size": 512}}
    return {CORPUS: corpus, **tokenizers, **models}


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int = VOCAB_SIZE) -> Any:
    """A GPT-2-style byte-level BPE trained on `texts`, wrapped as `PreTrainedTokenizerFast`
    with `<|endoftext|>` as bos, eos, unk and pad token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
        model_max_length=MODEL_MAX_LENGTH,
    )


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_corpus(
    out: Path, root: Path, part: str, params: dict[str, Any], progress: bool
) -> dict[str, Any]:
    from spd_ray.data.stories import build_story_corpus

    paths = build_story_corpus(out, params["n_train"], params["n_test"], params["seed"])
    return {f"{split}_sha256": _sha256(path) for split, path in paths.items()}


def _build_tokenizer(
    out: Path, root: Path, part: str, params: dict[str, Any], progress: bool
) -> dict[str, Any]:
    lines = (root / CORPUS / "train.jsonl").read_text().splitlines()
    stories = (json.loads(line)["story"] for line in lines)
    tokenizer = train_bpe_tokenizer(stories, params["vocab_size"])
    tokenizer.save_pretrained(out)
    return {"vocab_size": len(tokenizer)}


def _build_model(
    out: Path, root: Path, part: str, params: dict[str, Any], progress: bool
) -> dict[str, Any]:
    from spd_ray.targets.pretrain import PretrainConfig, fit, save_pretrained

    config = PretrainConfig.model_validate(
        {
            **params,
            "tokenizer_name": str(root / MODEL_TOKENIZERS[part]),
            "dataset_name": str(root / CORPUS),
            "column_name": "story",
            "split": "train",
            "eval_split": "test",
            "streaming": True,
            "out_dir": str(root / part),  # where it is read from once swapped in
        }
    )
    model, tokenizer, summary = fit(config, progress)
    save_pretrained(out, model, tokenizer, config, summary)
    return summary


# Each builder writes part `part` into the empty temp folder `out`; earlier parts are in `root`.
_BUILDERS: dict[str, Callable[[Path, Path, str, dict[str, Any], bool], dict[str, Any]]] = {
    CORPUS: _build_corpus,
    TOKENIZER: _build_tokenizer,
    LLAMA: _build_model,
    GPT2: _build_model,
    TOKENIZER_512: _build_tokenizer,
    LLAMA_1L: _build_model,
}


# The file each builder writes last (for folders that have no marker).
_LAST_FILE = {
    CORPUS: "test.jsonl",
    TOKENIZER: "tokenizer.json",
    LLAMA: "pretrain_summary.json",
    GPT2: "pretrain_summary.json",
    TOKENIZER_512: "tokenizer.json",
    LLAMA_1L: "pretrain_summary.json",
}

# A part is stale when its own or any upstream part's parameters changed.
_UPSTREAM = {
    CORPUS: (),
    TOKENIZER: (CORPUS,),
    LLAMA: (CORPUS, TOKENIZER),
    GPT2: (CORPUS, TOKENIZER),
    TOKENIZER_512: (CORPUS,),
    LLAMA_1L: (CORPUS, TOKENIZER_512),
}


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.exists() else None


def check_build_args(steps: int | None, seed: int) -> None:
    """The `make_tiny_lm` arguments the CLI bounds at parse time, checked again for API callers
    before anything is created or deleted."""
    if steps is not None and (not isinstance(steps, int) or isinstance(steps, bool) or steps < 0):
        raise InputError(f"steps must be None or a whole number >= 0, got {steps!r}")
    # >= 0: numpy's seed sequences (the data order) reject negative seeds.
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed must be a whole number >= 0, got {seed!r}")


def part_complete(root: Path, part: str) -> bool:
    """Whether `root/part` is a whole part, safe to load.

    Built here: its marker exists (written only after the folder was swapped in whole). A folder
    without one (assembled by hand, e.g. `spd-ray pretrain` into it, or left by an older build):
    the file its builder writes last is there and whole - a build killed mid-part has not
    written it.
    """
    folder = root / part
    if not folder.is_dir():
        return False
    if (root / PARTS_DIR / f"{part}.json").is_file():
        return True
    last = folder / _LAST_FILE[part]
    if not last.is_file():
        return False
    data = last.read_bytes()
    if last.suffix == ".jsonl":
        return data.endswith(b"\n")
    try:
        json.loads(data)
    except ValueError:
        return False
    return True


def _lineage(params: dict[str, dict[str, Any]], part: str) -> dict[str, Any]:
    return {p: params[p] for p in (*_UPSTREAM[part], part)}


def _current(root: Path, params: dict[str, dict[str, Any]], part: str) -> dict[str, Any] | None:
    """The marker of `part` when the part is complete and built with these parameters."""
    marker = _read_json(root / PARTS_DIR / f"{part}.json")
    if marker is None or marker["params"] != _lineage(params, part):
        return None
    return marker if (root / part).is_dir() else None


def _partials(root: Path) -> list[Path]:
    """Temp folders of part builds (`building_dir`'s and `replace_dir`'s names)."""
    found = (root.glob(f".{part}.{kind}-*") for part in PARTS for kind in ("partial", "old"))
    return [p for paths in found for p in paths if p.is_dir()]


def _remove_partials(root: Path) -> None:
    """Temp folders of builds that died (the build lock is held, so none is live)."""
    for stale in _partials(root):
        shutil.rmtree(stale, ignore_errors=True)


def _sweep_partials(root: Path) -> None:
    """Remove the temp folders of dead builds, unless a live build holds the lock (and without
    touching the folder when there are none, so read-only asset folders load)."""
    if not _partials(root):
        return
    lock = Lock(root / LOCK, f"tiny-LM assets {root}")
    try:
        lock.acquire()
    except LockedError:
        return
    try:
        _remove_partials(root)
    finally:
        lock.release()


def make_tiny_lm(
    out: str | Path,
    *,
    steps: int | None = None,
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
) -> TinyLMAssets:
    """Build (or reuse) the tiny-LM assets in `out`; see the module docstring.

    `steps`: None trains each model for `DEFAULT_STEPS`; 0 is the fast mode (small corpus,
    untrained models); N trains both models for N steps. `force` rebuilds every part.

    Each part is built into a temp folder beside it and swapped in whole, then its marker is
    written: a kill at any moment leaves every part either old and complete or new and complete,
    and nothing is deleted before its replacement is in place. A second build of the same folder
    at the same time fails at once (`LockedError`, naming the holder).
    """
    check_build_args(steps, seed)
    root = Path(out).expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise InputError(f"tiny-LM output {root} exists and is not a folder")
    params = build_params(steps, seed)

    def assets(build: dict[str, Any]) -> TinyLMAssets:
        parts = (root / CORPUS, root / TOKENIZER, root / LLAMA, root / GPT2)
        return TinyLMAssets(root, *parts, build=build)

    done = _read_json(root / DONE)
    finished = done is not None and done["params"] == params
    if finished and not force and all(_current(root, params, p) for p in _BUILDERS):
        assert done is not None
        _sweep_partials(root)
        return assets(done)
    root.mkdir(parents=True, exist_ok=True)
    with Lock(root / LOCK, f"tiny-LM assets {root}"):
        _remove_partials(root)
        markers = root / PARTS_DIR
        markers.mkdir(exist_ok=True)
        results: dict[str, Any] = {}
        start = time.perf_counter()
        for part, builder in _BUILDERS.items():
            marker = None if force else _current(root, params, part)
            if marker is not None:
                results[part] = marker["result"]
                continue
            t0 = time.perf_counter()
            with building_dir(root / part) as tmp:
                result = builder(tmp, root, part, params[part], progress)
            result["build_seconds"] = time.perf_counter() - t0
            logger.info("built %s in %.1f s", part, result["build_seconds"])
            write_json(
                markers / f"{part}.json", {"params": _lineage(params, part), "result": result}
            )
            results[part] = result
        build = {"params": params, "results": results, "seconds": time.perf_counter() - start}
        write_json(root / DONE, build)
    return assets(build)


# ---- CLI (registered by spd_ray.cli) ------------------------------------------------------------


def cmd_make_tiny_lm(args: argparse.Namespace) -> int:
    from spd_ray.runs import output_root

    out = Path(args.out) if args.out else output_root(None) / "assets" / "tiny-lm"
    built = make_tiny_lm(out, steps=args.steps, seed=args.seed, force=args.force)
    for part in (LLAMA, GPT2, LLAMA_1L):
        result = built.build["results"][part]
        if result["final_loss"] is not None:
            print(
                f"  {part}: train loss {result['final_loss']:.3f}, "
                f"test loss {result['eval_loss']:.3f}",
                file=sys.stderr,
            )
    print(built.root)
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from spd_ray.targets.pretrain import load_pretrain_config, pretrain

    config = load_pretrain_config(args.config, args.overrides)
    summary = pretrain(config, overwrite=args.overwrite)
    for key in ("initial_loss", "final_loss", "eval_loss", "tokens_per_s"):
        if summary[key] is not None:
            print(f"  {key} = {summary[key]:.6g}", file=sys.stderr)
    print(Path(config.out_dir).expanduser().resolve())
    return 0


def add_cli(sub: Any) -> None:
    """Register `make-tiny-lm` and `pretrain` on an argparse subparsers object."""
    p = sub.add_parser(
        "make-tiny-lm",
        help="build the offline tiny-LM assets (story corpus, BPE tokenizer, tiny Llama/GPT-2)",
    )
    p.add_argument("out", nargs="?", help="output folder (default: <output root>/assets/tiny-lm)")
    p.add_argument(
        "--steps",
        type=nonneg_int,
        help=f"training steps per model (default {DEFAULT_STEPS}; 0: fast untrained build)",
    )
    p.add_argument(
        "--seed",
        type=nonneg_int,
        default=0,
        help="seeds the corpus, tokenizer data and models (>= 0)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="rebuild every part (each old part stays in place until its new one is complete)",
    )
    p.set_defaults(func=cmd_make_tiny_lm)

    q = sub.add_parser("pretrain", help="pretrain a small causal LM from a YAML config")
    q.add_argument("config", help="pretrain YAML/JSON config path")
    q.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set steps=10 (value parsed as YAML)",
    )
    q.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an out_dir that already holds files (swapped in when the new one is saved)",
    )
    q.set_defaults(func=cmd_pretrain)
