"""What a harvest reads, as Ray Data datasets of rows whose content depends only on their id.

Language models: the document ids -> document reader actors (`DocRows`: hold the
`datasets` split and the tokenizer, read their documents by index) -> rows of `max_seq_len`
tokens. Each document is tokenized alone (no packing: an example's context never crosses into
another document) and cut into rows; the last row of a document is padded and carries `n_valid`,
so padding is never counted. A row's uid is `(doc << 32) | offset of its first token`.

Toy models: the block ids -> blocks of `rows_per_block` inputs drawn from the task's
`SparseFeatureDataset` with a generator seeded by (seed, block), so every input is a function of
its index. A toy input's uid is its index.

Rows are limited with `Dataset.limit` under `preserve_order`, so "the first N rows" is the same set
whatever number of actors consumes them. The ids are made on the driver (`ids_dataset`), so every
piece of work that makes rows holds only the reader's fraction of a CPU.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from spd_ray.config import Config, DataGenerationType, LMTaskConfig
from spd_ray.errors import InputError

ROWS_PER_TOY_BLOCK = 1024
DOCS_PER_READ = 64


@dataclass(frozen=True)
class LMSource:
    dataset: str  # resolved name: hub id or absolute local path
    split: str
    column: str
    tokenizer: str | None  # resolved; None when the column holds token ids
    seq_len: int
    n_docs: int

    @property
    def kind(self) -> str:
        return "lm"


@dataclass(frozen=True)
class ToySource:
    task: dict[str, Any]  # the task config as a dict (data_generation_type possibly overridden)
    n_features: int
    seed: int

    @property
    def kind(self) -> str:
        return "toy"


Source = LMSource | ToySource

TOY_DATA_TYPES: tuple[str, ...] = typing.get_args(DataGenerationType)


def lm_source(
    config: Config,
    task: LMTaskConfig,
    out_root: Path,
    dataset: str | None,
    split: str | None,
    column: str | None,
) -> LMSource:
    """The run's dataset (or the one named), checked now: it loads, has the column, and has a
    tokenizer to read it with."""
    from spd_ray.data.lm import _check_column, load_lm_dataset
    from spd_ray.targets.hf import resolve_name

    name = resolve_name(dataset or task.dataset_name, "--dataset", out_root)
    split = split or task.train_data_split
    column = column or task.column_name
    try:
        ds = load_lm_dataset(name, split, streaming=False)
    except ValueError as err:
        if "split" in str(err).lower():
            raise InputError(f"--split {split!r}: not in dataset {name!r} ({err})") from None
        raise
    _check_column(ds, column, name)
    tokenizer = None
    if not task.is_tokenized:
        if config.tokenizer_name is None:
            raise InputError("the run's config has no tokenizer_name to read a text dataset with")
        tokenizer = resolve_name(config.tokenizer_name, "tokenizer_name", out_root)
    if len(ds) == 0:
        raise InputError(f"dataset {name!r} split {split!r} is empty")
    return LMSource(name, split, column, tokenizer, task.max_seq_len, len(ds))


class DocRows:
    """Ray Data callable: document ids -> token rows (see the module docstring)."""

    def __init__(self, source: LMSource):
        from spd_ray.data.lm import load_lm_dataset, load_tokenizer

        torch.set_num_threads(1)
        self.source = source
        self.ds = load_lm_dataset(source.dataset, source.split, streaming=False)
        self.tokenizer = load_tokenizer(source.tokenizer) if source.tokenizer else None

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        ids = [int(i) for i in batch["id"]]
        S = self.source.seq_len
        column = list(self.ds.select(ids)[self.source.column])
        if self.tokenizer is not None:
            eos = self.tokenizer.eos_token_id
            encoded = self.tokenizer(column, add_special_tokens=False, verbose=False)["input_ids"]
            docs = [[*ids_, eos] if eos is not None else list(ids_) for ids_ in encoded]
        else:
            docs = [list(map(int, d)) for d in column]
        uids, toks, n_valid, doc_ids, offsets = [], [], [], [], []
        for doc, seq in zip(ids, docs, strict=True):
            for start in range(0, len(seq), S):
                piece = seq[start : start + S]
                row = np.full(S, 0, dtype=np.int32)
                row[: len(piece)] = piece
                toks.append(row)
                n_valid.append(len(piece))
                uids.append((doc << 32) | start)
                doc_ids.append(doc)
                offsets.append(start)
        if not toks:
            return _empty_rows(S)
        return {
            "uid": np.asarray(uids, dtype=np.int64),
            "doc": np.asarray(doc_ids, dtype=np.int64),
            "offset": np.asarray(offsets, dtype=np.int64),
            "tokens": np.stack(toks),
            "n_valid": np.asarray(n_valid, dtype=np.int32),
        }


def _empty_rows(S: int) -> dict[str, np.ndarray]:
    return {
        "uid": np.zeros(0, np.int64),
        "doc": np.zeros(0, np.int64),
        "offset": np.zeros(0, np.int64),
        "tokens": np.zeros((0, S), np.int32),
        "n_valid": np.zeros(0, np.int32),
    }


def toy_block(source: ToySource, block: int) -> np.ndarray:
    """Inputs [ROWS_PER_TOY_BLOCK, n_features] of block `block` (a function of seed and block)."""
    from spd_ray.data.toy import SparseFeatureDataset

    t = source.task
    value_range = (0.0, 1.0) if t["task_name"] == "tms" else (-1.0, 1.0)
    data = SparseFeatureDataset(
        source.n_features,
        t["feature_probability"],
        t["data_generation_type"],
        value_range,
        t.get("synced_inputs"),
    )
    gen = torch.Generator().manual_seed(
        int(np.random.SeedSequence([source.seed, block]).generate_state(1)[0])
    )
    return data.generate_batch(ROWS_PER_TOY_BLOCK, gen).numpy()


def toy_rows(source: ToySource) -> Any:
    def fn(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch.set_num_threads(1)
        xs, uids = [], []
        for b in batch["id"]:
            xs.append(toy_block(source, int(b)))
            uids.append(np.arange(int(b) * ROWS_PER_TOY_BLOCK, (int(b) + 1) * ROWS_PER_TOY_BLOCK))
        return {"uid": np.concatenate(uids).astype(np.int64), "x": np.concatenate(xs)}

    return fn


def ids_dataset(n: int, blocks: int) -> Any:
    """The ids 0..n-1 (column `id`) in `blocks` ordered blocks. On a multi-node cluster they are
    built and put on the driver: `ray.data.range` reads them with tasks of one whole CPU each
    (and `from_arrow`/`from_numpy` describe their blocks with such tasks), which never start on a
    cluster of small nodes whose CPUs the harvest actors hold all but a fraction of. On one
    machine the harvest leaves a CPU free for them, and `range` costs the driver nothing."""
    import ray.data

    from spd_ray.ray_session import is_local_cluster

    if is_local_cluster():
        return ray.data.range(n, override_num_blocks=max(1, min(blocks, n)))
    return ray.data.from_items(
        [{"id": i} for i in range(n)], override_num_blocks=max(1, min(blocks, n))
    )


def build_dataset(source: Source, n_rows: int | None, reader_cpus: float) -> Any:
    """The Ray Data dataset of rows (limited to the first `n_rows` when given)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    if isinstance(source, LMSource):
        ds = ids_dataset(source.n_docs, source.n_docs // 256)
        ds = ds.map_batches(
            DocRows,
            fn_constructor_args=(source,),
            batch_size=DOCS_PER_READ,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=1),
            num_cpus=reader_cpus,
        )
    else:
        assert n_rows is not None, "a toy harvest needs a number of rows"
        n_blocks = -(-n_rows // ROWS_PER_TOY_BLOCK)
        ds = ids_dataset(n_blocks, 64)
        ds = ds.map_batches(
            toy_rows(source), batch_size=1, batch_format="numpy", num_cpus=reader_cpus
        )
    if n_rows is not None:
        ds = ds.limit(n_rows)
    return ds
