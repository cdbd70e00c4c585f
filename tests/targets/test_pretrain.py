"""The shipped pretrain configs (`experiments/pretrain/*.yaml`): each validates and builds its
untrained model (no tokenizer, dataset or training needed)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from spd_ray.targets.pretrain import build_model, load_pretrain_config

PRETRAIN = Path(__file__).resolve().parents[2] / "experiments" / "pretrain"
SHIPPED = sorted(PRETRAIN.glob("*.yaml"))
VOCAB = 4096  # the SimpleStories and tiny-LM tokenizers


class _Tokenizer:
    """What `build_model` reads of a tokenizer: its length and special-token ids."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 0

    def __len__(self) -> int:
        return VOCAB


def test_pretrain_configs_exist():
    assert SHIPPED, f"no YAML under {PRETRAIN}"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_pretrain_config_builds_its_model(path: Path):
    text = path.read_text()
    header = "\n".join(itertools.takewhile(lambda ln: ln.startswith("#"), text.splitlines()))
    assert f"spd-ray pretrain experiments/pretrain/{path.name}" in header, path
    assert "Cost:" in header, path

    config = load_pretrain_config(path)
    assert config.steps > 0 and config.out_dir
    model = build_model(config, _Tokenizer())  # type: ignore[arg-type]
    assert f"{type(model).__module__.split('.')[0]}.{type(model).__name__}" == config.model_class
    for key, value in config.arch.items():
        assert getattr(model.config, key) == value, key
    assert model.config.vocab_size == VOCAB
    assert config.max_seq_len <= model.config.max_position_embeddings
    x = torch.randint(0, VOCAB, (1, 8))
    with torch.no_grad():
        logits = model(input_ids=x).logits
    assert logits.shape == (1, 8, VOCAB) and torch.isfinite(logits).all()
