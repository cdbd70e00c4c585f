"""Session-scoped tiny-LM assets for the language-model tests.

`tests/conftest.py` imports these fixtures, so every test can request them (the tests folder is
not a package, so `from tests.lm_conftest_fixtures import ...` does not resolve). The assets are
built once per session in the fast mode of `make_tiny_lm` (`steps=0`: a 2000-story corpus, the
4096-token tokenizer and untrained models; a few seconds), and the `datasets` cache points into
the session's temp folder so no test writes under ~/.cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from spd_ray.targets.tiny_lm import TinyLMAssets


@pytest.fixture(scope="session")
def hf_datasets_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`datasets`' cache (and so LMBatches' default token cache) in a session temp folder."""
    import datasets  # imported here: conftest loads this module for every test session

    cache = tmp_path_factory.mktemp("hf-datasets-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
        yield cache


@pytest.fixture(scope="session")
def tiny_lm_assets(
    tmp_path_factory: pytest.TempPathFactory, hf_datasets_cache: Path
) -> TinyLMAssets:
    import torch

    from spd_ray.targets.tiny_lm import make_tiny_lm

    torch.set_num_threads(1)
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"), steps=0, progress=False)
