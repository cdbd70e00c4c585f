"""Pretrain a small causal language model: the target side of LM decomposition.

`spd-ray pretrain CONFIG` (and `make_tiny_lm`) build a `transformers` model from a config dict,
train it with AdamW on concatenated-and-chunked tokens from `spd_ray.data.lm.LMBatches`, and
`save_pretrained` the model and its tokenizer, so that a decomposition config loads it with
`<model_class>.from_pretrained(out_dir)` exactly like a hub model. Hub ids and local folders are
interchangeable in every name field.
"""

from __future__ import annotations

import importlib
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from torch import Tensor
from tqdm import tqdm
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

from spd_ray.config import ConfigError, apply_overrides, read_config_dict
from spd_ray.data.lm import LMBatches, load_tokenizer
from spd_ray.errors import InputError
from spd_ray.io import building_dir, write_json, write_text

logger = logging.getLogger(__name__)

CONFIG_FILE = "pretrain_config.yaml"
SUMMARY_FILE = "pretrain_summary.json"


class PretrainConfig(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        validate_by_name=True,
        validate_by_alias=True,
        protected_namespaces=(),
    )

    model_class: str = Field(
        "transformers.LlamaForCausalLM", description="Dotted path of the model class."
    )
    arch: dict[str, Any] = Field(
        default_factory=dict,
        alias="model_config",
        description="Keyword arguments of the config class; vocab_size and the bos/eos/pad ids "
        "default to the tokenizer's.",
    )
    model_config_class: str | None = Field(
        None, description="Dotted path of the config class; None: model_class.config_class."
    )
    tokenizer_name: str = Field(description="Hub id or local tokenizer folder.")
    dataset_name: str = Field(description="Hub id, local dataset folder or data file.")
    column_name: str = Field("story", description="Text (or token) column.")
    split: str = Field("train", description="Training split.")
    eval_split: str | None = Field(
        None, description="Split for a held-out loss after training; None: no evaluation."
    )
    eval_batches: int = Field(8, gt=0, description="Batches averaged for the held-out loss.")
    is_tokenized: bool = Field(False, description="The column already holds token ids.")
    streaming: bool = Field(False, description="Stream the dataset instead of loading it.")
    max_seq_len: int = Field(128, gt=0, description="Tokens per training sequence.")
    batch_size: int = Field(16, gt=0, description="Sequences per step.")
    steps: int = Field(ge=0, description="Optimizer steps (0: save the untrained model).")
    lr: float = Field(3e-3, gt=0.0, description="Peak AdamW learning rate.")
    warmup_frac: float = Field(0.1, ge=0.0, le=1.0, description="Linear warmup fraction.")
    final_lr_frac: float = Field(0.1, ge=0.0, le=1.0, description="Cosine floor, times lr.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay.")
    grad_clip: float | None = Field(1.0, gt=0.0, description="Gradient-norm clip; None: off.")
    seed: int = Field(0, description="Seeds the initialization and the data order.")
    out_dir: str = Field(description="Folder for the saved model and tokenizer.")
    cache_dir: str | None = Field(
        None, description="Token cache folder; None: beside the datasets cache."
    )
    log_every: int = Field(25, gt=0, description="Steps between loss log lines.")


def load_pretrain_config(path: str | Path, overrides: list[str] | None = None) -> PretrainConfig:
    """A YAML/JSON pretrain config with `--set key=value` overrides applied."""
    path = Path(path)
    data = apply_overrides(read_config_dict(path), overrides or [])
    try:
        return PretrainConfig.model_validate(data)
    except ValidationError as err:
        first = err.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        msg = "unknown key" if first["type"] == "extra_forbidden" else first["msg"]
        raise ConfigError(f"{path}: {loc}: {msg}") from None


def import_dotted(dotted: str, field: str) -> type:
    """The class a dotted path `module.Class` names; errors name the config `field`."""
    module_name, _, attr = dotted.rpartition(".")
    if not module_name:
        raise InputError(f"{field} {dotted!r} is not a dotted path module.Class")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise InputError(f"{field} {dotted!r}: cannot import {err.name!r}") from None
    cls = getattr(module, attr, None)
    if not isinstance(cls, type):
        raise InputError(f"{field} {dotted!r}: {module_name} has no class {attr!r}")
    return cls


def build_model(config: PretrainConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """The untrained model, initialized from `torch.manual_seed(config.seed)`."""
    model_cls = import_dotted(config.model_class, "model_class")
    if not issubclass(model_cls, PreTrainedModel):
        raise InputError(f"model_class {config.model_class!r} is not a transformers model")
    config_cls: type | None = (
        import_dotted(config.model_config_class, "model_config_class")
        if config.model_config_class is not None
        else model_cls.config_class
    )
    if config_cls is None or not issubclass(config_cls, PretrainedConfig):
        raise InputError(
            f"model_config_class {config_cls!r} (for {config.model_class}) is not a "
            "transformers PretrainedConfig"
        )
    kwargs = dict(config.arch)
    kwargs.setdefault("vocab_size", len(tokenizer))
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        kwargs.setdefault(name, getattr(tokenizer, name))
    if kwargs["vocab_size"] < len(tokenizer):
        raise InputError(
            f"model_config.vocab_size {kwargs['vocab_size']} is smaller than the tokenizer's "
            f"{len(tokenizer)} tokens"
        )
    hf_config = config_cls(**kwargs)
    for key in ("max_position_embeddings", "n_positions"):
        limit = getattr(hf_config, key, None)
        if isinstance(limit, int) and config.max_seq_len > limit:
            raise InputError(f"max_seq_len {config.max_seq_len} exceeds model_config.{key} {limit}")
    torch.manual_seed(config.seed)
    return model_cls(hf_config)


def lr_factor(step: int, steps: int, warmup_frac: float, final_frac: float) -> float:
    """Linear warmup to 1, then cosine decay to `final_frac` at the last step."""
    warmup = math.ceil(warmup_frac * steps)
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup - 1)
    return final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _lm_loss(model: PreTrainedModel, x: Tensor) -> Tensor:
    """Mean next-token cross-entropy; rows are full (no padding), hence the all-ones mask."""
    return model(input_ids=x, attention_mask=torch.ones_like(x), labels=x).loss


