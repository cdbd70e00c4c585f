"""`spd-ray harvest` end to end on the session's Ray cluster: 1 and 3 actors give the same
harvest (exact counts, float sums to 1e-6, identical top-k examples, full reservoirs), a TMS
decomposition's features are found, a tiny Llama harvest has token statistics and a readable
`harvest-show`, bad input fails at once with the problem named, and a harvest of a run
whose harvest lock is held, or with --gpu on a cluster without GPUs, stops at once touching
nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from harvest_fixtures import hold_lock, kill_9, short_tms_run, spd_ray_cli, spd_ray_main
from ray_head import RayHead

from spd_ray.harvest.store import Harvest

# seed 0: 3000 and 4000 steps left 2 and 1 of linear1's features unmatched, 6000 none
TMS_STEPS = 6000


@pytest.fixture(scope="module")
def tms_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tms_5-2 decomposition, in-process (1-3 min): long enough for linear1's features."""
    import spd_ray
    from spd_ray.registry import load_experiment

    torch.set_num_threads(2)
    _, config = load_experiment("tms_5-2")
    config = config.model_copy(
        update={"steps": TMS_STEPS, "eval_freq": TMS_STEPS, "slow_eval_freq": TMS_STEPS}
    )
    out = tmp_path_factory.mktemp("harvest-tms")
    spd_ray.decompose(config, out=out, name="tms", progress=False)
    return out / "tms"


def _harvest(env: dict[str, str], run: Path, *args: str) -> Path:
    res = spd_ray_cli(env, "harvest", str(run), "--no-progress", *args)
    assert res.returncode == 0, res.stderr[-4000:]
    path = Path(res.stdout.strip().splitlines()[-1])
    assert path == run / "harvest"
    return path


