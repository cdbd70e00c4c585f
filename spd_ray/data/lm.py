"""Token streams for language-model decomposition and pretraining: the LM counterpart of
`spd_ray.data.toy.ToyBatches`.

`LMBatches` loads a dataset with `datasets.load_dataset(name, split=..., streaming=...)` (a hub id,
a local folder such as the one `spd_ray.data.stories` writes, or a single jsonl/json/parquet/csv/
txt file), turns text into `max_seq_len`-token rows and yields endless, seeded, resumable batches
of `LongTensor[batch_size // world_size, max_seq_len]`.

Virtual shards make the data independent of the number of workers. The split is cut into
`n_shards` virtual shards (`S`; by default `gcd(batch_size, 8)`), a number that depends only on the
config. Shard `s` serves `batch_size // S` rows of every global batch, and global batch `k` is the
concatenation of the shards' `k`-th batches in shard order. Rank `r` of `W` (W must divide S) owns
the contiguous shards `[r * S / W, (r + 1) * S / W)` and reads only those; its local batch is its
shards' batches in shard order, so the ranks' local batches, concatenated in rank order, are the
global batch whatever `W` is, and no document reaches two ranks.

Text becomes rows block by block: `block_docs` consecutive documents (at most `n_rows // S`, so
that every shard gets a block) are tokenized, joined with EOS after every document and cut into
`max_seq_len` rows, dropping the block's tail. Shards receive whole blocks (contiguous ranges, like
`Dataset.shard(contiguous=True)` rounded to blocks). A pre-tokenized column (`is_tokenized`) is
truncated to `max_seq_len` and used as is.

Map-style datasets are tokenized once per virtual shard and cached on disk (`cache_dir`, keyed by
a hash of dataset fingerprint, split, column, tokenizer, `max_seq_len`, `block_docs` and the
shard's document range, so 1 and N workers share the files). Each shard visits its rows in a
permutation seeded by `(seed, shard, epoch)` and wraps its own epochs (shards may hold different
numbers of rows). Streaming datasets are split into the virtual shards with
`datasets.distributed.split_dataset_by_node(ds, rank=s, world_size=S)` and shuffled with a buffer
seeded by `(seed, epoch)`: `datasets` shuffles before it splits, so the seed is common to all
shards (a per-shard seed would break the partition); each shard wraps its own epochs. Without
enough files for the shards, every shard reads the whole stream and keeps every S-th document.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
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

from spd_ray.config import LMTaskConfig
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import atomic_write

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
            raise NotFoundError(f"tokenizer_name {name!r}: no such local folder")
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
            raise NotFoundError(f"dataset_name {name!r}: no such local file or folder")
        if path.is_file():
            if path.suffix not in _FILE_BUILDERS:
                raise InputError(
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
        raise InputError(f"column_name {column!r} is not in dataset {name!r}; columns: {columns}")


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
            raise InputError(
                f"column {column!r} row {first_row + i} has {len(row)} tokens, fewer than "
                f"max_seq_len {max_seq_len}"
            )
    return np.asarray([row[:max_seq_len] for row in rows], dtype=np.int32).reshape(
        len(rows), max_seq_len
    )


def shard_blocks(n_rows: int, block_docs: int, rank: int, world_size: int) -> tuple[int, int]:
    """Row range [start, stop) of shard `rank` of `world_size`: a contiguous run of whole blocks
    of `block_docs` rows (the shards together cover [0, n_rows) without overlap)."""
    n_blocks = -(-n_rows // block_docs)
    if n_blocks < world_size:
        raise InputError(
            f"{n_rows} rows make {n_blocks} blocks of block_docs={block_docs}, fewer than "
            f"{world_size} shards: every shard needs at least one block (lower block_docs)"
        )
    first, last = n_blocks * rank // world_size, n_blocks * (rank + 1) // world_size
    return first * block_docs, min(last * block_docs, n_rows)


def default_n_shards(batch_size: int) -> int:
    """`gcd(batch_size, 8)`: 1, 2, 4 or 8 workers split the data alike for a batch size that
    is a multiple of 8."""
    return math.gcd(batch_size, 8)


def owned_shards(n_shards: int, rank: int, world_size: int) -> range:
    """The contiguous virtual shards of `rank`: `[rank * S / W, (rank + 1) * S / W)`."""
    per_rank = n_shards // world_size
    return range(rank * per_rank, (rank + 1) * per_rank)


def _stream_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of a streaming epoch: a 32-bit seed from (seed, epoch), never from the
    world size. It is the same for every virtual shard: `datasets` shuffles (the file order and
    the buffer) before it splits by node, so only a shared seed makes the shards a partition."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def _save_npy(path: Path, tokens: np.ndarray) -> None:
    # Through a handle: np.save would append ".npy" to the temp file's name.
    with path.open("wb") as f:
        np.save(f, tokens)


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
    """An endless, resumable stream of token batches, sharded over data-parallel ranks through
    `n_shards` virtual shards (see the module docstring): the global batch of every step is the
    same on any `world_size` dividing `n_shards`, and each rank reads only its own shards.

    Map-style attributes: `shard_tokens` maps each owned shard to its rows (`tokens` is their
    concatenation in shard order: this rank's rows), `shard_ranges` to its document range,
    `cache_paths` to its cache file (`cache_path` is the first), `cache_hit` is whether every
    owned shard was read from the cache, `shard_batches_per_epoch` maps each owned shard to the
    steps of one of its epochs and `batches_per_epoch` is the least of them (the steps before the
    first owned shard wraps).

    `state_dict()` holds the global steps served (with seed, batch_size, max_seq_len and n_shards
    for validation); it is the same on every rank and world size, so a checkpoint of any rank of
    any world size resumes exactly on any other. Map-style streams resume by arithmetic; a
    streaming dataset resumes by replaying its owned shards' rows served, which costs one pass over
    the data already used.
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
        n_shards: int | None = None,
    ):
        assert world_size > 0 and 0 <= rank < world_size, f"rank {rank} of world_size {world_size}"
        assert max_seq_len > 0 and block_docs > 0 and buffer_size > 0 and batch_size > 0
        n_shards = default_n_shards(batch_size) if n_shards is None else n_shards
        if n_shards <= 0 or batch_size % n_shards != 0:
            raise InputError(
                f"batch_size {batch_size} is not divisible by n_shards {n_shards}: every virtual "
                "shard serves an equal part of the global batch"
            )
        if n_shards % world_size != 0:
            origin = "gcd(batch_size, 8)" if n_shards == default_n_shards(batch_size) else "given"
            raise InputError(
                f"batch_size {batch_size} is split into {n_shards} data shards ({origin}), "
                f"which world_size {world_size} does not divide: every worker must own the same "
                f"number of shards; use a number of workers dividing {n_shards}, or a batch_size "
                "divisible by 8 with 1, 2, 4 or 8 workers"
            )
        if isinstance(tokenizer, str):
            tokenizer = load_tokenizer(tokenizer)
        if tokenizer is None and not is_tokenized:
            raise InputError(f"dataset {dataset_name!r} holds text: a tokenizer is required")
        if tokenizer is not None:
            limit = tokenizer.model_max_length
            if limit < _NO_LIMIT and max_seq_len > limit:
                raise InputError(
                    f"max_seq_len {max_seq_len} is larger than model_max_length {limit} of "
                    f"tokenizer {tokenizer.name_or_path!r}"
                )
        self.dataset_name, self.split, self.column_name = dataset_name, split, column_name
        self.tokenizer = tokenizer
        self.max_seq_len, self.batch_size, self.seed = max_seq_len, batch_size, seed
        self.rank, self.world_size, self.device = rank, world_size, device
        self.n_shards = n_shards
        self.shards = owned_shards(n_shards, rank, world_size)
        self.shard_batch_size = batch_size // n_shards
        self.local_batch_size = batch_size // world_size
        self.is_tokenized, self.streaming = is_tokenized, streaming
        self.shuffle_each_epoch, self.block_docs = shuffle_each_epoch, block_docs
        self.buffer_size = buffer_size
        self.batches_served = 0
        self.cache_hit = False
        self.cache_path: Path | None = None
        self.cache_paths: dict[int, Path] = {}

        ds = load_lm_dataset(dataset_name, split, streaming)
        _check_column(ds, column_name, dataset_name)
        if isinstance(ds, datasets.IterableDataset):
            self._streams = {
                s: split_dataset_by_node(ds, rank=s, world_size=n_shards) for s in self.shards
            }
            self._stream_epochs = dict.fromkeys(self.shards, 0)
            self._rows = {s: self._stream_rows(s, 0) for s in self.shards}
        else:
            self._init_map_style(ds, cache_dir)

    @classmethod
    def for_task(
        cls,
        task: LMTaskConfig,
        dataset_name: str,
        split: str,
        tokenizer: PreTrainedTokenizerBase | str | None,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ) -> LMBatches:
        """A stream of a run's language-model task: its column, sequence length and reading
        options from `task`; the dataset name (resolved by the caller), split, tokenizer, batch,
        seed and shard from the arguments."""
        return cls(
            dataset_name,
            split,
            task.column_name,
            tokenizer,
            task.max_seq_len,
            batch_size,
            seed,
            rank,
            world_size,
            device,
            is_tokenized=task.is_tokenized,
            streaming=task.streaming,
            buffer_size=task.buffer_size,
            shuffle_each_epoch=task.shuffle_each_epoch,
        )

    # ---- map-style ----------------------------------------------------------------------------

    def _init_map_style(self, ds: datasets.Dataset, cache_dir: str | Path | None) -> None:
        n_docs = len(ds)
        if n_docs < self.n_shards:
            raise InputError(
                f"split {self.split!r} of {self.dataset_name!r} has {n_docs} rows, fewer than "
                f"n_shards {self.n_shards} (from batch_size {self.batch_size}): every data shard "
                "needs at least one document"
            )
        # Small splits: shrink the blocks so that every shard gets at least one.
        self.block_docs = min(self.block_docs, n_docs // self.n_shards)
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        self.shard_ranges = {
            s: shard_blocks(n_docs, self.block_docs, s, self.n_shards) for s in self.shards
        }
        hits = []
        self.shard_tokens: dict[int, np.ndarray] = {}
        for s, (start, stop) in self.shard_ranges.items():
            tokens, hit = self._load_or_tokenize(ds, cache, s, start, stop)
            self.shard_tokens[s] = tokens
            hits.append(hit)
        self.cache_hit = all(hits)
        self.cache_path = self.cache_paths[self.shards[0]]
        m = self.shard_batch_size
        self.shard_batches_per_epoch = {s: len(t) // m for s, t in self.shard_tokens.items()}
        for s, n_batches in self.shard_batches_per_epoch.items():
            if n_batches == 0:
                raise InputError(
                    f"data shard {s} of {self.n_shards} of {self.dataset_name!r} ({self.split}) "
                    f"has {len(self.shard_tokens[s])} rows of {self.max_seq_len} tokens, fewer "
                    f"than one local batch of {m} rows (batch_size {self.batch_size} / n_shards "
                    f"{self.n_shards}); use a smaller batch_size or max_seq_len or more data"
                )
        self.batches_per_epoch = min(self.shard_batches_per_epoch.values())
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    @property
    def tokens(self) -> np.ndarray:
        """This rank's rows: its shards' rows concatenated in shard order (a copy)."""
        return np.concatenate([self.shard_tokens[s] for s in self.shards])

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

    def _load_or_tokenize(
        self, ds: datasets.Dataset, cache_dir: Path, shard: int, start: int, stop: int
    ) -> tuple[np.ndarray, bool]:
        """Shard `shard`'s rows (documents [start, stop)) and whether they came from the cache."""
        path = cache_dir / f"{self._cache_key(ds, start, stop)}.npy"
        self.cache_paths[shard] = path
        if path.exists():
            return np.load(path, mmap_mode="r"), True
        blocks = [np.zeros((0, self.max_seq_len), dtype=np.int32)]
        for lo in range(start, stop, self.block_docs):
            column = ds[lo : min(lo + self.block_docs, stop)][self.column_name]
            blocks.append(self._rows_of_block(list(column), lo))
        tokens = np.concatenate(blocks)
        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write(path, lambda tmp: _save_npy(tmp, tokens))
        logger.info("tokenized shard %d: %s rows into %s", shard, tokens.shape, path)
        return tokens, False

    def _rows_of_block(self, column: list[Any], first_row: int) -> np.ndarray:
        if self.is_tokenized:
            return truncate_block(column, self.max_seq_len, self.column_name, first_row)
        assert self.tokenizer is not None
        return tokenize_block(column, self.tokenizer, self.max_seq_len)

    def _permutation(self, shard: int, epoch: int) -> np.ndarray:
        key = epoch if self.shuffle_each_epoch else 0
        n = len(self.shard_tokens[shard])
        return np.random.default_rng([self.seed, shard, key]).permutation(n)

    def _next_map_style(self, shard: int) -> np.ndarray:
        """Shard `shard`'s rows of global step `batches_served`: pure arithmetic on the step."""
        epoch, pos = divmod(self.batches_served, self.shard_batches_per_epoch[shard])
        cached = self._perms.get(shard)
        if cached is None or cached[0] != epoch:
            cached = (epoch, self._permutation(shard, epoch))
            self._perms[shard] = cached
        m = self.shard_batch_size
        return np.asarray(self.shard_tokens[shard][cached[1][pos * m : (pos + 1) * m]])

    # ---- streaming ----------------------------------------------------------------------------

    def _stream_rows(self, shard: int, epoch: int) -> Iterator[np.ndarray]:
        key = epoch if self.shuffle_each_epoch else 0
        stream = self._streams[shard].shuffle(
            seed=_stream_seed(self.seed, key), buffer_size=self.buffer_size
        )
        block: list[Any] = []
        seen = 0
        for example in stream:
            block.append(example[self.column_name])
            if len(block) == self.block_docs:
                yield from self._rows_of_block(block, seen)
                seen, block = seen + len(block), []
        if block:
            yield from self._rows_of_block(block, seen)

    def _next_streaming(self, shard: int) -> np.ndarray:
        """Shard `shard`'s next rows; they never mix epochs (an epoch's partial tail is dropped)."""
        m = self.shard_batch_size
        rows = list(itertools.islice(self._rows[shard], m))
        if len(rows) < m:
            self._stream_epochs[shard] += 1
            self._rows[shard] = self._stream_rows(shard, self._stream_epochs[shard])
            rows = list(itertools.islice(self._rows[shard], m))
            if len(rows) < m:
                raise InputError(
                    f"data shard {shard} of {self.n_shards} of the stream of "
                    f"{self.dataset_name!r} ({self.split}) has fewer than one local batch ({m} "
                    f"rows of {self.max_seq_len} tokens, batch_size {self.batch_size} / n_shards "
                    f"{self.n_shards}) per epoch"
                )
        return np.stack(rows)

    # ---- public -------------------------------------------------------------------------------

    def __iter__(self) -> LMBatches:
        return self

    def __next__(self) -> Int[Tensor, "local_batch max_seq_len"]:
        step = self._next_streaming if self.streaming else self._next_map_style
        rows = np.concatenate([step(s) for s in self.shards])
        self.batches_served += 1
        return torch.from_numpy(rows.astype(np.int64)).to(self.device)

    def state_dict(self) -> dict[str, Any]:
        """Rank- and world-size-independent: the global steps served and the stream's identity."""
        return {
            "batches_served": self.batches_served,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
            "n_shards": self.n_shards,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue after `state["batches_served"]` global steps, on any rank and world size."""
        if "n_shards" not in state:
            raise InputError(
                "LMBatches state has no n_shards: it was saved before virtual data shards and "
                "cannot be resumed exactly"
            )
        for key in ("seed", "batch_size", "max_seq_len", "n_shards"):
            if state[key] != getattr(self, key):
                raise InputError(
                    f"LMBatches state has {key} {state[key]}, this stream has {getattr(self, key)}"
                )
        served = int(state["batches_served"])
        if self.streaming:
            for s in self.shards:
                self._stream_epochs[s] = 0
                self._rows[s] = self._stream_rows(s, 0)
                for _ in range(served):
                    self._next_streaming(s)
        self.batches_served = served
