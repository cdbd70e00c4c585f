"""The story grammar: deterministic files, wide vocabulary, well-formed English."""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

import pytest

from spd_ray.data.stories import BOY_NAMES, GIRL_NAMES, a, build_story_corpus, plural, story


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _stories(path: Path) -> list[str]:
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert all(set(row) == {"story"} for row in rows)
    return [row["story"] for row in rows]


@pytest.fixture(scope="module")
def sample() -> list[str]:
    rng = random.Random(0)
    return [story(rng) for _ in range(2000)]


def test_same_seed_gives_byte_identical_files(tmp_path: Path):
    first = build_story_corpus(tmp_path / "a", 300, 30, seed=5)
    again = build_story_corpus(tmp_path / "b", 300, 30, seed=5)
    other = build_story_corpus(tmp_path / "c", 300, 30, seed=6)
    assert set(first) == {"train", "test"}
    for split in ("train", "test"):
        assert _sha(first[split]) == _sha(again[split])
        assert _sha(first[split]) != _sha(other[split])


def test_split_sizes_and_distinct_stories(tmp_path: Path):
    paths = build_story_corpus(tmp_path, 400, 50, seed=0)
    train, test = _stories(paths["train"]), _stories(paths["test"])
    assert (len(train), len(test)) == (400, 50)
    assert len(set(train)) == 400 and not set(train) & set(test)


def test_vocabulary_is_wide(sample: list[str]):
    words = {w for s in sample for w in re.findall(r"[A-Za-z]+", s)}
    assert 2500 <= len(words) <= 5000, len(words)
    lengths = [len(s.split()) for s in sample]
    assert 70 <= sum(lengths) / len(lengths) <= 150


def test_every_arc_appears(sample: list[str]):
    markers = {
        "quest": "With ",
        "lost": "could not find",
        "new friend": "What is your name?",
        "learning": "wanted to learn to",
        "trip": "went on a trip",
        "sharing": "Would you like some?",
    }
    for arc, marker in markers.items():
        share = sum(marker in s for s in sample) / len(sample)
        assert 0.08 < share < 0.3, (arc, share)
    assert sum('"' in s for s in sample) / len(sample) > 0.5  # dialogue is common


def test_stories_are_well_formed(sample: list[str]):
    for s in sample:
        assert "{" not in s and "}" not in s and "  " not in s
        assert s[0].isupper() and s[-1] in '.!"'
        # every sentence starts with a capital letter or an opening quote
        for sentence in re.split(r"(?<=[.!?]) (?=\S)", s):
            assert sentence[0].isupper() or sentence[0] == '"', (sentence, s)
    text = " ".join(sample)
    assert not re.search(r"\b[aA] [aeiouAEIOU]", text)
    assert not re.search(r"\b[aA]n [b-df-hj-np-tv-zB-DF-HJ-NP-TV-Z]", text)


def test_pronouns_follow_the_hero(sample: list[str]):
    # Sentence-initial He/She and "his" always refer to the hero (friends appear by name or as
    # "her"/"him" objects), so a heroine's story never contains "He" or "his", and vice versa.
    girls = set(GIRL_NAMES) - set(BOY_NAMES)
    counts = {"she": 0, "he": 0}
    for s in sample:
        intro = re.search(r"there lived an? [\w ]+? named (\w+)\.", s)
        assert intro, s
        if intro.group(1) in girls:
            counts["she"] += 1
            assert not re.search(r"\bHe\b|\bhis\b|\bHis\b", s), s
        else:
            counts["he"] += 1
            assert not re.search(r"\bShe\b", s), s
    assert min(counts.values()) > 0.4 * len(sample)


def test_articles_and_plurals():
    assert [a("owl"), a("bear"), a("unicorn"), a("Apple")] == [
        "an owl",
        "a bear",
        "a unicorn",
        "an Apple",
    ]
    assert [plural(w) for w in ("fox", "bunny", "mouse", "cat", "day")] == [
        "foxes",
        "bunnies",
        "mice",
        "cats",
        "days",
    ]
