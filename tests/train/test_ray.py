"""Ray Train end to end, on the session's shared `ray start` cluster: data parallelism equals one
worker, a killed driver or worker resumes from its checkpoint, `ray job submit` runs a
decomposition, TensorBoard events are written."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from cli_args import fast, spd_ray_cmd
from ray_head import RayHead

from spd_ray.runs import RunDir

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "tiny_resid_mlp.yaml"

# Short, deterministic (fp32) versions of the registry runs.
FAST = fast()
# The tms_5-2 run killed and resumed below, and its uninterrupted reference.
TMS_STEPS, TMS_SAVE = 1500, 300
TMS = [
    "tms_5-2",
    "--steps",
    str(TMS_STEPS),
    *FAST,
    "--set",
    f"save_freq={TMS_SAVE}",
    "--set",
    "eval_freq=500",
    "--set",
    f"slow_eval_freq={TMS_STEPS}",
    "--set",
    "train_log_freq=100",
    "--set",
    "batch_size=512",
]


def _env(head: RayHead | None, out: Path, **extra: str) -> dict[str, str]:
    env = head.env() if head is not None else dict(os.environ)
    return {**env, "SPD_RAY_OUT": str(out), "SPD_RAY_THREADS": "1", **extra}


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(spd_ray_cmd(*args), capture_output=True, text=True, env=env, timeout=600)


def _summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def _assert_same_metrics(a: dict[str, float], b: dict[str, float], rtol: float) -> None:
    keys = [k for k in a if k not in ("train/steps_per_s", "train/lr")]
    assert keys and set(keys) <= set(b)
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-9), key


class _Lines:
    """Collects a child's output lines as they come, so a test can react to them."""

    def __init__(self, proc: subprocess.Popen[str]):
        self.lines: list[str] = []
        assert proc.stdout is not None
        stream = proc.stdout
        self.thread = threading.Thread(target=lambda: self.lines.extend(iter(stream)), daemon=True)
        self.thread.start()

    def find(self, pattern: str) -> re.Match[str] | None:
        for line in list(self.lines):
            m = re.search(pattern, line)
            if m:
                return m
        return None

    @property
    def text(self) -> str:
        return "".join(self.lines)


def _checkpoint_step(run_dir: Path) -> int:
    try:
        return int(torch.load(run_dir / "checkpoint.pt", weights_only=False)["step"])
    except Exception:  # noqa: BLE001 - absent or being replaced right now
        return 0


@pytest.fixture(scope="module")
def tms_reference(shared_out: Path) -> dict[str, float]:
    """The uninterrupted tms_5-2 run, in-process with 1 thread like the 1-CPU Ray workers below."""
    res = _run("run", *TMS, "--name", "tms-ref", "--in-process", env=_env(None, shared_out))
    assert res.returncode == 0, res.stderr[-3000:]
    return _summary(shared_out / "tms-ref")["final_eval"]  # type: ignore[no-any-return]


@pytest.mark.slow  # CI keeps test_multinode.py::test_two_ranks_on_two_nodes_match_one_worker
def test_two_workers_match_one_worker(ray_head: RayHead, shared_out: Path) -> None:
    """Same global batch and seed: 2 workers (gloo) give 1 worker's metrics; several targets in
    one command each get a run and a line in the outcome table."""
    common = ["tms_5-2,resid_mlp1", "--steps", "20", *FAST]
    common += ["--set", "eval_freq=10", "--set", "slow_eval_freq=20", "--set", "train_log_freq=10"]
    runs = {}
    for workers in (1, 2):
        res = _run(
            "run", *common, "--workers", str(workers), "--name", f"w{workers}",
            env=_env(ray_head, shared_out),
        )  # fmt: skip
        assert res.returncode == 0, res.stderr[-3000:]
        lines = res.stdout.strip().splitlines()
        table = lines[next(i for i, ln in enumerate(lines) if ln.startswith("run  ")) :]
        assert table[0].split()[:2] == ["run", "outcome"]
        for experiment in ("tms_5-2", "resid_mlp1"):
            name = f"w{workers}-{experiment}"
            row = next(line for line in table if line.startswith(name + " "))
            assert " finished " in row and row.endswith(str(shared_out / name))
            runs[workers, experiment] = _summary(shared_out / name)
    for experiment in ("tms_5-2", "resid_mlp1"):
        one, two = runs[1, experiment], runs[2, experiment]
        assert (one["workers"], two["workers"]) == (1, 2)
        assert one["final_step"] == two["final_step"] == 20
        _assert_same_metrics(one["final_eval"], two["final_eval"], rtol=1e-5)
        _assert_same_metrics(one["final_train"], two["final_train"], rtol=1e-5)

    # TensorBoard events from rank 0 hold the logged train loss.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(shared_out / "w2-tms_5-2" / "tb"))
    events.Reload()
    loss = events.Scalars("train/loss/total")
    assert [e.step for e in loss] == [10, 20]
    logged = [
        m for m in RunDir(shared_out / "w2-tms_5-2").read_metrics() if "train/loss/total" in m
    ]
    assert [e.value for e in loss] == pytest.approx([m["train/loss/total"] for m in logged])