def _assert_same_harvest(a: Path, b: Path) -> None:
    ca, cb = pq.read_table(a / "components.parquet"), pq.read_table(b / "components.parquet")
    for col in ("firing_count", "n_top", "n_reservoir"):
        np.testing.assert_array_equal(ca[col].to_numpy(), cb[col].to_numpy(), err_msg=col)
    for col in ("mean_ci", "mean_abs_act_firing", "output_dropped_per_firing"):
        np.testing.assert_allclose(ca[col].to_numpy(), cb[col].to_numpy(), rtol=1e-6, err_msg=col)
    for name in ("cofiring", "input_counts", "input_totals"):
        np.testing.assert_array_equal(np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy"))
    if (a / "output_mass.npy").exists():
        for name in ("output_mass", "output_totals"):
            np.testing.assert_allclose(
                np.load(a / f"{name}.npy"), np.load(b / f"{name}.npy"), rtol=1e-6, atol=1e-9
            )
    ea = pq.read_table(a / "examples").to_pandas()
    eb = pq.read_table(b / "examples").to_pandas()
    top_a = ea[ea.kind == "top"].sort_values(["component", "rank"]).reset_index(drop=True)
    top_b = eb[eb.kind == "top"].sort_values(["component", "rank"]).reset_index(drop=True)
    assert top_a.uid.tolist() == top_b.uid.tolist()
    np.testing.assert_allclose(top_a.key.to_numpy(), top_b.key.to_numpy(), rtol=1e-6)
    # Reservoirs are random samples (different per actor layout) but always min(k, firings).
    k = json.loads((a / "meta.json").read_text())["settings"]["reservoir"]
    expected = np.minimum(ca["firing_count"].to_numpy(), k)
    np.testing.assert_array_equal(ca["n_reservoir"].to_numpy(), expected)
    np.testing.assert_array_equal(
        np.bincount(ea[ea.kind == "reservoir"].component, minlength=len(expected)), expected
    )


@pytest.mark.slow  # CI time: see the CI note in CONTRIBUTING.md
def test_toy_harvest_is_the_same_on_1_and_3_actors_and_finds_tms_features(
    tms_run: Path, ray_head: RayHead, tmp_path: Path
) -> None:
    # The decomposition found every feature of linear1 (the ground truth the checks below need).
    summary = json.loads((tms_run / "summary.json").read_text())
    assert summary["final_eval"]["eval/target_solution_error/linear1"] == 0
    env = ray_head.env()
    args = ["--dataset", "exactly_one_active", "--batches", "12", "--batch-size", "256"]
    one = _harvest(env, tms_run, *args, "--actors", "1", "--reservoir", "30")
    shutil.copytree(one, tmp_path / "one")
    three = _harvest(env, tms_run, *args, "--actors", "3", "--reservoir", "30")
    _assert_same_harvest(tmp_path / "one", three)

    h = Harvest(tms_run)
    assert h.n_tokens == 12 * 256 and h.meta["actors"] == 3
    counts = np.load(three / "input_counts.npy")  # [N, 5]: firings per active feature
    totals = np.load(three / "input_totals.npy")
    assert totals.sum() == h.n_tokens  # exactly one feature per input
    fc = h.firing_counts()
    linear1 = [i for i, key in enumerate(h.keys) if key.startswith("linear1:") and fc[i] > 0]
    # Each feature has exactly one linear1 subcomponent; it fires only where that feature is
    # active, and on every such input but those whose value is too small to matter.
    owner = {int(np.argmax(counts[i])): i for i in linear1}
    assert sorted(owner) == [0, 1, 2, 3, 4] and len(linear1) == 5
    for f, i in owner.items():
        assert counts[i, f] == fc[i], "fires on inputs of another feature"
        assert fc[i] >= 0.7 * totals[f], (h.keys[i], fc[i], totals[f])
        r = h.tokens(i, "input", "precision", k=5)
        assert r.index.tolist() == [f] and r.value[0] == pytest.approx(fc[i] / totals[f])
        r = h.tokens(i, "input", "recall", k=5)
        assert r.value.tolist() == [1.0]
        # Toy examples are the input vectors: feature f active, every other feature zero.
        for e in h.examples(i):
            assert e.x is not None and e.x[f] > 0 and sum(v != 0 for v in e.x) == 1


def test_lm_harvest_matches_across_actors_and_shows_a_component(
    lm_run: tuple[Path, dict[str, str]],
    ray_head: RayHead,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, env = lm_run
    env = {**env, "RAY_ADDRESS": ray_head.address}
    args = ["--batches", "3", "--batch-size", "8", "--context", "4", "--top-k", "5"]
    one = _harvest(env, run, *args, "--actors", "1")
    shutil.copytree(one, tmp_path / "one")
    # An interrupted harvest leaves harvest.partial/: the next one removes it and starts over.
    (run / "harvest.partial").mkdir()
    (run / "harvest.partial" / "stale").write_text("half-written")
    res = spd_ray_cli(env, "harvest", str(run), "--no-progress", *args, "--actors", "2")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "removed an unfinished harvest" in res.stderr
    assert not (run / "harvest.partial").exists()
    _assert_same_harvest(tmp_path / "one", run / "harvest")

    h = Harvest(run)
    assert h.kind == "lm" and h.meta["actors"] == 2
    seq = h.meta["source"]["seq_len"]
    assert 0 < h.n_tokens <= 3 * 8 * seq  # padding of a document's last row is not counted
    totals = np.load(run / "harvest" / "input_totals.npy")
    assert totals.sum() == h.n_tokens
    out_totals = np.load(run / "harvest" / "output_totals.npy")
    assert out_totals.sum() == pytest.approx(h.n_tokens, rel=1e-6)  # each position's probs sum to 1
    fc = h.firing_counts()
    # Top-k output mass (the default): each firing's kept mass plus what it left out is 1.
    dropped = h.components.column("output_dropped_per_firing").to_numpy() * fc
    mass = np.load(run / "harvest" / "output_mass.npy")
    np.testing.assert_allclose(mass.sum(1) + dropped, fc, rtol=1e-5, atol=1e-6)
    assert h.meta["settings"]["output_top_k"] == 64 and dropped.max() > 0
    assert h.meta["output_dropped_total"] == pytest.approx(dropped.sum(), rel=1e-9)
    per_firing = h.meta["output_dropped_per_firing_max"]
    assert per_firing == pytest.approx((dropped / np.maximum(fc, 1)).max(), rel=1e-9)
    assert "output top-64 left out at most" in res.stderr
    busiest = int(np.argmax(fc))
    key = h.keys[busiest]
    assert ":" in key and key.startswith("model.layers.")
    ex = h.examples(key, "top")
    assert 0 < len(ex) <= 5 and all(len(e.tokens) == 9 for e in ex)
    assert ex[0].tokens[4] >= 0  # the firing token itself is never padding

    # Showing reads files only: in this process, with nothing to reach on Ray.
    env = {**env, "RAY_ADDRESS": "127.0.0.1:1"}
    show = spd_ray_main(capsys, monkeypatch, env, "harvest-show", str(run), key, "--examples", "2")
    assert show.returncode == 0, show.stderr[-2000:]
    for section in ("fires on", "input tokens:", "predicted tokens (top 64", "co-firing", "[["):
        assert section in show.stdout, section
    bad = spd_ray_main(
        capsys, monkeypatch, env, "harvest-show", str(run), "model.layers.0.mlp.nope:3"
    )
    assert bad.returncode == 2 and "no module 'model.layers.0.mlp.nope'" in bad.stderr


def test_bad_input_fails_at_once(
    lm_run: tuple[Path, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run, env = lm_run
    env = {**env, "RAY_ADDRESS": "127.0.0.1:1"}  # nothing may reach Ray before these checks

    def spd_ray(*args: str) -> subprocess.CompletedProcess[str]:
        return spd_ray_main(capsys, monkeypatch, env, *args)

    res = spd_ray("harvest", str(run), "--actors", "0")  # argparse
    assert res.returncode == 2 and "argument --actors: 0 is not >= 1" in res.stderr
    res = spd_ray("harvest", str(run), "--column", "nope")
    assert res.returncode == 2 and "column_name 'nope' is not in dataset" in res.stderr
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")
    res = spd_ray("harvest", str(bare))
    assert res.returncode == 2 and "has no checkpoint" in res.stderr
    res = spd_ray("harvest-show", str(bare), "x:1")
    assert res.returncode == 2 and "has no harvest" in res.stderr


@pytest.mark.slow
def test_locked_or_gpu_less_harvest_stops_at_once_and_a_killed_holder_frees_the_run(
    ray_head: RayHead, tmp_path: Path
) -> None:
    tms_run = short_tms_run(tmp_path, 50)  # any checkpoint will do
    env = ray_head.env()
    args = ["--dataset", "exactly_one_active", "--batches", "2", "--batch-size", "64"]
    before = Harvest(tms_run).meta if (tms_run / "harvest").exists() else None
    holder = hold_lock(
        "from spd_ray.harvest.store import harvest_lock\n"
        "lock = harvest_lock(Path(sys.argv[1])).acquire()",
        str(tms_run),
    )
    try:
        res = spd_ray_cli(env, "harvest", str(tms_run), "--no-progress", *args)
        err = res.stderr.strip().splitlines()
        assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
        assert f"in use by pid {holder.pid} on host" in err[0]
    finally:
        kill_9(holder)
    # The dead holder's lock is taken over; the 2-CPU test cluster has no GPU, which --gpu
    # reports at once instead of queueing the actors forever.
    t0 = time.monotonic()
    res = spd_ray_cli(env, "harvest", str(tms_run), "--no-progress", "--gpu", *args)
    err = res.stderr.strip().splitlines()
    assert res.returncode == 2, res.stderr[-2000:]
    assert err[-1].startswith("spd-ray harvest: error: --gpu: harvest with --actors 1 needs 1")
    assert time.monotonic() - t0 < 60
    assert not (tms_run / "harvest.partial").exists()
    if before is not None:
        assert Harvest(tms_run).meta == before  # the previous harvest is untouched
    _harvest(env, tms_run, *args)
    assert Harvest(tms_run).n_tokens == 2 * 64
