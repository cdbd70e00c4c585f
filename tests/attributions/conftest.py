"""Module-scoped tiny float64 decompositions for the attribution tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from attr_models import tiny_gpt2, tiny_llama, tiny_tms

from spd_ray.core.model import ComponentModel


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models on a shared machine: more threads only contend (100x slower under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def llama() -> ComponentModel:
    return tiny_llama()


@pytest.fixture(scope="module")
def gpt2() -> ComponentModel:
    return tiny_gpt2()


@pytest.fixture(scope="module")
def tms() -> ComponentModel:
    return tiny_tms()
