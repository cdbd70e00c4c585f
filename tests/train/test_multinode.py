"""Runs on real multi-node Ray on this machine (`ray.cluster_utils.Cluster`: a 0-CPU head and
1-CPU worker nodes, each its own raylet): ranks land on different nodes and reproduce one worker;
a run survives losing the node of a rank; requests the cluster can never hold, and an output
folder some node cannot see, fail before training with one line; an autoscaler adds the nodes a
run asks for and removes them afterwards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_args import fast, spd_ray_cmd
from multinode import (
    blind_node,
    cluster_env,
    node_cluster,
    node_of,
    start_autoscaling_head,
    wait_until,
    worker_node_count,
)
from ray_head import stop_head

from spd_ray.runs import RunDir

FAST = fast(faithfulness_warmup_steps=None)
SHORT = [
    "tms_5-2",
    "--steps",
    "20",
    *FAST,
    "--set",
    "faithfulness_warmup_steps=5",
    "--set",
    "eval_freq=10",
    "--set",
    "slow_eval_freq=20",
    "--set",
    "train_log_freq=10",
]
# Long enough to lose a node between two checkpoints.
LOSS_STEPS, LOSS_SAVE = 900, 150
LONG = [
    "tms_5-2",
    "--steps",
    str(LOSS_STEPS),
    *FAST,
    "--set",
    "faithfulness_warmup_steps=20",
    "--set",
    f"save_freq={LOSS_SAVE}",
    "--set",
    "eval_freq=300",
    "--set",
    f"slow_eval_freq={LOSS_STEPS}",
    "--set",
    "train_log_freq=50",
]


def _run(*args: str, env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        spd_ray_cmd(*args), capture_output=True, text=True, env=env, timeout=timeout
    )


def _env(address: str | None, out: Path) -> dict[str, str]:
    if address is None:
        return {**os.environ, "SPD_RAY_OUT": str(out), "SPD_RAY_THREADS": "1"}
    return cluster_env(address, SPD_RAY_OUT=str(out), SPD_RAY_THREADS="1")


def _summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "summary.json").read_text())  # type: ignore[no-any-return]


def _workers(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "workers.json").read_text())  # type: ignore[no-any-return]


def _same(a: dict[str, float], b: dict[str, float], rtol: float) -> None:
    keys = [k for k in a if k not in ("train/steps_per_s", "train/lr")]
    assert keys and set(keys) <= set(b)
    for key in keys:
        assert b[key] == pytest.approx(a[key], rel=rtol, abs=1e-9), key


def _error_line(res: subprocess.CompletedProcess[str], command: str = "run") -> str:
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith(f"spd-ray {command}: error: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    return lines[0]


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[Any]:
    """A 0-CPU head and two 1-CPU worker nodes, shared by this module's default tests."""
    with node_cluster(head_cpus=0, nodes=(1, 1)) as cluster:
        yield cluster


def test_two_ranks_on_two_nodes_match_one_worker(two_nodes: Any, tmp_path: Path) -> None:
    one = _run("run", *SHORT, "--name", "one", "--in-process", env=_env(None, tmp_path))
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(
        "run", *SHORT, "--name", "two", "--workers", "2", env=_env(two_nodes.address, tmp_path)
    )
    assert two.returncode == 0, two.stderr[-3000:]

    placed = _workers(tmp_path / "two")
    assert placed["attempt"] == 0 and placed["world_size"] == 2
    assert [w["rank"] for w in placed["workers"]] == [0, 1]
    nodes = [w["node_id"] for w in placed["workers"]]
    worker_nodes = {n.node_id for n in two_nodes.worker_nodes}
    assert len(set(nodes)) == 2 and set(nodes) == worker_nodes
    _same(_summary(tmp_path / "one")["final_eval"], _summary(tmp_path / "two")["final_eval"], 1e-5)
    _same(
        _summary(tmp_path / "one")["final_train"], _summary(tmp_path / "two")["final_train"], 1e-5
    )


@pytest.mark.slow
def test_requests_the_cluster_can_never_hold_fail_before_training(
    two_nodes: Any, tmp_path: Path
) -> None:
    env = _env(two_nodes.address, tmp_path)
    t0 = time.monotonic()
    res = _run(
        "run", *SHORT, "--name", "three", "--workers", "3", "--set", "batch_size=1026", env=env
    )
    wall = time.monotonic() - t0
    assert res.returncode == 2
    line = _error_line(res)
    assert "--workers 3" in line and "3 CPUs" in line and "no autoscaler" in line, line
    assert "2 node(s)" in line or "3 node(s)" in line, line
    res = _run("run", *SHORT, "--name", "big", "--cpus-per-worker", "2", env=env)
    assert res.returncode == 2 and "--workers 1" in _error_line(res)
    space = Path(__file__).resolve().parents[2] / "experiments" / "sweeps" / "tms_5-2.yaml"
    res = _run(
        "sweep", "tms_5-2", "--space", str(space), "--trials", "2", "--steps", "10",
        "--workers-per-trial", "3", "--set", "batch_size=1026", "--name", "sw", env=env,
    )  # fmt: skip
    assert res.returncode == 2
    line = _error_line(res, "sweep")
    assert "--workers-per-trial 3" in line and "no autoscaler" in line, line
    assert not (tmp_path / "three").exists() and not (tmp_path / "big").exists()
    assert not (tmp_path / "sw").exists()
    assert wall < 60, f"the refusal took {wall:.0f} s"


