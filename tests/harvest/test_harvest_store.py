"""The harvest folder's reliability: a swap interrupted at any point loses no complete harvest
(the next harvest puts it back, and readers find it meanwhile), a finished swap leaves nothing
behind, and one harvest of a run runs at a time - a second one exits at once naming the first
one's pid and host, and a kill -9 of the holder frees the run. The flags are bounded when parsed.
Everything here runs without Ray; the end-to-end harvest under the lock is in test_pipeline.py."""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import pytest
from harvest_fixtures import hold_lock, kill_9

from spd_ray.cli import main
from spd_ray.harvest.store import (
    PARTIAL_DIR,
    Harvest,
    finish_partial,
    harvest_lock,
    recover,
    start_partial,
)
from spd_ray.io import LockedError


def _meta(n_tokens: int) -> dict[str, object]:
    return {"kind": "toy", "n_tokens": n_tokens, "component_keys": ["a:0"], "modules": []}


def _complete(path: Path, n_tokens: int) -> Path:
    """A folder that looks like a finished harvest of `n_tokens` tokens."""
    (path / "examples").mkdir(parents=True)
    (path / "components.parquet").write_text(f"table of {n_tokens}")
    (path / "meta.json").write_text(json.dumps(_meta(n_tokens)))
    return path


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("seed: 0\n")  # what resolve_run_dir looks for
    return run


@pytest.mark.parametrize(
    "aside", [".harvest.old-1a2b3c4d", "harvest.old-123"], ids=["replace_dir", "older-version"]
)
def test_a_harvest_set_aside_by_a_killed_swap_is_read_and_put_back(
    run_dir: Path, aside: str
) -> None:
    # The state a kill leaves between "old harvest renamed aside" and "new one renamed in",
    # after the unfinished partial of the killed harvest was gone.
    _complete(run_dir / aside, n_tokens=7)
    assert Harvest(run_dir).n_tokens == 7  # readers still find it
    partial, stale = start_partial(run_dir)
    assert not stale
    assert json.loads((run_dir / "harvest" / "meta.json").read_text())["n_tokens"] == 7
    assert (run_dir / "harvest" / "components.parquet").read_text() == "table of 7"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "harvest", PARTIAL_DIR]
    assert [p.name for p in partial.iterdir()] == ["examples"]


def test_a_complete_partial_is_newer_than_a_copy_set_aside(run_dir: Path) -> None:
    # Killed after the new harvest was marked complete and the old one moved aside.
    _complete(run_dir / ".harvest.old-00000000", n_tokens=1)
    _complete(run_dir / PARTIAL_DIR, n_tokens=2)
    assert Harvest(run_dir).n_tokens == 2
    assert recover(run_dir) == run_dir / PARTIAL_DIR
    assert Harvest(run_dir).path == run_dir / "harvest" and Harvest(run_dir).n_tokens == 2
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "harvest"]


def test_with_a_harvest_in_place_leftovers_go_and_the_harvest_stays(run_dir: Path) -> None:
    _complete(run_dir / "harvest", n_tokens=5)
    _complete(run_dir / ".harvest.old-deadbeef", n_tokens=4)
    (run_dir / PARTIAL_DIR).mkdir()
    (run_dir / PARTIAL_DIR / "cofiring.npy").write_text("half-written")
    partial, stale = start_partial(run_dir)
    assert stale and [p.name for p in partial.iterdir()] == ["examples"]
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "harvest", PARTIAL_DIR]
    assert Harvest(run_dir).n_tokens == 5


def test_finish_swaps_the_whole_folder_and_leaves_nothing_behind(run_dir: Path) -> None:
    _complete(run_dir / "harvest", n_tokens=1)
    (run_dir / "harvest" / "only-in-old").write_text("x")
    partial, _ = start_partial(run_dir)
    (partial / "components.parquet").write_text("table of 2")
    assert finish_partial(run_dir, _meta(2)) == run_dir / "harvest"
    assert sorted(p.name for p in run_dir.iterdir()) == ["config.yaml", "harvest"]
    assert sorted(p.name for p in (run_dir / "harvest").iterdir()) == [
        "components.parquet",
        "examples",
        "meta.json",
    ]
    assert Harvest(run_dir).n_tokens == 2
    # No harvest yet: the partial is renamed in.
    (run_dir / "harvest").rename(run_dir / "moved")
    start_partial(run_dir)
    finish_partial(run_dir, _meta(3))
    assert Harvest(run_dir).n_tokens == 3


HOLD_HARVEST_LOCK = """
from spd_ray.harvest.store import harvest_lock
lock = harvest_lock(Path(sys.argv[1])).acquire()
"""


@pytest.fixture(scope="module")
def toy_run(short_tms: Path) -> Path:
    """The session's short tms_5-2 run: harvest validates a run that has a checkpoint (the test
    only takes and is refused its harvest lock; nothing is harvested)."""
    return short_tms


def test_a_second_harvest_exits_at_once_naming_the_holder_until_it_is_killed(
    toy_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:1")  # the refusal comes before Ray
    holder = hold_lock(HOLD_HARVEST_LOCK, str(toy_run))
    try:
        with pytest.raises(LockedError, match=f"pid {holder.pid} on host {socket.gethostname()}"):
            harvest_lock(toy_run).acquire()
        t0 = time.monotonic()
        rc = main(["harvest", str(toy_run), "--no-progress"])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1, err
        assert f"pid {holder.pid} on host {socket.gethostname()}" in err[0]
        assert err[0].startswith("spd-ray harvest: error: the harvest of ")
        assert time.monotonic() - t0 < 10
        assert not (toy_run / PARTIAL_DIR).exists()
    finally:
        kill_9(holder)
    with harvest_lock(toy_run) as lock:  # the kernel dropped the dead holder's lock
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()


@pytest.mark.parametrize(
    ("args", "flag", "bad"),
    [
        (["--actors", "0"], "--actors", "0 is not >= 1"),
        (["--batches", "-3"], "--batches", "-3 is not >= 1"),
        (["--tokens", "1.5"], "--tokens", "'1.5' is not a whole number"),
        (["--batch-size", "0"], "--batch-size", "0 is not >= 1"),
        (["--ci-threshold=-0.001"], "--ci-threshold", "-0.001 is not a finite number >= 0"),
        (["--ci-threshold", "nan"], "--ci-threshold", "nan is not a finite number"),
        (["--top-k", "-1"], "--top-k", "-1 is not >= 0"),
        (["--reservoir", "-1"], "--reservoir", "-1 is not >= 0"),
        (["--context", "5000"], "--context", "5000 is not between 0 and 1024"),
        (["--output-top-k", "-1"], "--output-top-k", "-1 is not >= 0"),
    ],
)
def test_harvest_flags_are_bounded_when_parsed(
    args: list[str], flag: str, bad: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["harvest", str(tmp_path / "no-such-run"), *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}: {bad}" in err, err


@pytest.mark.parametrize(
    ("args", "flag", "bad"),
    [
        (["--examples", "-1"], "--examples", "-1 is not >= 0"),
        (["-k", "0"], "-k", "0 is not >= 1"),
    ],
)
def test_harvest_show_flags_are_bounded_when_parsed(
    args: list[str], flag: str, bad: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["harvest-show", str(tmp_path), "x:1", *args])
    assert exit_info.value.code == 2
    assert f"argument {flag}: {bad}" in capsys.readouterr().err
