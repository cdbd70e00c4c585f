"""`spd-ray clustering` end to end on a short tms_5-2 run: members run in parallel as Ray tasks on
the session's Ray head, a driver killed mid-way resumes where it stopped and gives what an
uninterrupted run gives, and `cluster-mapping` reads the result."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cli_args import spd_ray_cmd
from harvest_fixtures import spd_ray_cli, spd_ray_main
from ray_head import RayHead

from spd_ray.clustering import store
from spd_ray.clustering.ensemble import ClusteringOptions, run_clustering, run_member
from spd_ray.clustering.merge import MergeSettings
from spd_ray.errors import InputError, NotFoundError

ARGS = ["--runs", "4", "--batch-size", "256", "--no-progress"]


@pytest.fixture(scope="module")
def tms_run(short_tms: Path) -> Path:
    """A short tms_5-2 decomposition (a checkpoint, not a good one), shared by the session."""
    return short_tms


def _histories(root: Path, n: int) -> list[np.ndarray]:
    return [store.load_member(store.member_path(root, i))[0].group_idxs for i in range(n)]


def test_members_run_as_ray_tasks_resume_after_a_kill_and_match_in_process(
    ray_head: RayHead, tms_run: Path, tmp_path: Path
) -> None:
    env = ray_head.env()
    # Uninterrupted.
    res = spd_ray_cli(env, "clustering", str(tms_run), *ARGS, "--name", "whole")
    assert res.returncode == 0, res.stderr[-3000:]
    whole = Path(res.stdout.strip().splitlines()[-1])
    meta = json.loads((whole / "meta.json").read_text())
    assert meta["status"] == "finished" and meta["members_run_now"] == [0, 1, 2, 3]
    # Members run as Ray tasks: in worker processes, not in the command's own.
    assert all(m["pid"] != meta["driver_pid"] for m in meta["members"])

    # The same members computed here, without Ray, are the same histories.
    opts = ClusteringOptions(runs=4, batch_size=256, merge=MergeSettings())
    (tmp_path / "members").mkdir()
    for i in (0, 3):
        run_member(str(tms_run), None, opts, i, str(tmp_path))
        local = store.load_member(store.member_path(tmp_path, i))[0]
        assert (local.group_idxs == _histories(whole, 4)[i]).all()
    # Members differ: each draws its own batch.
    with np.load(whole / "ensemble.npz") as z:
        array = z["merge_array"]
    assert array.shape[0] == 4 and any((array[m] != array[0]).any() for m in range(1, 4))

    # Killed as soon as the first member lands, then rerun: the finished members are kept as
    # they are, the rest are run, and the result equals the uninterrupted one.
    proc = subprocess.Popen(
        spd_ray_cmd("clustering", str(tms_run), *ARGS, "--name", "killed"),
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    root = tms_run / "clustering" / "killed"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if store.finished_members(root, 4):
            break
        time.sleep(0.02)
    proc.kill()
    proc.wait(timeout=30)
    before = {
        i: store.member_path(root, i).stat().st_mtime_ns for i in store.finished_members(root, 4)
    }
    assert before, "no member finished before the kill"
    res = spd_ray_cli(env, "clustering", str(tms_run), *ARGS, "--name", "killed")
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((root / "meta.json").read_text())
    assert meta["status"] == "finished"
    assert set(meta["members_run_now"]) == set(range(4)) - set(before)
    for i, mtime in before.items():
        assert store.member_path(root, i).stat().st_mtime_ns == mtime
    for a, b in zip(_histories(root, 4), _histories(whole, 4), strict=True):
        assert (a == b).all()
    with (
        np.load(root / "distances_perm_invariant_hamming.npz") as z,
        np.load(whole / "distances_perm_invariant_hamming.npz") as w,
    ):
        assert np.array_equal(z["distances"], w["distances"], equal_nan=True)
    assert (root / "plots" / "mdl.png").read_bytes()[:4] == b"\x89PNG"

    # The mapping of member 1 at k = 6: six groups over the alive subcomponents.
    res = spd_ray_cli(env, "cluster-mapping", str(root), "--k", "6", "--member", "1")
    assert res.returncode == 0, res.stderr
    mapping = json.loads(res.stdout)
    history, info = store.load_member(store.member_path(root, 1))
    assert mapping["k"] == 6 and mapping["iteration"] == history.n - 6
    assert len(mapping["clusters"]) == 40  # 20 + 20 subcomponents, dead ones null
    assert all(mapping["clusters"][d] is None for d in info["dead"])
    ids = history.group_idxs[history.n - 6]
    sizes = np.bincount(ids)
    named = {v for v in mapping["clusters"].values() if v is not None}
    assert len(named) == int((sizes >= 2).sum())
    assert sum(v is None for v in mapping["clusters"].values()) == len(info["dead"]) + int(
        (sizes == 1).sum()
    )
    written = root / "mappings" / f"member1-iter{history.n - 6}.json"
    assert json.loads(written.read_text()) == mapping


def test_bad_input_fails_before_anything_is_written(
    tms_run: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # In this process, with no Ray: every check comes before Ray is started or a file written.
    cases: list[tuple[dict[str, Any], str]] = [
        ({"modules": "nope*"}, "matches none"),
        ({"distances": ("euclid",)}, "perm_invariant_hamming"),
        ({"name": "../x"}, "--name"),
        ({"runs": 0}, "--runs"),
    ]
    for changes, message in cases:
        with pytest.raises(InputError, match=re.escape(message)):
            run_clustering(tms_run, replace_opts(changes))
    with pytest.raises(InputError, match="iters"):
        MergeSettings(iters=0)
    assert not (tms_run / "clustering" / "default").exists()
    with pytest.raises(NotFoundError):
        run_clustering(tms_run.parent / "missing", ClusteringOptions())
    # Other settings under an existing clustering's name are refused, naming what changed; the
    # clustering is left as it was.
    (tms_run / "clustering" / "other").mkdir(parents=True)
    meta = {"run": str(tms_run), "name": "other", "identity": {"batch_size": 256}}
    (tms_run / "clustering" / "other" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(InputError, match=r"seed.*--fresh"):
        run_clustering(tms_run, ClusteringOptions(name="other", batch_size=256))
    assert json.loads((tms_run / "clustering" / "other" / "meta.json").read_text()) == meta
    assert not (tms_run / "clustering" / "default").exists()
    # The command line says it in one line, exit 2.
    env = {**os.environ, "RAY_ADDRESS": "127.0.0.1:1"}  # never reached
    res = spd_ray_main(capsys, monkeypatch, env, "clustering", str(tms_run), "--modules", "nope*")
    assert res.returncode == 2 and "matches none" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def replace_opts(changes: dict[str, Any]) -> ClusteringOptions:
    """ClusteringOptions with `changes`; raises as the constructor does."""
    return ClusteringOptions(**{"batch_size": 256, **changes})