@pytest.mark.slow
def test_a_local_out_that_a_node_cannot_see_is_refused(two_nodes: Any, tmp_path: Path) -> None:
    """A third node in its own mount namespace, where the output folder is an empty tmpfs - the
    situation of a node-local disk on a cloud cluster."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier-run").mkdir()
    with blind_node(two_nodes.address, out, tmp_path / "node.log", nodes_after=3):
        res = _run("run", *SHORT, "--name", "hidden", env={**_env(two_nodes.address, out)})
        assert res.returncode == 2, res.stderr[-3000:]
        line = _error_line(res)
        assert f"--out {out}" in line and "1 node(s)" in line and "s3://" in line, line
        assert sorted(p.name for p in out.iterdir()) == ["earlier-run"]  # nothing written
    wait_until(lambda: worker_node_count(two_nodes.address) == 2, timeout_s=120, every_s=3)


def _checkpoint_step(run_dir: Path) -> int:
    state = RunDir(run_dir).newest_state() if (run_dir / "checkpoint.pt").exists() else None
    return int(state["step"]) if state else 0


@pytest.mark.slow
def test_a_run_survives_losing_the_node_of_a_rank(tmp_path: Path) -> None:
    ref = _run("run", *LONG, "--name", "ref", "--in-process", env=_env(None, tmp_path))
    assert ref.returncode == 0, ref.stderr[-3000:]
    with node_cluster(head_cpus=0, nodes=(1, 1, 1)) as cluster:  # two for the run, one spare
        run_dir = tmp_path / "lossy"
        args = ["run", *LONG, "--name", "lossy", "--workers", "2", "--max-failures", "2"]
        proc = subprocess.Popen(
            spd_ray_cmd(*args),
            env=_env(cluster.address, tmp_path),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if _checkpoint_step(run_dir) >= LOSS_SAVE and (run_dir / "workers.json").exists():
                break
            time.sleep(0.1)
        assert proc.poll() is None, "the run ended before a node could be removed"
        before = _workers(run_dir)
        lost = before["workers"][1]["node_id"]
        cluster.remove_node(node_of(cluster, lost))
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, out[-4000:]
    after = _workers(run_dir)
    assert after["launch"] == before["launch"] and after["attempt"] >= 1, after
    assert lost not in {w["node_id"] for w in after["workers"]}
    assert after["previous"][0]["workers"] == before["workers"]
    resumed = re.search(r"\[lossy\] resumed from step (\d+)", out)
    assert resumed, out[-3000:]
    print(
        f"node loss: removed {lost[:8]} (rank 1) at checkpoint step >= {LOSS_SAVE}; attempt "
        f"{after['attempt']} resumed from step {resumed.group(1)} on "
        f"{[w['node_id'][:8] for w in after['workers']]} (before: "
        f"{[w['node_id'][:8] for w in before['workers']]})"
    )
    summary = _summary(run_dir)
    assert summary["final_step"] == LOSS_STEPS
    _same(_summary(tmp_path / "ref")["final_eval"], summary["final_eval"], rtol=1e-6)
    pairs = Counter(
        (m["step"], k) for m in RunDir(run_dir).read_metrics() for k in m if k != "step"
    )
    assert max(pairs.values()) == 1, [p for p, n in pairs.items() if n > 1][:5]


@pytest.mark.slow
def test_the_autoscaler_adds_nodes_for_a_run_and_removes_them_after(tmp_path: Path) -> None:
    head = start_autoscaling_head(
        {"cpu1": {"resources": {"CPU": 1}, "node_config": {}, "min_workers": 0, "max_workers": 2}},
        idle_timeout_minutes=0.1,
    )
    try:
        assert worker_node_count(head.address) == 0
        t0 = time.monotonic()
        res = _run(
            "run", *SHORT, "--name", "scaled", "--workers", "2", env=_env(head.address, tmp_path)
        )
        run_s = time.monotonic() - t0
        assert res.returncode == 0, res.stderr[-3000:]
        waited = re.search(r"the autoscaler added the nodes for --workers 2 in (\d+) s", res.stderr)
        assert waited, res.stderr[-3000:]
        assert "waiting for 2 more CPUs from the autoscaler" in res.stderr
        placed = _workers(tmp_path / "scaled")
        assert len({w["node_id"] for w in placed["workers"]}) == 2
        down_s = wait_until(lambda: worker_node_count(head.address) == 0, timeout_s=180, every_s=2)
        print(f"autoscaling: scale-up wait {waited.group(1)} s, run {run_s:.0f} s, "
              f"scale-down {down_s:.0f} s after the run")  # fmt: skip
    finally:
        stop_head(head)
