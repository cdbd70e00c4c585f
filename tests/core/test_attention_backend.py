"""Which attention kernel a training step runs with: PyTorch's math attention for short sequences
on CPU (its CPU flash backward is the slow part of a tiny Llama's step), PyTorch's own choice for
long sequences, on GPUs and for models without attention."""

from __future__ import annotations

import pytest
import torch

from spd_ray.core.step import CPU_MATH_ATTENTION_MAX_LEN, attention_backend, sequence_length
from spd_ray.registry import load_experiment

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _flash_on_inside(experiment: str, device: torch.device, *overrides: str) -> bool:
    _, config = load_experiment(experiment, list(overrides))
    with attention_backend(config, device):
        return torch.backends.cuda.flash_sdp_enabled()


def test_sequence_lengths_of_the_registry():
    assert sequence_length(load_experiment("tiny_llama_1L", [])[1]) == 64
    assert sequence_length(load_experiment("ih", [])[1]) == 16
    assert sequence_length(load_experiment("tms_5-2", [])[1]) is None


@pytest.mark.parametrize(
    ("experiment", "device", "overrides", "flash"),
    [
        ("tiny_llama_1L", CPU, (), False),  # 64 tokens on CPU: math
        ("ih", CPU, (), False),
        (
            "tiny_llama_1L",
            CPU,
            (f"task_config.max_seq_len={CPU_MATH_ATTENTION_MAX_LEN + 1}",),
            True,
        ),
        ("tiny_llama_1L", CUDA, (), True),  # GPUs keep PyTorch's choice
        ("tms_5-2", CPU, (), True),  # no attention: nothing changed
    ],
)
def test_math_attention_only_for_short_sequences_on_cpu(
    experiment: str, device: torch.device, overrides: tuple[str, ...], flash: bool
):
    assert torch.backends.cuda.flash_sdp_enabled()
    assert _flash_on_inside(experiment, device, *overrides) is flash
    assert torch.backends.cuda.flash_sdp_enabled()  # restored on the way out
