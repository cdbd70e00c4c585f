"""`spd-ray attributions` end to end on the session's Ray cluster: the tiny Llama's matrix equals
the one computed in this process on the same rows and is the same bit for bit on 1 and 3 actors
(exact sums merged by target range; slow); a toy run with `--modules` equals the matching part of
the full matrix; `attributions-show` prints sources and targets with token strings; bad input
fails at once in one line, touching nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from harvest_fixtures import hold_lock, kill_9, spd_ray_cli, spd_ray_main
from ray_head import RayHead

from spd_ray.attributions.compute import Accumulator, layout_for_run, unembed_matrix
from spd_ray.attributions.exact import state_means
from spd_ray.attributions.store import Attributions, save_attributions
from spd_ray.harvest.pipeline import HarvestOptions, _describe, make_source
from spd_ray.harvest.sources import DocRows, LMSource, ToySource, toy_block
from spd_ray.loaded_run import load_run


def _copy_run(run: Path, dest: Path) -> Path:
    """The run without a harvest or attributions (the session's runs are shared with tests that
    add them): every subcomponent is alive."""
    skip = shutil.ignore_patterns("harvest*", ".harvest*", "attributions*", ".attributions*")
    shutil.copytree(run, dest, ignore=skip)
    return dest


def _attributions(env: dict[str, str], run: Path, *args: str) -> subprocess.CompletedProcess[str]:
    res = spd_ray_cli(env, "attributions", str(run), "--no-progress", *args, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert Path(res.stdout.strip().splitlines()[-1]) == run / "attributions"
    assert not (run / "attributions.partial").exists()
    return res


def _meta(run: Path) -> dict[str, Any]:
    return json.loads((run / "attributions" / "meta.json").read_text())


def _in_process(
    run: Path, inputs: torch.Tensor, n_valid: torch.Tensor | None, out: str | None = None
) -> np.ndarray:
    """The stored matrix computed here, on the same rows in one batch."""
    loaded = load_run(run, out=out)
    layout, _ = layout_for_run(loaded, 0.0)
    acc = Accumulator(loaded.model, layout)
    acc.add(inputs, n_valid)
    return state_means(acc.state()).numpy().astype(np.float32)


def _error_line(res: subprocess.CompletedProcess[str], command: str = "attributions") -> str:
    """The one line a failed command printed (besides the target's weight-loading bar)."""
    lines = [
        line for line in res.stderr.splitlines() if line.strip() and "Loading weights" not in line
    ]
    assert res.returncode == 2 and len(lines) == 1, res.stderr[-3000:]
    assert lines[0].startswith(f"spd-ray {command}: error: ")
    return lines[0]


def _lm_rows(run: Path, out: str, n: int) -> tuple[LMSource, torch.Tensor, torch.Tensor]:
    """The run's data source and its first n token rows, in order (what a job with a limit of n
    rows reads)."""
    source, _ = make_source(run, HarvestOptions(out=out))
    assert isinstance(source, LMSource)
    rows = DocRows(source)({"id": np.arange(16)})
    assert len(rows["uid"]) >= n
    return source, torch.tensor(rows["tokens"][:n]), torch.tensor(rows["n_valid"][:n])


@pytest.mark.slow  # ~90 s: two Ray jobs of the tiny Llama
def test_lm_attributions_equal_the_in_process_sums_and_are_the_same_on_1_and_3_actors(
    lm_run: tuple[Path, dict[str, str]], ray_head: RayHead, tmp_path: Path
) -> None:
    run = _copy_run(lm_run[0], tmp_path / "lm")
    env = {**lm_run[1], "RAY_ADDRESS": ray_head.address}
    out = env["SPD_RAY_OUT"]  # where the run's @tiny-lm assets are
    args = ["--batches", "3", "--batch-size", "4"]
    res = _attributions(env, run, *args, "--actors", "1")
    assert "no harvest in" in res.stderr and "using all 640 subcomponents" in res.stderr
    one = np.load(run / "attributions" / "attr.npy")
    meta_one = _meta(run)

    # The same 12 rows (the first of the dataset, in order), computed in this process.
    _, tokens, n_valid = _lm_rows(run, out, 12)
    assert meta_one["n_tokens"] == int(n_valid.sum()) and meta_one["n_batches"] == 3
    assert meta_one["rows_limit"] == 12 and int(n_valid.sum()) < 12 * 64  # padding not counted
    expected = _in_process(run, tokens, n_valid, out)
    np.testing.assert_allclose(one, expected, rtol=1e-5, atol=1e-7)
    assert one.shape == (640 + 128, 4096 + 640) and np.abs(one).max() > 0.1
    np.testing.assert_array_equal(
        np.load(run / "attributions" / "unembed.npy"), np.asarray(Attributions(run).unembed)
    )

    # An interrupted job leaves attributions.partial/: the next one removes it and starts over.
    (run / "attributions.partial").mkdir()
    (run / "attributions.partial" / "attr.npy").write_text("half-written")
    res = _attributions(env, run, *args, "--actors", "3", "--shard-mb", "64")
    assert "removed unfinished attributions" in res.stderr
    three = np.load(run / "attributions" / "attr.npy")
    np.testing.assert_array_equal(one, three)  # exact sums: bit for bit
    meta = _meta(run)
    assert meta["n_tokens"] == meta_one["n_tokens"] and meta["actors"] == 3
    assert sum(meta["actor_tokens"]) == meta["n_tokens"]
    assert sum(t > 0 for t in meta["actor_tokens"]) >= 2, meta["actor_tokens"]  # a real merge
    # 64 MB of 3 actors' rows (4736 sources x 16 bytes each) is 295 target rows; one actor's
    # 768 rows fit the default 256 MB.
    assert meta_one["shards"] == [[0, 768]]
    assert meta["shards"] == [[0, 295], [295, 590], [590, 768]]
    assert len(meta["actor_nodes"]) == 3 and meta["tokens_per_s"] > 0
    assert all(m > 100 for m in meta["actor_peak_rss_mb"]), meta["actor_peak_rss_mb"]
    assert meta["actor_state_mb"] == [round(768 * 4736 * 16 / 2**20, 1)] * 3


def test_attributions_show_prints_sources_and_targets_with_token_strings(
    lm_run: tuple[Path, dict[str, str]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = _copy_run(lm_run[0], tmp_path / "lm")
    env = {**lm_run[1], "RAY_ADDRESS": "127.0.0.1:1"}  # a query needs no Ray
    out = env["SPD_RAY_OUT"]
    source, tokens, n_valid = _lm_rows(run, out, 2)
    loaded = load_run(run, out=out)
    layout, _ = layout_for_run(loaded, 0.0)
    acc = Accumulator(loaded.model, layout)
    acc.add(tokens, n_valid)
    info = {"source": _describe(source)}
    save_attributions(run, layout, acc.state(), unembed_matrix(loaded.model), info)

    from spd_ray.data.lm import load_tokenizer

    assert source.tokenizer is not None
    text = load_tokenizer(source.tokenizer).decode
    # A layer-0 query's sources are token embeddings, shown with their text.
    key = "model.layers.0.self_attn.q_proj:0"

    def spd_ray(*args: str) -> subprocess.CompletedProcess[str]:
        return spd_ray_main(capsys, monkeypatch, env, *args)

    show = spd_ray("attributions-show", str(run), key, "-k", "3")
    assert show.returncode == 0, show.stderr[-2000:]
    printed = show.stdout
    store = Attributions(run)
    assert printed.startswith(f"{key}  ({acc.n_tokens} tokens;")
    for title, found in [
        ("top sources (positive)", store.top_sources(key, 3)),
        ("top sources (negative)", store.top_sources(key, 3, "negative")),
        ("top targets (positive)", store.top_targets(key, 3)),
        ("top targets (negative)", store.top_targets(key, 3, "negative")),
    ]:
        assert len(found) == 3
        section = printed.split(f"  {title}:\n")[1].split("\n  top")[0]
        expected = []
        for a in found:
            label = a.key
            if a.key.startswith(("wte:", "output:")):
                label += f" {text([int(a.key.rpartition(':')[2])])!r}"
            expected.append(f"    {a.value:+.4e}  {label}")
        assert section.strip("\n").split("\n") == expected
    assert all(a.key.startswith("wte:") for a in store.top_sources(key, 3))
    # A token is a source only; an output only a target.
    show = spd_ray("attributions-show", str(run), "wte:5")
    assert show.returncode == 0 and "top targets (positive)" in show.stdout
    assert "top sources" not in show.stdout and show.stdout.startswith(f"wte:5 {text([5])!r}  (")
    show = spd_ray("attributions-show", str(run), "output:5", "-k", "2")
    assert show.returncode == 0 and "top sources (negative)" in show.stdout
    assert "top targets" not in show.stdout and show.stdout.startswith(f"output:5 {text([5])!r}")
    bad = spd_ray("attributions-show", str(run), "model.layers.0.mlp.nope:3")
    assert "no layer 'model.layers.0.mlp.nope'" in _error_line(bad, "attributions-show")


def test_toy_attributions_of_some_modules_through_the_cli(
    short_tms: Path, ray_head: RayHead, tmp_path: Path
) -> None:
    run = _copy_run(short_tms, tmp_path / "tms")
    args = ["--batches", "2", "--batch-size", "64", "--actors", "2", "--modules", "linear1"]
    res = _attributions(ray_head.env(), run, *args)
    assert "using all 40 subcomponents" in res.stderr
    assert "--modules linear1: the 20 of them in 1 module(s) take part" in res.stderr
    store = Attributions(run)
    lay = store.layout
    assert (lay.kind, lay.n_inputs, lay.n_outputs, lay.n_components) == ("toy", 5, 5, 20)
    assert lay.alive == {"linear1": list(range(20)), "linear2": []}
    assert store.n_tokens == 128 and store.meta["n_batches"] == 2
    assert store.unembed is None and not (run / "attributions" / "unembed.npy").exists()
    # The first 128 inputs of the run's data, computed here with every subcomponent: leaving
    # linear2 out leaves the other pairs as they are (every mask is 1 either way).
    source, n_rows = make_source(run, HarvestOptions(batches=2, batch_size=64))
    assert isinstance(source, ToySource) and n_rows == 128
    full = _in_process(run, torch.tensor(toy_block(source, 0)[:128]), None)
    assert full.shape == (40 + 5, 5 + 40)
    targets, sources = [*range(20), *range(40, 45)], list(range(25))  # linear1, output / input
    np.testing.assert_allclose(store.attr, full[np.ix_(targets, sources)], rtol=1e-5, atol=1e-7)
    assert np.abs(store.attr[:, :5]).max() > 1e-3  # the inputs drive something

    show = spd_ray_cli(ray_head.env(), "attributions-show", str(run), "input:2", "-k", "3")
    assert show.returncode == 0, show.stderr[-2000:]
    assert show.stdout.startswith("input:2  (128 inputs;") and "top sources" not in show.stdout
    top = store.top_targets("input:2", 3)
    assert top and f"    {top[0].value:+.4e}  {top[0].key}\n" in show.stdout


def test_bad_input_fails_at_once_in_one_line(
    lm_run: tuple[Path, dict[str, str]],
    ray_head: RayHead,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = _copy_run(lm_run[0], tmp_path / "lm")
    env = {**lm_run[1], "RAY_ADDRESS": "127.0.0.1:1"}  # nothing may reach Ray before these checks

    def spd_ray(*args: str) -> subprocess.CompletedProcess[str]:
        return spd_ray_main(capsys, monkeypatch, env, *args)

    def fails(*args: str) -> str:
        return _error_line(spd_ray("attributions", str(run), *args))

    assert fails("--actors", "0").endswith("--actors must be at least 1, got 0")
    assert fails("--targets-per-backward", "0").endswith("must be at least 1, got 0")
    assert "--modules 'nope*' matches none of the run's modules" in fails("--modules", "nope*")
    holder = hold_lock(
        "from spd_ray.attributions.pipeline import attributions_lock\n"
        "lock = attributions_lock(Path(sys.argv[1])).acquire()",
        str(run),
    )
    try:
        assert f"in use by pid {holder.pid} on host" in fails()
    finally:
        kill_9(holder)

    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(run / "config.yaml", bare / "config.yaml")
    assert "has no checkpoint" in _error_line(spd_ray("attributions", str(bare)))
    show = spd_ray("attributions-show", str(bare), "x:1")
    assert "has no attributions" in _error_line(show, "attributions-show")

    from spd_ray.registry import load_experiment
    from spd_ray.runs import RunDir

    ih = tmp_path / "ih"
    RunDir(ih).init(load_experiment("ih")[1])
    line = _error_line(spd_ray("attributions", str(ih)))
    assert "attributions support language-model and tms/resid_mlp runs, not 'ih'" in line

    # The 2-CPU test cluster has no GPU: said at once, before anything is written.
    res = spd_ray_cli({**env, "RAY_ADDRESS": ray_head.address}, "attributions", str(run), "--gpu")
    assert res.returncode == 2, res.stderr[-2000:]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("spd-ray attributions: error: --gpu: attributions with --actors 1")
    assert not (run / "attributions").exists() and not (run / "attributions.partial").exists()