@pytest.mark.slow
def test_sigkilled_driver_resumes_and_matches_uninterrupted(
    ray_head: RayHead, shared_out: Path, tms_reference: dict[str, float]
) -> None:
    args = ["run", *TMS, "--name", "tms-killed", "--cpus-per-worker", "1"]
    env = _env(ray_head, shared_out)
    run_dir = shared_out / "tms-killed"
    proc = subprocess.Popen(
        spd_ray_cmd(*args), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.time() + 300
    step = 0
    while time.time() < deadline and proc.poll() is None:
        step = _checkpoint_step(run_dir)
        if step >= 2 * TMS_SAVE:  # after the second checkpoint
            break
        time.sleep(0.05)
    assert proc.poll() is None, "the run ended before it could be killed; make it longer"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 2 * TMS_SAVE <= step < TMS_STEPS

    res = _run(*args, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    resumed = int(re.search(r"resumed tms-killed from step (\d+)", res.stderr).group(1))  # type: ignore[union-attr]
    assert step <= resumed < TMS_STEPS
    assert re.search(rf"\[tms-killed\] resumed from step {resumed}", res.stdout + res.stderr)
    _assert_same_metrics(tms_reference, _summary(run_dir)["final_eval"], rtol=1e-6)
    steps = [m["step"] for m in RunDir(run_dir).read_metrics() if "train/loss/total" in m]
    assert steps == list(range(100, TMS_STEPS + 1, 100)), "train metrics lost or duplicated"

    again = _run(*args, env=env)
    assert again.returncode == 0 and "already finished" in again.stderr


def test_killed_worker_is_restarted_and_the_run_completes(
    ray_head: RayHead, shared_out: Path, tms_reference: dict[str, float]
) -> None:
    args = ["run", *TMS, "--name", "tms-worker-killed", "--cpus-per-worker", "1"]
    args += ["--max-failures", "2"]
    run_dir = shared_out / "tms-worker-killed"
    proc = subprocess.Popen(
        spd_ray_cmd(*args),
        env=_env(ray_head, shared_out),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out = _Lines(proc)
    deadline = time.time() + 300
    pid = None
    while time.time() < deadline and proc.poll() is None:
        m = out.find(r"\[tms-worker-killed\] .* rank 0 pid (\d+)")
        if m and _checkpoint_step(run_dir) >= TMS_SAVE:
            pid = int(m.group(1))
            break
        time.sleep(0.05)
    assert pid is not None and proc.poll() is None, out.text[-3000:]
    os.kill(pid, signal.SIGKILL)
    assert proc.wait(timeout=300) == 0, out.text[-3000:]
    out.thread.join(timeout=10)
    assert out.find(r"\[tms-worker-killed\] resumed from step \d+"), out.text[-3000:]
    summary = _summary(run_dir)
    assert summary["final_step"] == TMS_STEPS
    _assert_same_metrics(tms_reference, summary["final_eval"], rtol=1e-6)
    # The restarted worker group cut what the killed one logged after its checkpoint.
    pairs = Counter(
        (m["step"], k) for m in RunDir(run_dir).read_metrics() for k in m if k != "step"
    )
    assert max(pairs.values()) == 1, [p for p, n in pairs.items() if n > 1][:5]


def test_secrets_stay_out_of_the_runtime_env(ray_head: RayHead, tmp_path: Path) -> None:
    """Keys and tokens set where `spd-ray run` starts never reach the job's runtime env (which
    the cluster stores and shows); other settings still do, and a worker without the key says
    so once."""
    from ray.util.state import list_jobs

    secrets = {"WANDB_API_KEY": "wandb-secret-5f3a9c", "HF_TOKEN": "hf_secret_81d2e7"}
    env = _env(ray_head, tmp_path, SPD_RAY_TEST_SETTING="forwarded-7c1b", **secrets)
    proc = subprocess.Popen(
        spd_ray_cmd("run", str(TINY), "--name", "sec"),
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    # Ray reports a driver job's runtime env while the driver lives: look while the run runs.
    ours: list[str] = []
    reported: list[str] = []
    deadline = time.time() + 300
    while not ours and time.time() < deadline and proc.poll() is None:
        jobs = list_jobs(address=ray_head.dashboard, detail=True)
        reported = [json.dumps(job.runtime_env or {}) for job in jobs]
        ours = [r for r in reported if "forwarded-7c1b" in r]
        time.sleep(0.5)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert len(ours) == 1, reported
    for value in secrets.values():
        assert not any(value in r for r in reported)
    res = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    warnings = [ln for ln in res.stderr.splitlines() if "set where spd-ray was started" in ln]
    assert len(warnings) == 1 and "HF_TOKEN, WANDB_API_KEY" in warnings[0], res.stderr[-3000:]


@pytest.mark.slow
def test_ray_job_submit_runs_a_decomposition(ray_head: RayHead, tmp_path: Path) -> None:
    env_vars = {"SPD_RAY_THREADS": "1", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2"}
    res = subprocess.run(
        [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            ray_head.dashboard,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps({"env_vars": env_vars}),
            "--",
            "spd-ray",
            "run",
            "tests/fixtures/tiny_resid_mlp.yaml",
            "--out",
            str(tmp_path),
            "--name",
            "job",
        ],
        capture_output=True,
        text=True,
        env=ray_head.env(),
        timeout=600,
    )
    assert res.returncode == 0, (res.stdout + res.stderr)[-3000:]
    assert "succeeded" in res.stdout + res.stderr
    summary = _summary(tmp_path / "job")
    assert summary["final_step"] == 40
    assert (tmp_path / "job" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_local_ray_uses_all_cpus_and_matches_in_process(tmp_path: Path) -> None:
    """Without a cluster, `spd-ray run` starts a local Ray sized to the machine; its one worker
    gets every CPU as torch threads and reproduces the in-process run. Ray Train's helper actors
    that a Ray living only as long as the command has no use for are not started."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="spdl-", dir="/tmp"))  # short: Ray's socket paths
    env = _env(None, tmp_path, RAY_ADDRESS="local", RAY_TMPDIR=str(ray_tmp))
    env.pop("SPD_RAY_THREADS")
    try:
        res = _run("run", str(TINY), "--name", "r", env=env)
        actors = {
            line.split(":actor_name:", 1)[1].strip()
            for log in ray_tmp.glob("ray/session_*/logs/worker-*.out")
            for line in log.read_text().splitlines()
            if ":actor_name:" in line
        }
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert {"TrainController", "RayTrainWorker"} <= actors, actors
    unused = {
        "PlacementGroupCleaner",
        "DatasetManager",
        "PreemptionWatcher",
        "_AutoscalingCoordinatorActor",
    }
    assert not actors & unused, actors
    run_dir = Path(res.stdout.strip().splitlines()[-1])
    assert run_dir == tmp_path / "r"
    summary = _summary(run_dir)
    assert summary["final_step"] == 40
    assert summary["torch_threads"] == len(os.sched_getaffinity(0))
    assert any((run_dir / "ray").glob("checkpoint_*"))
    local = _run(
        "run", str(TINY), "--name", "l", "--in-process", env={**env, "SPD_RAY_THREADS": "2"}
    )
    assert local.returncode == 0, local.stderr
    _assert_same_metrics(summary["final_eval"], _summary(tmp_path / "l")["final_eval"], rtol=1e-5)
