"""LM token streams: shapes, EOS joining, virtual shards (the same global batch on any world size,
disjoint reads), shuffling, resume across world sizes, cache, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import spd_ray.data.lm as lm
from spd_ray.data.lm import LMBatches, load_tokenizer, shard_blocks, tokenize_block
from spd_ray.targets.tiny_lm import TinyLMAssets

SEQ = 64


@pytest.fixture(scope="module")
def tok(tiny_lm_assets: TinyLMAssets):
    return load_tokenizer(str(tiny_lm_assets.tokenizer))


@pytest.fixture(scope="module")
def corpus(tiny_lm_assets: TinyLMAssets) -> str:
    return str(tiny_lm_assets.corpus)


@pytest.fixture(scope="module")
def token_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-tokenized dataset of 48 distinct rows of 20 ids (row i starts with i)."""
    return _jsonl_rows(tmp_path_factory.mktemp("pretokenized"), 48)


def _jsonl_rows(folder: Path, n: int) -> Path:
    """`n` distinct pre-tokenized rows of 20 ids; row i starts with i (its document index)."""
    rows = [[i] + [(7 * i + j) % 50 for j in range(19)] for i in range(n)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return folder


@pytest.fixture(scope="module")
def uneven_rows(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """52 rows: with 8 shards and blocks of 6 documents, shard 7 holds 10 rows, the others 6."""
    return _jsonl_rows(tmp_path_factory.mktemp("uneven"), 52)


@pytest.fixture(scope="module")
def token_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A token cache shared by the tests that read the corpus alike (tokenized once)."""
    return tmp_path_factory.mktemp("token-cache")


def _stories(corpus: str, split: str) -> list[str]:
    lines = (Path(corpus) / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line)["story"] for line in lines]


def _epoch_rows(stream: LMBatches, n_batches: int) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for _ in range(n_batches) for row in next(stream)]


def _ranks(world: int, make) -> list[LMBatches]:
    return [make(rank, world) for rank in range(world)]


def _global(streams: list[LMBatches]) -> torch.Tensor:
    """The global batch: the ranks' local batches concatenated in rank order."""
    return torch.cat([next(s) for s in streams], 0)


def test_batches_are_token_rows_joined_with_eos(corpus, tok, token_cache):
    stream = LMBatches(corpus, "test", "story", tok, SEQ, 8, seed=0, cache_dir=token_cache)
    batch = next(stream)
    assert batch.shape == (8, SEQ) and batch.dtype == torch.int64
    assert batch.min() >= 0 and batch.max() < len(tok)
    # 8 shards (gcd(8, 8)) of 200 stories: blocks shrink from 1000 to 25 documents.
    texts = _stories(corpus, "test")
    assert stream.n_shards == 8 and stream.block_docs == 25 == len(texts) // 8
    # Rows are the concatenation of a block's documents, each followed by EOS, cut into SEQ
    # tokens (the block's tail dropped); the stream's rows are the blocks' rows in order.
    expected = []
    for lo in range(0, len(texts), stream.block_docs):
        flat: list[int] = []
        for text in texts[lo : lo + stream.block_docs]:
            flat += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        expected.append(np.asarray(flat[: len(flat) // SEQ * SEQ]).reshape(-1, SEQ))
    assert np.array_equal(stream.shard_tokens[0], expected[0])
    assert np.array_equal(stream.tokens, np.concatenate(expected))
    assert (stream.tokens == tok.eos_token_id).sum() >= len(texts) - 8
    assert "named" in tok.decode(expected[0][:4].reshape(-1))


def test_map_style_shards_partition_the_rows(corpus, tok, token_cache):
    def make(rank: int, world: int) -> LMBatches:
        return LMBatches(
            corpus, "test", "story", tok, SEQ, 8, 0, rank, world, block_docs=15,
            cache_dir=token_cache,
        )  # fmt: skip

    single = make(0, 1)
    assert list(single.shards) == list(range(8))
    ranges = [single.shard_ranges[s] for s in range(8)]
    # the shards' document ranges are contiguous, disjoint and cover the split
    assert ranges[0][0] == 0 and ranges[-1][1] == 200
    assert all(a[1] == b[0] and a[0] < a[1] for a, b in zip(ranges, ranges[1:], strict=False))
    assert ranges == [shard_blocks(200, 15, s, 8) for s in range(8)]
    for world in (2, 4):
        streams = _ranks(world, make)
        # each rank holds exactly its own contiguous shards, read from the same cache files
        owned = [list(s.shards) for s in streams]
        assert sum(owned, []) == list(range(8)) and all(len(o) == 8 // world for o in owned)
        assert all(s.cache_hit for s in streams)
        assert {r: p for s in streams for r, p in s.shard_ranges.items()} == single.shard_ranges
        # rank order concatenation is the one-worker row list: a union, with nothing shared
        assert np.array_equal(np.concatenate([s.tokens for s in streams]), single.tokens)


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_partition_pretokenized_rows_over_an_epoch(token_rows, tmp_path, streaming):
    def epoch(rank: int, world: int) -> list[tuple[int, ...]]:
        s = LMBatches(
            str(token_rows), "train", "input_ids", None, 16, 12, 3, rank, world,
            is_tokenized=True, streaming=streaming, block_docs=4, buffer_size=8,
            cache_dir=tmp_path,
        )  # fmt: skip
        assert s.n_shards == 4
        return _epoch_rows(s, 4)  # 48 rows / 12 per global batch

    single = epoch(0, 1)
    assert len(set(single)) == 48 and all(len(r) == 16 for r in single)
    for world in (2, 4):
        shards = [epoch(r, world) for r in range(world)]
        seen = [row for shard in shards for row in shard]
        assert len(seen) == len(set(seen)) == 48  # no row on two ranks
        assert set(seen) == set(single)  # and together every row


@pytest.mark.parametrize("source", ["uneven", "stories"])
def test_global_batch_is_the_same_on_any_world_size(source, uneven_rows, corpus, tok, token_cache):
    def make(rank: int, world: int) -> LMBatches:
        if source == "uneven":
            return LMBatches(
                str(uneven_rows), "train", "input_ids", None, 16, 8, 5, rank, world,
                is_tokenized=True, cache_dir=token_cache,
            )  # fmt: skip
        return LMBatches(corpus, "test", "story", tok, SEQ, 8, 5, rank, world,
                         cache_dir=token_cache)  # fmt: skip

    single = make(0, 1)
    per_shard = single.shard_batches_per_epoch
    if source == "uneven":  # shards wrap their own epochs at different steps
        assert per_shard == {**dict.fromkeys(range(7), 6), 7: 10}
    n_steps = 2 * max(per_shard.values()) + 1  # past every shard's second epoch boundary
    expected = [next(single) for _ in range(n_steps)]
    for world in (2, 4):
        streams = _ranks(world, make)
        for k, batch in enumerate(expected):
            assert torch.equal(_global(streams), batch), (world, k)
        if source == "uneven":
            # rank r's rows (first id = document index) come only from its own shards' documents
            for stream in streams:
                docs = {d for s in stream.shards for d in range(*stream.shard_ranges[s])}
                stream.load_state_dict(single.state_dict() | {"batches_served": 0})
                firsts = {int(row[0]) for _ in range(n_steps) for row in next(stream)}
                assert firsts == docs


@pytest.mark.parametrize("source", ["uneven", "stories"])
def test_streamed_global_batch_is_the_same_on_any_world_size(source, uneven_rows, corpus, tok):
    def make(rank: int, world: int) -> LMBatches:
        if source == "uneven":  # 6 or 7 rows a shard: crosses the shards' epoch boundaries
            return LMBatches(
                str(uneven_rows), "train", "input_ids", None, 16, 8, 4, rank, world,
                is_tokenized=True, streaming=True, buffer_size=4, block_docs=2,
            )  # fmt: skip
        return LMBatches(corpus, "test", "story", tok, SEQ, 8, 4, rank, world, streaming=True,
                         buffer_size=20, block_docs=5)  # fmt: skip

    single = make(0, 1)
    expected = [next(single) for _ in range(15 if source == "uneven" else 4)]
    for world in (2, 4) if source == "uneven" else (2,):
        streams = _ranks(world, make)
        for k, batch in enumerate(expected):
            assert torch.equal(_global(streams), batch), (world, k)


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_moves_between_world_sizes(corpus, tok, token_cache, uneven_rows, streaming):
    def make(rank: int, world: int) -> LMBatches:
        if streaming:
            return LMBatches(
                str(uneven_rows), "train", "input_ids", None, 16, 8, 2, rank, world,
                is_tokenized=True, streaming=True, buffer_size=4, block_docs=3,
            )  # fmt: skip
        return LMBatches(corpus, "test", "story", tok, SEQ, 8, 2, rank, world,
                         cache_dir=token_cache)  # fmt: skip

    k = 9 if streaming else 60  # past the first epoch of every shard
    one = make(0, 1)
    for _ in range(k):
        next(one)
    state = one.state_dict()
    expected = [next(one) for _ in range(3)]
    two = _ranks(2, make)
    for stream in two:
        stream.load_state_dict(state)  # a checkpoint of the single worker, on 2 workers
    for batch in expected:
        assert torch.equal(_global(two), batch)
    # and back: the state of rank 1 of 2 workers resumes 1 worker
    state = two[1].state_dict()
    assert state == two[0].state_dict()
    again = make(0, 1)
    again.load_state_dict(state)
    assert torch.equal(next(again), _global(two))


def test_small_split_with_large_blocks_works_on_several_ranks(corpus, tok, token_cache):
    # 200 stories, block_docs=1000 (the default): blocks shrink to 25 stories, one per shard.
    for world in (2, 4):
        streams = _ranks(
            world,
            lambda r, w: LMBatches(
                corpus, "test", "story", tok, SEQ, 8, 0, r, w, cache_dir=token_cache
            ),  # fmt: skip
        )
        assert [s.block_docs for s in streams] == [25] * world
        assert _global(streams).shape == (8, SEQ)
    with pytest.raises(ValueError, match=r"batch_size 8 .*8 data shards.*world_size 3"):
        LMBatches(corpus, "test", "story", tok, SEQ, 8, 0, 0, 3, cache_dir=token_cache)


@pytest.mark.parametrize("streaming", [False, True])
def test_each_epoch_is_reshuffled_unless_disabled(token_rows, tmp_path, streaming):
    def two_epochs(shuffle_each_epoch: bool) -> tuple[list, list]:
        s = LMBatches(
            str(token_rows), "train", "input_ids", None, 8, 12, 0, is_tokenized=True,
            streaming=streaming, buffer_size=16, shuffle_each_epoch=shuffle_each_epoch,
            block_docs=4, cache_dir=tmp_path,
        )  # fmt: skip
        return _epoch_rows(s, 4), _epoch_rows(s, 4)

    first, second = two_epochs(True)
    assert first != second and sorted(first) == sorted(second)
    first, second = two_epochs(False)
    assert first == second
    assert first != sorted(first)  # shuffled all the same


@pytest.mark.parametrize("streaming", [False, True])
def test_resume_continues_the_stream_exactly(corpus, tok, tmp_path, streaming):
    def make() -> LMBatches:
        return LMBatches(
            corpus, "test", "story", tok, SEQ, 8, 11, is_tokenized=False, streaming=streaming,
            buffer_size=50, block_docs=40, cache_dir=tmp_path,
        )  # fmt: skip

    ref = make()
    k = 55  # past the first epoch (49 batches of 8 x 64 tokens in 200 stories)
    for _ in range(k):
        next(ref)
    state = ref.state_dict()
    expected = [next(ref) for _ in range(3)]
    resumed = make()
    resumed.load_state_dict(state)
    for batch in expected:
        assert torch.equal(next(resumed), batch)
    assert resumed.batches_served == k + 3
    if not streaming:
        assert ref.batches_per_epoch < k

    wrong = LMBatches(corpus, "test", "story", tok, SEQ, 8, 12, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="seed 11"):
        wrong.load_state_dict(state)


def test_tokenization_is_cached_and_reused(corpus, tok, tmp_path, monkeypatch):
    first = LMBatches(corpus, "test", "story", tok, SEQ, 4, 0, cache_dir=tmp_path)
    assert not first.cache_hit and first.cache_path is not None and first.cache_path.exists()
    assert sorted(first.cache_paths) == [0, 1, 2, 3]  # one file per shard (gcd(4, 8) shards)
    assert all(p.exists() for p in first.cache_paths.values())
    mtime = first.cache_path.stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(lm, "tokenize_block", no_tokenizing)
    second = LMBatches(corpus, "test", "story", tok, SEQ, 4, 0, cache_dir=tmp_path)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert second.cache_paths == first.cache_paths
    assert second.cache_path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.tokens, first.tokens)
    # a rank of 2 workers reads its own shards' files of the single worker's cache
    rank1 = LMBatches(corpus, "test", "story", tok, SEQ, 4, 0, 1, 2, cache_dir=tmp_path)
    assert rank1.cache_hit and rank1.cache_paths == {s: first.cache_paths[s] for s in (2, 3)}
    monkeypatch.undo()

    other = LMBatches(corpus, "test", "story", tok, SEQ // 2, 4, 0, cache_dir=tmp_path)
    assert not other.cache_hit and not set(other.cache_paths.values()) & set(
        first.cache_paths.values()
    )
    assert len(list(tmp_path.glob("*.npy"))) == 8


def test_default_cache_lives_beside_the_datasets_cache(corpus, tok, hf_datasets_cache):
    stream = LMBatches(corpus, "test", "story", tok, SEQ, 4, 0)
    assert stream.cache_path is not None
    assert stream.cache_path.parent == hf_datasets_cache / "spd_ray_lm_tokens"


def test_a_single_jsonl_file_loads_as_the_split(corpus, tok, tmp_path):
    path = str(Path(corpus) / "test.jsonl")
    from_file = LMBatches(path, "test", "story", tok, SEQ, 4, 0, cache_dir=tmp_path)
    from_folder = LMBatches(corpus, "test", "story", tok, SEQ, 4, 0, cache_dir=tmp_path)
    assert np.array_equal(from_file.tokens, from_folder.tokens)


def test_load_tokenizer_round_trip(tiny_lm_assets: TinyLMAssets, corpus):
    tok = load_tokenizer(str(tiny_lm_assets.tokenizer))
    text = _stories(corpus, "test")[0]
    assert tok.decode(tok(text)["input_ids"]) == text
    with pytest.raises(FileNotFoundError, match="tokenizer_name"):
        load_tokenizer("/no/such/tokenizer")


def test_bad_inputs_fail_fast_with_named_errors(corpus, tok, token_rows, tmp_path):
    with pytest.raises(ValueError, match=r"column_name 'text' is not in .*\['story'\]"):
        LMBatches(corpus, "test", "text", tok, SEQ, 4, 0, cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no_such_folder"):
        LMBatches("./no_such_folder", "test", "story", tok, SEQ, 4, 0)
    with pytest.raises(ValueError, match=r"batch_size 5 .* 1 data shards .*world_size 2"):
        LMBatches(corpus, "test", "story", tok, SEQ, 5, 0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="batch_size 8 is not divisible by n_shards 3"):
        LMBatches(corpus, "test", "story", tok, SEQ, 8, 0, n_shards=3)
    with pytest.raises(ValueError, match="max_seq_len 1024 is larger than model_max_length 512"):
        LMBatches(corpus, "test", "story", tok, 1024, 4, 0)
    with pytest.raises(ValueError, match="a tokenizer is required"):
        LMBatches(corpus, "test", "story", None, SEQ, 4, 0)
    with pytest.raises(ValueError, match="row 0 has 20 tokens, fewer than max_seq_len 32"):
        LMBatches(str(token_rows), "train", "input_ids", None, 32, 4, 0, is_tokenized=True,
                  cache_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match=r"batch_size 6 .* 2 data shards .*world_size 3"):
        LMBatches(corpus, "test", "story", tok, SEQ, 6, 0, 0, 3, block_docs=100)
    with pytest.raises(ValueError, match="split 'train' .* has 48 rows, fewer than n_shards 64"):
        LMBatches(str(token_rows), "train", "input_ids", None, 16, 64, 0, is_tokenized=True,
                  n_shards=64, cache_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="fewer than one local batch"):
        LMBatches(corpus, "test", "story", tok, SEQ, 4096, 0, cache_dir=tmp_path)
    with pytest.raises(ValueError, match="fewer than one local batch"):
        next(LMBatches(corpus, "test", "story", tok, SEQ, 4096, 0, streaming=True))


def test_unknown_hub_dataset_fails_fast_offline(tok):
    # conftest sets HF_HUB_OFFLINE=1 / HF_DATASETS_OFFLINE=1: no network wait, just an error.
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="no-such-org/no-such-dataset"):
        LMBatches("no-such-org/no-such-dataset", "train", "story", tok, SEQ, 4, 0)
    assert time.perf_counter() - start < 5.0


def test_tokenize_block_drops_only_the_tail(tok):
    rows = tokenize_block(["one two three", "four five"], tok, 3)
    flat = tok("one two three", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    flat += tok("four five", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert rows.shape == (len(flat) // 3, 3)
    assert rows.reshape(-1).tolist() == flat[: rows.size]
