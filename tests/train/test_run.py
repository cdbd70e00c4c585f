"""End-to-end runs through the `spd-ray` CLI and the Python API on a tiny ResidMLP config."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_args import spd_ray_cmd
from harvest_fixtures import spd_ray_main

import spd_ray
from spd_ray.config import load_config
from spd_ray.runs import RunDir
from spd_ray.train import tracking

TINY = Path(__file__).resolve().parents[1] / "fixtures" / "tiny_resid_mlp.yaml"


def _env(out: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "SPD_RAY_OUT": str(out), "SPD_RAY_THREADS": "1", **(extra or {})}


def _args(args: tuple[str, ...]) -> tuple[str, ...]:
    """`run` in this process unless the test asks for `--ray`."""
    if args and args[0] == "run" and "--ray" not in args:
        args = (*args, "--in-process")
    return tuple(a for a in args if a != "--ray")


def _cli(
    *args: str, out: Path, env_extra: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        spd_ray_cmd(*_args(args)),
        capture_output=True,
        text=True,
        env=_env(out, env_extra),
        timeout=600,
    )


def _main(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str, out: Path
) -> subprocess.CompletedProcess[str]:
    """`_cli` in this process, for commands that never reach Ray (`RAY_ADDRESS` points nowhere):
    the same exit code and output without an interpreter start."""
    env = {**_env(out), "RAY_ADDRESS": "127.0.0.1:1"}
    return spd_ray_main(capsys, monkeypatch, env, *_args(args))


def _final_eval(run_dir: Path) -> dict[str, float]:
    return json.loads((run_dir / "summary.json").read_text())["final_eval"]


def test_run_writes_the_run_directory_and_rerun_says_finished(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    res = _main(capsys, monkeypatch, "run", str(TINY), "--name", "a", out=tmp_path)
    assert res.returncode == 0, res.stderr
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    assert run_dir == tmp_path / "a"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoint.pt", "target.pt"):
        assert (run_dir / name).exists(), name
    assert any((run_dir / "figures").glob("causal_importances_40.png"))
    metrics = RunDir(run_dir).read_metrics()
    train_steps = [m["step"] for m in metrics if "train/loss/total" in m]
    assert train_steps == [10, 20, 30, 40]
    eval_steps = [m["step"] for m in metrics if "eval/loss/StochasticReconLoss" in m]
    assert eval_steps == [0, 20, 40]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["final_step"] == 40
    # Training reduces the faithfulness loss from its initial value.
    first = summary["initial_eval"]["eval/loss/FaithfulnessLoss"]
    assert summary["final_eval"]["eval/loss/FaithfulnessLoss"] < first

    again = _main(capsys, monkeypatch, "run", str(TINY), "--name", "a", out=tmp_path)
    assert again.returncode == 0, again.stderr
    assert "already finished" in again.stderr
    assert RunDir(run_dir).read_metrics() == metrics  # nothing rewritten or duplicated


@pytest.mark.slow  # ~80 s; CI runs the same kill-and-resume check on Ray (tests/train/test_ray.py)
def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(tmp_path: Path) -> None:
    ref = _cli(
        "run",
        str(TINY),
        "--name",
        "ref",
        "--set",
        "steps=400",
        "--set",
        "save_freq=100",
        out=tmp_path,
    )
    assert ref.returncode == 0, ref.stderr

    env = _env(tmp_path)
    args = [
        sys.executable,
        "-m",
        "spd_ray.cli",
        "run",
        str(TINY),
        "--name",
        "killed",
        "--set",
        "steps=400",
        "--set",
        "save_freq=100",
        "--in-process",
    ]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    ckpt = tmp_path / "killed" / "checkpoint.pt"
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        if ckpt.exists():
            try:
                step = int(torch.load(ckpt, weights_only=False)["step"])
            except Exception:  # a checkpoint being replaced right now  # noqa: BLE001
                step = 0
            if step >= 200:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "run finished before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 200 <= step < 400

    resumed = _cli(
        "run",
        str(TINY),
        "--name",
        "killed",
        "--set",
        "steps=400",
        "--set",
        "save_freq=100",
        out=tmp_path,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"resumed killed from step {step}" in resumed.stderr
    a, b = _final_eval(tmp_path / "ref"), _final_eval(tmp_path / "killed")
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    steps = [
        m["step"] for m in RunDir(tmp_path / "killed").read_metrics() if "train/loss/total" in m
    ]
    assert steps == sorted(set(steps)), "metrics duplicated after resume"


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("bogus_key=1", "bogus_key"),
        ("module_info=[{module_pattern: 'nope.*', C: 4}]", "nope.*"),
        (
            "module_info=[{module_pattern: 'layers.*', C: 4},"
            " {module_pattern: 'layers.0.mlp_in', C: 4}]",
            "matched by two patterns",
        ),
        ("module_info=[{module_pattern: 'layers.0.mlp_in', C: 0}]", "module_info.0.C"),
        ("loss_metric_configs=[{classname: StochasticReconLoss}]", "coeff"),
        ("pretrained_model_path=/nonexistent/target.pt", "/nonexistent/target.pt"),
    ],
)
def test_bad_input_fails_before_any_work(
    tmp_path: Path,
    override: str,
    needle: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    res = _main(
        capsys, monkeypatch, "run", str(TINY), "--name", "bad", "--set", override, out=tmp_path
    )
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert needle in lines[0]
    assert not (tmp_path / "bad").exists()


def test_list_shows_the_registry(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    res = _main(capsys, monkeypatch, "list", out=tmp_path)
    assert res.returncode == 0
    names = [line.split()[0] for line in res.stdout.splitlines()]
    for name in (
        "tms_5-2",
        "tms_5-2-id",
        "tms_40-10",
        "tms_40-10-id",
        "resid_mlp1",
        "resid_mlp2",
        "resid_mlp3",
    ):
        assert name in names


def test_decompose_and_load_run_api(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    config = load_config(TINY, ["steps=20"])
    result = spd_ray.decompose(config, out=tmp_path, name="api", progress=False)
    run = spd_ray.load_run(result.run_dir)
    model = run.model
    assert model.module_paths == ["layers.0.mlp_in", "layers.0.mlp_out"]
    assert model.component_weights("layers.0.mlp_in").shape == (12, 5, 20)
    assert model.target_weight("layers.0.mlp_in").shape == (5, 20)
    x = torch.rand(3, 10)
    ci = model.causal_importances(x)
    assert ci["layers.0.mlp_out"].shape == (3, 12)
    assert bool(((ci["layers.0.mlp_in"] >= 0) & (ci["layers.0.mlp_in"] <= 1)).all())
    # The loaded model is the trained one: same CI as the in-process result.
    torch.testing.assert_close(ci, result.model.causal_importances(x))
    assert run.step == 20


@pytest.mark.slow
def test_tensorboard_and_offline_wandb_tracking(tmp_path: Path) -> None:
    """Rank 0 logs every metric to TensorBoard and, with wandb_project set and no API key, to an
    offline wandb run inside the run directory (figures included)."""
    res = _cli(
        "run", str(TINY), "--name", "wb", "--set", "wandb_project=spd-test", out=tmp_path,
        env_extra={"WANDB_MODE": "offline"},
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "wb"
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert runs[0].name.endswith(tracking.wandb_run_id(run_dir))
    assert next(runs[0].glob("run-*.wandb")).stat().st_size > 1000
    images = [p.name for p in (runs[0] / "files" / "media" / "images" / "figures").iterdir()]
    assert any(n.startswith("causal_importances_0_") for n in images)
    assert any(n.startswith("causal_importances_40_") for n in images)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    logged = RunDir(run_dir).read_metrics()
    evals = [m for m in logged if "eval/loss/FaithfulnessLoss" in m]
    tb = events.Scalars("eval/loss/FaithfulnessLoss")
    assert [e.step for e in tb] == [m["step"] for m in evals] == [0, 20, 40]
    assert [e.value for e in tb] == pytest.approx([m["eval/loss/FaithfulnessLoss"] for m in evals])
    assert "figures/causal_importances" in events.Tags()["images"]


def test_a_run_from_before_counter_noise_resumes_only_on_its_generator_stream(tmp_path: Path):
    """Runs made before `mask_rng` existed drew their masks from torch.Generators: their stored
    config reads as `mask_rng: generator`, today's default (counter) is refused with the fix in
    the message, and the checkpoint's noise state must match the config's kind."""
    from spd_ray.config import ConfigError, save_config
    from spd_ray.core.masks import Noise
    from spd_ray.errors import InputError

    counter = load_config(TINY)
    assert counter.mask_rng == "counter"
    generator = load_config(TINY, ["mask_rng=generator"])
    run = RunDir(tmp_path / "old")
    run.path.mkdir()
    save_config(generator, run.path / "config.yaml")
    text = (run.path / "config.yaml").read_text()
    (run.path / "config.yaml").write_text(
        "\n".join(line for line in text.splitlines() if not line.startswith("mask_rng"))
    )
    before = (run.path / "config.yaml").read_bytes()
    assert run.read_config().mask_rng == "generator"
    with pytest.raises(ConfigError, match="first difference: mask_rng.*--set mask_rng=generator"):
        run.init(counter)
    run.init(generator)  # the same config: resumes
    assert (run.path / "config.yaml").read_bytes() == before  # nothing rewritten

    cpu = torch.device("cpu")
    old, new = Noise.for_run(0, "train", cpu, rng="generator"), Noise.for_run(0, "train", cpu)
    old.rand((3,), cpu, torch.float32)
    new.rand((3,), cpu, torch.float32)
    with pytest.raises(InputError, match="--set mask_rng=generator"):
        Noise.for_run(0, "train", cpu).load_state_dict(old.state_dict())
    with pytest.raises(InputError, match="--set mask_rng=counter"):
        Noise.for_run(0, "train", cpu, rng="generator").load_state_dict(new.state_dict())
    # Matching kinds continue where they stopped.
    for made, rng in ((old, "generator"), (new, "counter")):
        fresh = Noise.for_run(0, "train", cpu, rng=rng)  # type: ignore[arg-type]
        fresh.load_state_dict(made.state_dict())
        want = made.rand((4,), cpu, torch.float32)
        assert torch.equal(fresh.rand((4,), cpu, torch.float32), want)


def test_a_resumed_run_may_change_when_it_logs_evaluates_and_checkpoints_but_nothing_else(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run stopped at step 30 (the finished run's previous checkpoint) and resumed with evals
    and train logs every 5 steps trains exactly as the uninterrupted run did; another setting is
    still refused by name, leaving the run as it was."""
    import shutil

    res = _main(capsys, monkeypatch, "run", str(TINY), "--name", "ref", out=tmp_path)
    assert res.returncode == 0, res.stderr
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    shutil.copytree(ref, cut)
    assert torch.load(cut / "checkpoint.prev.pt", weights_only=False)["step"] == 30
    (cut / "checkpoint.prev.pt").replace(cut / "checkpoint.pt")
    (cut / "summary.json").unlink()

    def files() -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in cut.iterdir() if p.is_file() and p.name != ".lock"}

    before = files()
    bad = _main(
        capsys, monkeypatch, "run", str(TINY), "--name", "cut", "--set", "batch_size=32",
        "--set", "eval_freq=5", out=tmp_path,
    )  # fmt: skip
    assert bad.returncode == 2
    assert "first difference: batch_size" in bad.stderr and "eval_freq" in bad.stderr
    assert files() == before

    sets = ("--set", "eval_freq=5", "--set", "slow_eval_freq=10", "--set", "train_log_freq=5")
    res = _main(capsys, monkeypatch, "run", str(TINY), "--name", "cut", *sets, out=tmp_path)
    assert res.returncode == 0, res.stderr
    assert "resumed cut from step 30" in res.stderr
    a, b = _final_eval(ref), _final_eval(cut)
    assert a.keys() == b.keys()
    for key in a:
        assert b[key] == pytest.approx(a[key], rel=1e-6, abs=1e-9), key
    rows = RunDir(cut).read_metrics()
    assert [m["step"] for m in rows if "train/loss/total" in m] == [10, 20, 30, 35, 40]
    assert [m["step"] for m in rows if "eval/loss/StochasticReconLoss" in m] == [0, 20, 35, 40]
    stored = RunDir(cut).read_config()
    assert (stored.eval_freq, stored.slow_eval_freq, stored.train_log_freq) == (5, 10, 5)