@torch.no_grad()
def eval_loss(model: PreTrainedModel, batches: LMBatches, n_batches: int) -> float:
    was_training = model.training
    model.eval()
    losses = [_lm_loss(model, next(batches)).item() for _ in range(n_batches)]
    model.train(was_training)
    return sum(losses) / len(losses)


def _batches(config: PretrainConfig, tokenizer: PreTrainedTokenizerBase, split: str, seed: int):
    return LMBatches(
        config.dataset_name,
        split,
        config.column_name,
        tokenizer,
        config.max_seq_len,
        config.batch_size,
        seed,
        is_tokenized=config.is_tokenized,
        streaming=config.streaming,
        cache_dir=config.cache_dir,
    )


def fit(
    config: PretrainConfig, progress: bool = True
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Train a fresh model; returns (model, tokenizer, summary). Nothing is written to disk.

    The summary holds `initial_loss` (the first step's loss), `final_loss` (the mean of the last
    min(10, steps) steps), `eval_loss` (None without `eval_split`), `tokens_per_s`, `seconds`,
    `tokens` and `n_params`; losses are None when `steps` is 0.
    """
    tokenizer = load_tokenizer(config.tokenizer_name)
    model = build_model(config, tokenizer)
    summary: dict[str, Any] = {
        "steps": config.steps,
        "n_params": sum(p.numel() for p in model.parameters()),
        "initial_loss": None,
        "final_loss": None,
        "eval_loss": None,
        "tokens": 0,
        "seconds": 0.0,
        "tokens_per_s": None,
    }
    if config.steps == 0:
        return model, tokenizer, summary
    batches = _batches(config, tokenizer, config.split, config.seed)
    opt = torch.optim.AdamW(
        model.parameters(), lr=config.lr, betas=(0.9, 0.95), weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, config.steps, config.warmup_frac, config.final_lr_frac)
    )
    model.train()
    losses: list[float] = []
    name = config.model_class.rsplit(".", 1)[-1]
    bar = tqdm(range(config.steps), desc=f"pretrain {name}", disable=not progress)
    start = time.perf_counter()
    for step in bar:
        loss = _lm_loss(model, next(batches))
        loss.backward()
        if config.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        schedule.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % config.log_every == 0 or step == config.steps - 1:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            logger.info("step %d loss %.4f lr %.2e", step, losses[-1], schedule.get_last_lr()[0])
    seconds = time.perf_counter() - start
    tokens = config.steps * config.batch_size * config.max_seq_len
    tail = losses[-min(10, len(losses)) :]
    summary.update(
        initial_loss=losses[0],
        final_loss=sum(tail) / len(tail),
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds,
    )
    if config.eval_split is not None:
        held_out = _batches(config, tokenizer, config.eval_split, config.seed + 1)
        summary["eval_loss"] = eval_loss(model, held_out, config.eval_batches)
    model.eval()
    return model, tokenizer, summary


def save_pretrained(
    out_dir: Path,
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    config: PretrainConfig,
    summary: dict[str, Any],
) -> None:
    """The model and tokenizer (`save_pretrained`), the config and the summary into `out_dir`
    (config and summary written atomically; callers build `out_dir` as a temp folder)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    data = config.model_dump(mode="json", by_alias=True)
    write_text(out_dir / CONFIG_FILE, yaml.safe_dump(data, sort_keys=False))
    write_json(out_dir / SUMMARY_FILE, summary)


def check_out_dir(config: PretrainConfig, overwrite: bool) -> Path:
    """The resolved `out_dir`, which must be a new or empty folder unless `overwrite`."""
    out = Path(config.out_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"out_dir {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise InputError(
            f"out_dir {out} already holds files (a trained model?); choose another out_dir, "
            "or pass --overwrite (overwrite=True) to replace it once the new model is saved"
        )
    return out


def pretrain(
    config: PretrainConfig, progress: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Train (`fit`) and save into `config.out_dir`; returns the summary.

    `out_dir` is checked before training (a non-empty folder is refused unless `overwrite`), and
    the outputs are written into a temp folder beside it that replaces it only when complete, so a
    kill leaves the old folder (or none), never a half-saved model.
    """
    out = check_out_dir(config, overwrite)
    model, tokenizer, summary = fit(config, progress)
    check_out_dir(config, overwrite)  # filled by someone else while training?
    with building_dir(out) as tmp:
        save_pretrained(tmp, model, tokenizer, config, summary)
    return summary
