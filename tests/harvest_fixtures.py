"""A decomposed tiny Llama run shared by the harvest and autointerp tests (session-scoped: the
decomposition runs once). `tests/conftest.py` imports the fixture."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
from cli_args import spd_ray_cmd

if TYPE_CHECKING:
    from spd_ray.targets.tiny_lm import TinyLMAssets


def spd_ray_cli(
    env: dict[str, str], *args: str, timeout: int = 300
) -> subprocess.CompletedProcess[str]:
    """`spd-ray ARGS` in a fresh process, as a user runs it."""
    return subprocess.run(
        spd_ray_cmd(*args),
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
    )


def spd_ray_main(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    env: dict[str, str],
    *args: str,
) -> subprocess.CompletedProcess[str]:
    """`spd-ray ARGS` in this process (`spd_ray.cli.main`) under `env`, for commands that fail
    before Ray or only read files: the same exit code (argparse's too) and output as the CLI,
    without a fresh interpreter's ~4 s of imports."""
    from spd_ray.cli import main

    with monkeypatch.context() as m:
        for key, value in env.items():
            if os.environ.get(key) != value:
                m.setenv(key, value)
        capsys.readouterr()
        try:
            code = main(list(args))
        except SystemExit as exit_:  # argparse's refusal: the process would exit with this code
            code = exit_.code if isinstance(exit_.code, int) else 1
        out, err = capsys.readouterr()
    return subprocess.CompletedProcess(["spd-ray", *args], code, out, err)


def short_tms_run(out: Path, steps: int) -> Path:
    """A tms_5-2 decomposition of `steps` steps, in-process, as `out/tms`: for analyses that need
    a checkpoint, not a good one."""
    import torch

    import spd_ray
    from spd_ray.registry import load_experiment

    torch.set_num_threads(1)
    _, config = load_experiment("tms_5-2")
    config = config.model_copy(
        update={
            "steps": steps,
            "eval_freq": steps,
            "slow_eval_freq": steps,
            "slow_eval_on_first_step": False,
            "n_eval_steps": 2,
            "batch_size": 1024,
            "faithfulness_warmup_steps": 20,
        }
    )
    spd_ray.decompose(config, out=out, name="tms", progress=False)
    return out / "tms"


def hold_lock(take: str, *args: str) -> subprocess.Popen[str]:
    """A separate process that runs `take` (Python that takes a lock, with `sys`, `Path` and
    the arguments in `sys.argv[1:]`) and then sleeps holding it; returns once it holds it."""
    script = f"import sys, time\nfrom pathlib import Path\n{take}\nprint('locked', flush=True)\n"
    holder = subprocess.Popen(
        [sys.executable, "-c", script + "time.sleep(600)\n", *args],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout is not None
    assert holder.stdout.readline().strip() == "locked"
    return holder


def kill_9(holder: subprocess.Popen[str]) -> None:
    os.kill(holder.pid, signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL


@pytest.fixture(scope="session")
def lm_run(
    tiny_lm_assets: TinyLMAssets, hf_datasets_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, str]]:
    """(run directory, environment for CLI calls) of a tiny Llama decomposition of a few steps:
    a harvest needs a checkpoint, not a good one."""
    out = tmp_path_factory.mktemp("lm-run") / "out"
    (out / "assets").mkdir(parents=True)
    (out / "assets" / "tiny-lm").symlink_to(tiny_lm_assets.root)
    env = {
        **os.environ,
        "SPD_RAY_OUT": str(out),
        "OMP_NUM_THREADS": "1",
        "HF_DATASETS_CACHE": str(hf_datasets_cache),
    }
    args = ["run", "tiny_llama", "--in-process", "--steps", "4", "--name", "lm"]
    for setting in ("n_eval_steps=1", "eval_metric_configs=[]", "faithfulness_warmup_steps=2"):
        args += ["--set", setting]
    res = spd_ray_cli(env, *args, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    return out / "lm", env
