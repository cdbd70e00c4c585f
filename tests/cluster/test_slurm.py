"""cluster/slurm/ on a real SLURM: `submit` and `ray.sbatch` run spd-ray on a Ray cluster made of
the allocation. Opt-in: `make test-slurm` starts the single-node test bed (cluster/slurm/testbed)
and runs these; elsewhere they run only where SLURM answers (`sinfo`), and are `slow` either way."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
SLURM = REPO / "cluster" / "slurm"


def _slurm_answers() -> bool:
    if shutil.which("sinfo") is None:
        return False
    try:
        return subprocess.run(["sinfo"], capture_output=True, timeout=20).returncode == 0
    except subprocess.TimeoutExpired:
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not _slurm_answers() and os.environ.get("SPD_RAY_TEST_SLURM") != "1",
        reason="no SLURM here: `make test-slurm` starts a single-node test bed and runs these",
    ),
]


def _env(**extra: str) -> dict[str, str]:
    """The submitting shell: spd-ray's environment first on PATH, Ray's own token auth (the job
    makes its token), Ray Train's preemption watcher off (it needs a cloud metadata server)."""
    env = {**os.environ, **extra}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    # The test session's loopback-only Ray setting refuses a second node: jobs get Ray's default.
    for key in ("RAY_AUTH_MODE", "RAY_ADDRESS", "PYTHONPATH", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(key, None)
    env["RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"] = "0"
    return env


def _job(job_id: str) -> dict[str, str]:
    out = subprocess.run(
        ["scontrol", "show", "job", job_id], capture_output=True, text=True, check=True
    ).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def _wait(job_id: str, timeout_s: float = 600) -> dict[str, str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = _job(job_id)
        if info["JobState"] in {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"}:
            return info
        time.sleep(2)
    subprocess.run(["scancel", job_id])
    raise AssertionError(f"job {job_id} did not finish in {timeout_s} s: {_job(job_id)}")


def _seconds(info: dict[str, str]) -> int:
    h, m, s = (int(x) for x in info["RunTime"].split("-")[-1].split(":"))
    return 3600 * h + 60 * m + s


def _complete_run(run: Path, steps: int, workers: int) -> None:
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_step"] == steps
    assert (run / "checkpoint.pt").is_file()
    placement = json.loads((run / "workers.json").read_text())
    assert placement["world_size"] == workers
    assert len(placement["workers"]) == workers
    steps_seen = [
        json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps_seen[-1] == steps


@pytest.fixture(scope="module")
def out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Results root shared by the module's jobs, so the toy target trains once."""
    return tmp_path_factory.mktemp("slurm_out")


def _source_copy(dest: Path) -> Path:
    """A git checkout holding this working tree as one commit, for submit to snapshot."""
    files = subprocess.run(
        ["git", "-C", str(REPO), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, files):
        src = REPO / name.decode()
        if src.is_file():
            (dest / name.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name.decode())
    git = ["git", "-C", str(dest), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "snapshot source"], check=True)
    return dest


def test_submit_runs_the_code_as_submitted(tmp_path: Path, out: Path) -> None:
    """submit -> sbatch accepts, the job COMPLETED, its log shows Ray start and stop, the run
    directory is complete; the source changed after submission (a config value, and code that
    would fail on import in the driver or any Ray worker) did not reach the job."""
    src = _source_copy(tmp_path / "src")
    jobs = tmp_path / "jobs"
    env = _env()
    # Output inside the snapshot would be lost with the job folder: a relative --out is refused.
    refused = subprocess.run(
        [str(src / "cluster/slurm/submit"), "--jobs-dir", str(jobs), "--", "spd-ray", "run"]
        + ["tms_5-2", "--out", "runs"],
        capture_output=True,
        text=True,
        env=env,
        cwd=src,
        timeout=120,
    )
    assert refused.returncode == 2
    assert "submit: --out runs is relative" in refused.stderr
    assert not jobs.exists()
    started = time.monotonic()
    res = subprocess.run(
        [
            str(src / "cluster/slurm/submit"),
            "--nodes",
            "1",
            "--cpus-per-node",
            "2",
            "--jobs-dir",
            str(jobs),
            "--sbatch",
            "--hold",
            "--",
            "spd-ray",
            "run",
            "tms_5-2",
            "--workers",
            "2",
            "--steps",
            "40",
            "--name",
            "submitted",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        cwd=src / "experiments",  # inside the source tree: the job runs inside its snapshot
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    job_id = re.search(r"submitted job (\d+)", res.stdout).group(1)
    (job,) = [p for p in jobs.iterdir() if not p.name.startswith(".")]
    assert (job / "job_id").read_text().strip() == job_id
    assert "--hold" in (job / "sbatch.sh").read_text()
    assert f"log:     {job}/slurm-{job_id}.log" in res.stdout

    # Held in the queue: now change the source - config and code - then let it run.
    exp = src / "experiments/tms_5-2.yaml"
    assert "seed" not in yaml.safe_load(exp.read_text())  # the default, 0
    exp.write_text(exp.read_text() + "seed: 7\n")
    init = src / "spd_ray/__init__.py"
    init.write_text(init.read_text() + "\nraise RuntimeError('code changed after submission')\n")
    subprocess.run(["scontrol", "release", job_id], check=True, env=env)

    info = _wait(job_id)
    log = (job / f"slurm-{job_id}.log").read_text()
    elapsed = time.monotonic() - started
    print(f"submit job {job_id}: {info['JobState']} run {_seconds(info)} s, {elapsed:.0f} s total")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert info["ExitCode"] == "0:0"
    assert "Ray cluster up: 1 node(s), 2 CPUs" in log
    assert "Ray stopped" in log
    assert f"spd_ray code: {job}/code/spd_ray" in log
    assert _job(job_id)["WorkDir"] == f"{job}/code/experiments"
    run = out / "submitted"
    _complete_run(run, steps=40, workers=2)
    assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == 0


def test_sbatch_directly_and_a_failing_entrypoint(tmp_path: Path, out: Path) -> None:
    """ray.sbatch without submit: a run COMPLETED; an entrypoint that fails makes the job FAILED
    with that command's exit status."""
    env = _env()

    def sbatch(*command: str) -> str:
        return subprocess.run(
            ["sbatch", "--parsable", "--cpus-per-task=2", f"--output={tmp_path}/job-%j.log"]
            + [str(SLURM / "ray.sbatch"), *command],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            check=True,
        ).stdout.strip()

    ok = sbatch(
        *("spd-ray", "run", "tms_5-2", "--workers", "2", "--steps", "30"),
        *("--name", "direct", "--out", str(out)),
    )
    bad_cmd = ["spd-ray", "run", "no_such_experiment", "--out", str(out)]
    local = subprocess.run(bad_cmd, capture_output=True, text=True, env=env, cwd=tmp_path)
    assert local.returncode not in (0, None)
    bad = sbatch(*bad_cmd)

    ok_info, bad_info = _wait(ok), _wait(bad)
    ok_log = (tmp_path / f"job-{ok}.log").read_text()
    bad_log = (tmp_path / f"job-{bad}.log").read_text()
    print(f"direct job {ok}: {ok_info['JobState']} {_seconds(ok_info)} s")
    print(
        f"failing job {bad}: {bad_info['JobState']} {bad_info['ExitCode']} {_seconds(bad_info)} s"
    )
    assert ok_info["JobState"] == "COMPLETED", ok_log[-3000:]
    _complete_run(out / "direct", steps=30, workers=2)

    assert bad_info["JobState"] == "FAILED", bad_log[-3000:]
    assert bad_info["ExitCode"] == f"{local.returncode}:0"
    assert f"command exited with status {local.returncode}" in bad_log
    assert "no_such_experiment" in bad_log
    assert "Ray stopped" in bad_log


def _node_count() -> int:
    out = subprocess.run(["sinfo", "--noheader", "--Node", "--format=%N"], capture_output=True)
    return len(set(out.stdout.split()))


def test_two_node_allocation_is_one_ray_cluster(tmp_path: Path, out: Path) -> None:
    """Two SLURM nodes (the test bed's two slurmd on one host, or a real cluster): the head and a
    worker join one Ray cluster and the run's two ranks land on different Ray nodes."""
    if _node_count() < 2:
        pytest.skip("needs 2 SLURM nodes: SPD_RAY_SLURM_NODES=2 cluster/slurm/testbed start")
    job_id = subprocess.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--cpus-per-task=1"]
        + [f"--output={tmp_path}/job-%j.log", str(SLURM / "ray.sbatch")]
        + ["spd-ray", "run", "tms_5-2", "--workers", "2", "--steps", "30", "--name", "two-nodes"]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=tmp_path,
        check=True,
    ).stdout.strip()
    info = _wait(job_id)
    log = (tmp_path / f"job-{job_id}.log").read_text()
    print(f"two-node job {job_id}: {info['JobState']} {_seconds(info)} s")
    assert info["JobState"] == "COMPLETED", log[-3000:]
    assert "Ray cluster up: 2 node(s), 2 CPUs" in log
    assert log.count("starting a Ray worker on ") == 1
    run = out / "two-nodes"
    _complete_run(run, steps=30, workers=2)
    placement = json.loads((run / "workers.json").read_text())
    assert len({w["node_id"] for w in placement["workers"]}) == 2
