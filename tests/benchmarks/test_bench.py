"""`spd-ray bench`: what it records and computes, not how fast anything is. A fake yardstick reports
a known speed, so the ratio is checked against the recorded per-round speeds; FLOPs are checked
exactly on a matmul and against bounds computed from tms_5-2's sizes."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import pytest
import torch
from harvest_fixtures import spd_ray_main

from spd_ray import bench
from spd_ray.io import read_jsonl

# tms_5-2 small and eager, so a child takes seconds
FAST = ["--steps", "3", "--warmup", "1", "--set", "batch_size=64", "--set", "compile=false"]
FAST += ["--set", "compile_ci_fns=false"]
ROW_KEYS = {
    "time", "hostname", "cpu_model", "gpu", "torch", "ray", "threads", "commit", "dirty",
    "spd_ray_version", "experiment", "overrides", "rounds", "steps", "device", "on_ray",
    "steps_per_s", "samples_per_s", "tokens_per_s", "p90_step_ms", "peak_mem_mb", "build_mem_mb",
    "flops_per_step", "mfu", "yardstick_steps_per_s", "ratio", "per_round",
}  # fmt: skip


@pytest.fixture
def fake_yardstick(tmp_path: Path) -> Path:
    script = tmp_path / "yardstick.py"
    script.write_text(
        "import sys\nprint(f'threads={sys.argv[1]} compile=False lean steps/s median 50.0 "
        "(range 49.0-51.0)')\n"
    )
    return script


def _bench(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    out: Path,
    *args: str,
) -> tuple[int, str, str]:
    monkeypatch.delenv(bench.YARDSTICK_ENV, raising=False)
    res = spd_ray_main(capsys, monkeypatch, {"SPD_RAY_OUT": str(out)}, "bench", *args)
    return res.returncode, res.stdout, res.stderr


def test_rounds_against_a_yardstick_append_one_row_with_the_paired_ratio(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    shared_out: Path,
    tmp_path: Path,
    fake_yardstick: Path,
) -> None:
    results = tmp_path / "results.jsonl"
    args = ["--experiments", "tms_5-2", "--rounds", "2", *FAST, "--threads", "1"]
    code, out, err = _bench(
        capsys, monkeypatch, shared_out, *args, "--yardstick", str(fake_yardstick),
        "--results", str(results), "--memory",
    )  # fmt: skip
    assert code == 0, err
    monkeypatch.setenv("SPD_RAY_OUT", str(shared_out))
    [row] = read_jsonl(results)
    assert set(row) >= ROW_KEYS
    assert row["experiment"] == "tms_5-2" and row["rounds"] == 2 and row["steps"] == 3
    assert row["torch"] == torch.__version__ and row["threads"] == 1 and not row["on_ray"]
    assert row["overrides"] == ["batch_size=64", "compile=false", "compile_ci_fns=false"]
    assert row["compiled_step"] is False
    assert row["yardstick"] == str(fake_yardstick) and row["yardstick_steps_per_s"] == 50.0
    speeds = [r["steps_per_s"] for r in row["per_round"]]
    assert len(speeds) == 2 and all(s > 0 for s in speeds)
    assert [r["ratio"] for r in row["per_round"]] == pytest.approx([s / 50.0 for s in speeds])
    assert row["steps_per_s"] == pytest.approx(statistics.median(speeds))
    assert row["ratio"] == pytest.approx(statistics.median(s / 50.0 for s in speeds))
    assert row["samples_per_s"] == pytest.approx(64 * row["steps_per_s"])
    assert row["tokens_per_s"] is None and row["mfu"] is None  # a toy on a CPU
    assert row["flops_per_step"] == tms_flops(64)
    assert row["peak_mem_mb"] >= row["build_mem_mb"] > 0
    assert row["dirty"] in (True, False) and len(row["commit"]) == 40  # run from the checkout
    # the table: a header with the --memory columns, then the row with its ratio
    head, line = out.strip().splitlines()
    assert "build MB" in head and "ratio" in head
    assert line.split()[0] == "tms_5-2" and line.split()[-1] == f"{row['ratio']:.2f}"
    assert err.count("yardstick 50.0") == 2  # one yardstick run per round


def test_flops_of_a_matmul_are_2mnk_forward_and_twice_that_per_gradient() -> None:
    m, k, n = 8, 16, 4
    x = torch.randn(m, k, requires_grad=True)
    w = torch.randn(k, n, requires_grad=True)
    assert bench.flops_of(lambda: x @ w) == 2 * m * n * k
    assert bench.flops_of(lambda: (x @ w).sum().backward()) == 3 * 2 * m * n * k
    frozen = x.detach()  # backward makes w's gradient only
    assert bench.flops_of(lambda: (frozen @ w).sum().backward()) == 2 * 2 * m * n * k
    # compiled code is counted as its eager ops, without compiling
    compiled = torch.compile(lambda a, b: torch.relu(a @ b))
    assert bench.flops_of(lambda: compiled(x, w).sum().backward()) == 3 * 2 * m * n * k


_FLOPS: dict[int, int] = {}


def tms_flops(batch: int) -> int:
    """One tms_5-2 training step's FLOPs at `batch`, counted in this process (the registry's
    full run compiles the step; the count is the eager ops', so it equals an eager child's), on
    every row (a compacted step's count follows the batch's nonzero rows)."""
    if batch not in _FLOPS:
        from spd_ray.train.loop import make_state
        from spd_ray.train.worker import build_worker

        overrides = [f"batch_size={batch}", "compile_ci_fns=false", "compact_zero_rows=false"]
        config = bench.bench_config("tms_5-2", 1, 1, overrides)
        worker = build_worker(config)
        _FLOPS[batch] = bench.step_flops(config, worker.ctx, make_state(config, worker.ctx))
    return _FLOPS[batch]


def test_tms_step_flops_are_affine_in_the_batch_and_within_the_hand_count(
    monkeypatch: pytest.MonkeyPatch, shared_out: Path
) -> None:
    monkeypatch.setenv("SPD_RAY_OUT", str(shared_out))
    f1, f2, f3 = (tms_flops(b) for b in (32, 64, 96))
    assert f2 - f1 == f3 - f2 > 0  # per-sample work, plus the batch-free V @ U products
    per_sample = (f2 - f1) / 32
    # tms_5-2: linear1 5->2 and linear2 2->5, C = 20 each, CI MLPs 1->16->1 per component;
    # stochastic recon (one pass, both sites masked) and layerwise recon (one pass per site).
    sites = [(5, 2), (2, 5)]
    c, hidden = 20, 16
    # Floor: every masked pass multiplies each masked site's masked acts by U, forward only.
    floor = 2 * sum(2 * c * d_out for _, d_out in sites)
    # Ceiling: 3x (forward + backward) of the clean forward, the CI MLPs, and every masked pass
    # computing x V, (x V * m) U and the delta-component x (W - V U)^T at every site.
    clean = sum(2 * d_in * d_out for d_in, d_out in sites)
    ci = sum(2 * c * 2 * hidden for _ in sites)
    masked_site = [2 * c * (d_in + d_out) + 2 * d_in * d_out for d_in, d_out in sites]
    passes = sum(masked_site) + sum(masked_site)  # stochastic + the layerwise passes
    ceiling = 3 * (clean + ci + passes)
    assert floor <= per_sample <= ceiling, (floor, per_sample, ceiling)


def test_a_missing_yardstick_path_is_an_error_before_anything_runs(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("ran")

    monkeypatch.setattr(bench, "run_child", never)
    monkeypatch.setattr(bench, "run_yardstick", never)
    missing = tmp_path / "no-such-yardstick.py"
    results = tmp_path / "results.jsonl"
    code, _, err = _bench(
        capsys, monkeypatch, tmp_path, "--yardstick", str(missing), "--results", str(results)
    )
    assert code == 2 and str(missing) in err and "--yardstick" in err
    assert not results.exists()
    # the variable is asked for explicitly too; a missing default is a note, not an error
    monkeypatch.setenv(bench.YARDSTICK_ENV, str(missing))
    with pytest.raises(FileNotFoundError, match="SPD_RAY_YARDSTICK"):
        bench.find_yardstick(None, disabled=False)
    monkeypatch.delenv(bench.YARDSTICK_ENV)
    monkeypatch.setattr(bench, "REPO", tmp_path / "repo")
    assert bench.find_yardstick(None, disabled=False) is None


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_gpu_without_cuda_is_a_clear_error(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    code, _, err = _bench(capsys, monkeypatch, tmp_path, "--gpu", "--no-yardstick")
    assert code == 2 and "--gpu: CUDA is not available" in err


def test_appending_after_a_torn_last_line_keeps_the_file_readable(tmp_path: Path) -> None:
    path = tmp_path / "results.jsonl"
    path.write_text(json.dumps({"experiment": "a"}) + "\n" + '{"experiment": "b", "ste')
    bench.append_result(path, {"experiment": "c"})
    assert [r["experiment"] for r in read_jsonl(path)] == ["a", "c"]


def test_the_loop_inside_a_ray_train_worker(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    shared_out: Path,
    tmp_path: Path,
) -> None:
    results = tmp_path / "results.jsonl"
    code, out, err = _bench(
        capsys, monkeypatch, shared_out, "--experiments", "tms_5-2", *FAST, "--ray",
        "--no-yardstick", "--results", str(results),
    )  # fmt: skip
    assert code == 0, err
    monkeypatch.setenv("SPD_RAY_OUT", str(shared_out))
    assert "no yardstick" in err and "Ray Train worker" in err
    [row] = read_jsonl(results)
    assert row["on_ray"] and row["steps_per_s"] > 0 and row["ratio"] is None
    assert row["flops_per_step"] == tms_flops(64)  # the same step as in-process
    assert out.strip().splitlines()[1].split()[-1] == "-"  # no ratio
