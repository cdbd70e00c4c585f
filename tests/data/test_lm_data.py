"""LM token streams: shapes, EOS joining, shard partition, shuffling, resume, cache, errors."""

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
    folder = tmp_path_factory.mktemp("pretokenized")
    rows = [[i] + [(7 * i + j) % 50 for j in range(19)] for i in range(48)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"input_ids": r}) + "\n" for r in rows))
    return folder


def _stories(corpus: str, split: str) -> list[str]:
    lines = (Path(corpus) / f"{split}.jsonl").read_text().splitlines()
    return [json.loads(line)["story"] for line in lines]


def _epoch_rows(stream: LMBatches, n_batches: int) -> list[tuple[int, ...]]:
    return [tuple(row.tolist()) for _ in range(n_batches) for row in next(stream)]


def test_batches_are_token_rows_joined_with_eos(corpus, tok, tmp_path):
    stream = LMBatches(corpus, "test", "story", tok, SEQ, 8, seed=0, cache_dir=tmp_path)
    batch = next(stream)
    assert batch.shape == (8, SEQ) and batch.dtype == torch.int64
    assert batch.min() >= 0 and batch.max() < len(tok)
    # Rows are the concatenation of documents, each followed by EOS, cut into SEQ tokens.
    texts = _stories(corpus, "test")
    flat: list[int] = []
    for text in texts[: stream.block_docs]:
        flat += tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    expected = np.asarray(flat[: len(flat) // SEQ * SEQ]).reshape(-1, SEQ)
    assert np.array_equal(stream.tokens, expected)
    assert (stream.tokens == tok.eos_token_id).sum() >= len(texts) - 1
    assert "named" in tok.decode(expected[:4].reshape(-1))


def test_map_style_shards_partition_the_rows(corpus, tok, tmp_path):
    def tokens(rank: int, world: int) -> np.ndarray:
        s = LMBatches(
            corpus, "test", "story", tok, SEQ, 6, 0, rank, world, block_docs=15, cache_dir=tmp_path
        )
        return np.asarray(s.tokens)

    single = tokens(0, 1)
    for world in (2, 3):
        shards = [tokens(r, world) for r in range(world)]
        # rank order concatenation is the one-worker row list: a union, with nothing shared
        assert np.array_equal(np.concatenate(shards), single)
        assert all(len(s) > 0 for s in shards)
        ranges = [shard_blocks(200, 15, r, world) for r in range(world)]
        assert ranges[0][0] == 0 and ranges[-1][1] == 200
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:], strict=False))


@pytest.mark.parametrize("streaming", [False, True])
def test_shards_partition_pretokenized_rows_over_an_epoch(token_rows, tmp_path, streaming):
    def epoch(rank: int, world: int) -> list[tuple[int, ...]]:
        s = LMBatches(
            str(token_rows), "train", "input_ids", None, 16, 12, 3, rank, world,
            is_tokenized=True, streaming=streaming, block_docs=4, buffer_size=8,
            cache_dir=tmp_path,
        )  # fmt: skip
        return _epoch_rows(s, 4)  # 48 rows / 12 per global batch

    single = epoch(0, 1)
    assert len(set(single)) == 48 and all(len(r) == 16 for r in single)
    for world in (2, 3):
        shards = [epoch(r, world) for r in range(world)]
        seen = [row for shard in shards for row in shard]
        assert len(seen) == len(set(seen)) == 48  # no row on two ranks
        assert set(seen) == set(single)  # and together every row


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
    mtime = first.cache_path.stat().st_mtime_ns

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(lm, "tokenize_block", no_tokenizing)
    second = LMBatches(corpus, "test", "story", tok, SEQ, 4, 0, cache_dir=tmp_path)
    assert second.cache_hit and second.cache_path == first.cache_path
    assert second.cache_path.stat().st_mtime_ns == mtime
    assert np.array_equal(second.tokens, first.tokens)
    monkeypatch.undo()

    other = LMBatches(corpus, "test", "story", tok, SEQ // 2, 4, 0, cache_dir=tmp_path)
    assert not other.cache_hit and other.cache_path != first.cache_path
    assert len(list(tmp_path.glob("*.npy"))) == 2


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
    with pytest.raises(ValueError, match="batch_size 5 is not divisible by world_size 2"):
        LMBatches(corpus, "test", "story", tok, SEQ, 5, 0, rank=0, world_size=2)
    with pytest.raises(ValueError, match="max_seq_len 1024 is larger than model_max_length 512"):
        LMBatches(corpus, "test", "story", tok, 1024, 4, 0)
    with pytest.raises(ValueError, match="a tokenizer is required"):
        LMBatches(corpus, "test", "story", None, SEQ, 4, 0)
    with pytest.raises(ValueError, match="row 0 has 20 tokens, fewer than max_seq_len 32"):
        LMBatches(str(token_rows), "train", "input_ids", None, 32, 4, 0, is_tokenized=True,
                  cache_dir=tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="fewer than world_size 3"):
        LMBatches(corpus, "test", "story", tok, SEQ, 6, 0, 0, 3, block_docs=100)
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
