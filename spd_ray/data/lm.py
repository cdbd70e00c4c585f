"""Token streams for language-model decomposition and pretraining: the LM counterpart of
`spd_ray.data.toy.ToyBatches`.

`LMBatches` loads a dataset with `datasets.load_dataset(name, split=..., streaming=...)` (a hub id,
a local folder such as the one `spd_ray.data.stories` writes, or a single jsonl/json/parquet/csv/
txt file), gives each data-parallel rank its own shard, turns text into `max_seq_len`-token rows
and yields endless, seeded, resumable batches of `LongTensor[batch_size // world_size,
max_seq_len]`.

Text becomes rows block by block: `block_docs` consecutive documents are tokenized, joined with
EOS after every document and cut into `max_seq_len` rows, dropping the block's tail. Ranks receive
whole blocks (contiguous ranges, like `Dataset.shard(contiguous=True)` rounded to blocks), so the
rows of all ranks together are exactly the rows of one worker and no row reaches two ranks. A
pre-tokenized column (`is_tokenized`) is truncated to `max_seq_len` and used as is.

Map-style datasets are tokenized once per rank shard and cached on disk (`cache_dir`, keyed by a
hash of dataset fingerprint, split, column, tokenizer, `max_seq_len` and the shard). Each epoch
visits the shard in a seeded permutation. Streaming datasets are split with
`datasets.distributed.split_dataset_by_node` and shuffled with a seeded buffer whose seed moves
with the epoch.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch
from datasets.distributed import split_dataset_by_node
from jaxtyping import Int
from torch import Tensor
from transformers import AutoTokenizer, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

_FILE_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".txt": "text",
}
# transformers uses a huge sentinel for "no limit"; anything below this is a real limit.
_NO_LIMIT = 10**9
_CACHE_FORMAT = 1


def _is_local(name: str) -> bool:
    """Paths, not hub ids: absolute, home-relative or dot-relative, or an existing path."""
    return name.startswith(("/", "~", ".")) or Path(name).exists()


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """`AutoTokenizer.from_pretrained(name)` for a hub id or a local folder."""
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(f"tokenizer_name {name!r}: no such local folder")
        name = str(path)
    return AutoTokenizer.from_pretrained(name)


def load_lm_dataset(
    name: str, split: str, streaming: bool
) -> datasets.Dataset | datasets.IterableDataset:
    """`load_dataset(name, split=split, streaming=streaming)`; a single data file is loaded with
    the builder its suffix names (`json`, `parquet`, `csv`, `text`) as that split."""
    if _is_local(name):
        path = Path(name).expanduser()
        if not path.exists():
            raise FileNotFoundError(f"dataset_name {name!r}: no such local file or folder")
        if path.is_file():
            if path.suffix not in _FILE_BUILDERS:
                raise ValueError(
                    f"dataset_name {name!r}: unknown file type {path.suffix!r}; expected one of "
                    f"{sorted(_FILE_BUILDERS)} or a folder"
                )
            return datasets.load_dataset(
                _FILE_BUILDERS[path.suffix],
                data_files={split: str(path)},
                split=split,
                streaming=streaming,
            )
        name = str(path)
    return datasets.load_dataset(name, split=split, streaming=streaming)


def _check_column(ds: datasets.Dataset | datasets.IterableDataset, column: str, name: str) -> None:
    columns = ds.column_names
    if columns is None:  # a streaming dataset without declared features: look at one row
        columns = list(next(iter(ds)).keys())
    if column not in columns:
        raise ValueError(f"column_name {column!r} is not in dataset {name!r}; columns: {columns}")


def tokenize_block(
    texts: list[str], tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> Int[np.ndarray, "rows max_seq_len"]:
    """Tokenize documents, append EOS to each, concatenate and cut into `max_seq_len` rows (the
    tail shorter than a row is dropped)."""
    eos = tokenizer.eos_token_id
    assert isinstance(eos, int), f"tokenizer {tokenizer.name_or_path!r} has no eos_token_id"
    encoded = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    flat = np.fromiter(
        (t for ids in encoded for t in (*ids, eos)),
        dtype=np.int32,
        count=sum(len(ids) + 1 for ids in encoded),
    )
    n_rows = len(flat) // max_seq_len
    return flat[: n_rows * max_seq_len].reshape(n_rows, max_seq_len)


def truncate_block(
    rows: list[list[int]], max_seq_len: int, column: str, first_row: int
) -> Int[np.ndarray, "rows max_seq_len"]:
    """Pre-tokenized rows, each truncated to `max_seq_len` (shorter rows are an error)."""
    for i, row in enumerate(rows):
        if len(row) < max_seq_len:
            raise ValueError(
                f"column {column!r} row {first_row + i} has {len(row)} tokens, fewer than "
                f"max_seq_len {max_seq_len}"
            )
    return np.asarray([row[:max_seq_len] for row in rows], dtype=np.int32).reshape(
        len(rows), max_seq_len
    )


def shard_blocks(n_rows: int, block_docs: int, rank: int, world_size: int) -> tuple[int, int]:
    """Row range [start, stop) of `rank`: a contiguous run of whole blocks of `block_docs` rows."""
    n_blocks = -(-n_rows // block_docs)
    if n_blocks < world_size:
        raise ValueError(
            f"{n_rows} rows make {n_blocks} blocks of block_docs={block_docs}, fewer than "
            f"world_size {world_size}: every rank needs at least one block (lower block_docs)"
        )
    first, last = n_blocks * rank // world_size, n_blocks * (rank + 1) // world_size
    return first * block_docs, min(last * block_docs, n_rows)


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase | None) -> str:
    if tokenizer is None:
        return "none"
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab()))
    blob = f"{type(tokenizer).__name__}|{tokenizer.eos_token_id}|{spec}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def default_cache_dir() -> Path:
    """Beside the `datasets` cache (honours HF_DATASETS_CACHE / HF_HOME)."""
    return Path(datasets.config.HF_DATASETS_CACHE) / "spd_ray_lm_tokens"


class LMBatches:
    """An endless, resumable stream of token batches, sharded over data-parallel ranks.

    Each rank reads only its own shard. `state_dict()` holds the number of batches served, which
    all ranks share (every rank serves one batch per step); `load_state_dict` resumes exactly on
    the same `world_size`. On another world size, each rank continues its new shard at the same
    step count (a valid stream, not the uninterrupted one). A streaming dataset resumes by
    replaying the batches served, which costs one pass over the data already used.
    """

    def __init__(
        self,
        dataset_name: str,
        split: str,
        column_name: str,
        tokenizer: PreTrainedTokenizerBase | str | None,
        max_seq_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
        *,
        is_tokenized: bool = False,
        streaming: bool = False,
        buffer_size: int = 1000,
        shuffle_each_epoch: bool = True,
        cache_dir: str | Path | None = None,
        block_docs: int = 1000,
    ):
        assert world_size > 0 and 0 <= rank < world_size, f"rank {rank} of world_size {world_size}"
        assert max_seq_len > 0 and block_docs > 0 and buffer_size > 0
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by world_size {world_size}: every rank "
                "must take an equal shard of the global batch"
            )
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None and not is_tokenized:
            raise ValueError(f"dataset {dataset_name!r} holds text: a tokenizer is required")
        if tokenizer is not None:
            limit = tokenizer.model_max_length
            if limit < _NO_LIMIT and max_seq_len > limit:
                raise ValueError(
                    f"max_seq_len {max_seq_len} is larger than model_max_length {limit} of "
                    f"tokenizer {tokenizer.name_or_path!r}"
                )
        self.dataset_name, self.split, self.column_name = dataset_name, split, column_name
        self.tokenizer = tokenizer
        self.max_seq_len, self.batch_size, self.seed = max_seq_len, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.local_batch_size = batch_size // world_size
        self.is_tokenized, self.streaming = is_tokenized, streaming
        self.shuffle_each_epoch, self.block_docs = shuffle_each_epoch, block_docs
        self.batches_served = 0
        self.cache_hit = False
        self.cache_path: Path | None = None

        ds = load_lm_dataset(dataset_name, split, streaming)
        _check_column(ds, column_name, dataset_name)
        if isinstance(ds, datasets.IterableDataset):
            ds = split_dataset_by_node(ds, rank=rank, world_size=world_size)
            self._stream = ds.shuffle(seed=seed, buffer_size=buffer_size)
            self._rows: Iterator[np.ndarray] = self._stream_rows(0)
            self._stream_epoch = 0
        else:
            cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
            self.tokens = self._load_or_tokenize(ds, cache)
            n = len(self.tokens)
            self.batches_per_epoch = n // self.local_batch_size
            if self.batches_per_epoch == 0:
                raise ValueError(
                    f"rank {rank}'s shard of {dataset_name!r} ({split}) has {n} rows of "
                    f"{max_seq_len} tokens, fewer than one local batch of "
                    f"batch_size {batch_size} / world_size {world_size}"
                )
            self._perm_epoch = -1
            self._perm = np.arange(0)

    # ---- map-style ----------------------------------------------------------------------------

    def _cache_key(self, ds: datasets.Dataset, start: int, stop: int) -> str:
        parts = {
            "format": _CACHE_FORMAT,
            "dataset": self.dataset_name,
            "fingerprint": getattr(ds, "_fingerprint", None),
            "split": self.split,
            "column": self.column_name,
            "tokenizer": _tokenizer_digest(self.tokenizer),
            "max_seq_len": self.max_seq_len,
            "is_tokenized": self.is_tokenized,
            "block_docs": self.block_docs,
            "rows": [start, stop],
        }
        return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:20]

    def _load_or_tokenize(self, ds: datasets.Dataset, cache_dir: Path) -> np.ndarray:
        start, stop = shard_blocks(len(ds), self.block_docs, self.rank, self.world_size)
        path = cache_dir / f"{self._cache_key(ds, start, stop)}.npy"
        self.cache_path = path
        if path.exists():
            self.cache_hit = True
            return np.load(path, mmap_mode="r")
        blocks = []
        for lo in range(start, stop, self.block_docs):
            column = ds[lo : min(lo + self.block_docs, stop)][self.column_name]
            blocks.append(self._rows_of_block(list(column), lo))
        tokens = np.concatenate(blocks)
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, tokens)
        os.replace(tmp, path)
        logger.info("tokenized %s rows into %s", tokens.shape, path)
        return tokens

    def _rows_of_block(self, column: list[Any], first_row: int) -> np.ndarray:
        if self.is_tokenized:
            return truncate_block(column, self.max_seq_len, self.column_name, first_row)
        assert self.tokenizer is not None
        return tokenize_block(column, self.tokenizer, self.max_seq_len)

    def _permutation(self, epoch: int) -> np.ndarray:
        key = epoch if self.shuffle_each_epoch else 0
        return np.random.default_rng([self.seed, key, self.rank]).permutation(len(self.tokens))

    def _next_map_style(self) -> np.ndarray:
        epoch, pos = divmod(self.batches_served, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm, self._perm_epoch = self._permutation(epoch), epoch
        b = self.local_batch_size
        return np.asarray(self.tokens[self._perm[pos * b : (pos + 1) * b]])

    # ---- streaming ----------------------------------------------------------------------------

    def _stream_rows(self, epoch: int) -> Iterator[np.ndarray]:
        self._stream.set_epoch(epoch if self.shuffle_each_epoch else 0)
        block: list[Any] = []
        seen = 0
        for example in self._stream:
            block.append(example[self.column_name])
            if len(block) == self.block_docs:
                yield from self._rows_of_block(block, seen)
                seen, block = seen + len(block), []
        if block:
            yield from self._rows_of_block(block, seen)

    def _next_streaming(self) -> np.ndarray:
        """The next local batch; a batch never mixes epochs (an epoch's partial tail is dropped)."""
        b = self.local_batch_size
        rows = list(itertools.islice(self._rows, b))
        if len(rows) < b:
            self._stream_epoch += 1
            self._rows = self._stream_rows(self._stream_epoch)
            rows = list(itertools.islice(self._rows, b))
            if len(rows) < b:
                raise ValueError(
                    f"rank {self.rank}'s stream of {self.dataset_name!r} ({self.split}) has fewer "
                    f"than one local batch ({b} rows of {self.max_seq_len} tokens) per epoch"
                )
        return np.stack(rows)

    # ---- public -------------------------------------------------------------------------------

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> Int[Tensor, "local_batch max_seq_len"]:
        rows = self._next_streaming() if self.streaming else self._next_map_style()
        self.batches_served += 1
        return torch.from_numpy(rows.astype(np.int64)).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "batches_served": self.batches_served,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "max_seq_len"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"LMBatches state has {key} {state[key]}, this stream has {getattr(self, key)}"
                )
        served = int(state["batches_served"])
        if self.streaming:
            self._stream_epoch = 0
            self._rows = self._stream_rows(0)
            for _ in range(served):
                self._next_streaming()
        self.batches_served = served
