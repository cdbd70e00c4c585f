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

Each part is committed by its own marker (`OUT/.parts/<part>.json`, holding its parameters), so an
interrupted build resumes at the first missing part, and a finished build (`DONE.json` with the same
parameters) returns at once. Everything is deterministic given the seed.

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

logger = logging.getLogger(__name__)

CORPUS, TOKENIZER, LLAMA, GPT2 = "tiny-simplestories", "tokenizer", "tiny-llama", "tiny-gpt2"
TOKENIZER_512, LLAMA_1L = "tokenizer-512", "tiny-llama-1L"
DONE = "DONE.json"
PARTS_DIR = ".parts"
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


def _build_corpus(out: Path, root: Path, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    from spd_ray.data.stories import build_story_corpus

    paths = build_story_corpus(out, params["n_train"], params["n_test"], params["seed"])
    return {f"{split}_sha256": _sha256(path) for split, path in paths.items()}


def _build_tokenizer(
    out: Path, root: Path, params: dict[str, Any], progress: bool
) -> dict[str, Any]:
    lines = (root / CORPUS / "train.jsonl").read_text().splitlines()
    stories = (json.loads(line)["story"] for line in lines)
    tokenizer = train_bpe_tokenizer(stories, params["vocab_size"])
    tokenizer.save_pretrained(out)
    return {"vocab_size": len(tokenizer)}


def _build_model(out: Path, root: Path, params: dict[str, Any], progress: bool) -> dict[str, Any]:
    from spd_ray.targets.pretrain import PretrainConfig, pretrain

    config = PretrainConfig.model_validate(
        {
            **params,
            "tokenizer_name": str(root / MODEL_TOKENIZERS[out.name]),
            "dataset_name": str(root / CORPUS),
            "column_name": "story",
            "split": "train",
            "eval_split": "test",
            "streaming": True,
            "out_dir": str(out),
        }
    )
    return pretrain(config, progress=progress)


_BUILDERS: dict[str, Callable[[Path, Path, dict[str, Any], bool], dict[str, Any]]] = {
    CORPUS: _build_corpus,
    TOKENIZER: _build_tokenizer,
    LLAMA: _build_model,
    GPT2: _build_model,
    TOKENIZER_512: _build_tokenizer,
    LLAMA_1L: _build_model,
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
    """
    root = Path(out).expanduser().resolve()
    params = build_params(steps, seed)

    def assets(build: dict[str, Any]) -> TinyLMAssets:
        parts = (root / CORPUS, root / TOKENIZER, root / LLAMA, root / GPT2)
        return TinyLMAssets(root, *parts, build=build)

    done = _read_json(root / DONE)
    if done is not None and done["params"] == params and not force:
        return assets(done)
    (root / DONE).unlink(missing_ok=True)
    markers = root / PARTS_DIR
    if force:
        shutil.rmtree(markers, ignore_errors=True)
    markers.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    start = time.perf_counter()
    for part, builder in _BUILDERS.items():
        lineage = {p: params[p] for p in (*_UPSTREAM[part], part)}
        marker = _read_json(markers / f"{part}.json")
        if marker is not None and marker["params"] == lineage and (root / part).is_dir():
            results[part] = marker["result"]
            continue
        (markers / f"{part}.json").unlink(missing_ok=True)
        shutil.rmtree(root / part, ignore_errors=True)
        t0 = time.perf_counter()
        result = builder(root / part, root, params[part], progress)
        result["build_seconds"] = time.perf_counter() - t0
        logger.info("built %s in %.1f s", part, result["build_seconds"])
        (markers / f"{part}.json").write_text(
            json.dumps({"params": lineage, "result": result}, indent=2)
        )
        results[part] = result
    build = {"params": params, "results": results, "seconds": time.perf_counter() - start}
    (root / DONE).write_text(json.dumps(build, indent=2) + "\n")
    return assets(build)


# ---- CLI (registered by spd_ray.cli) ------------------------------------------------------------


def cmd_make_tiny_lm(args: argparse.Namespace) -> int:
    from spd_ray.train.rundir import output_root

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
    summary = pretrain(config)
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
        type=int,
        help=f"training steps per model (default {DEFAULT_STEPS}; 0: fast untrained build)",
    )
    p.add_argument(
        "--seed", type=int, default=0, help="seeds the corpus, tokenizer data and models"
    )
    p.add_argument("--force", action="store_true", help="rebuild every part")
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
    q.set_defaults(func=cmd_pretrain)
