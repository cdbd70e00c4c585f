"""`spd-ray sweep` on a multi-node Ray cluster (a 0-CPU head and two 1-CPU worker nodes on this
machine, `tests/multinode.py`): the trials spread over both nodes and `results.csv` says where
each ran (its `node_id` and `hostname` columns, which round-trip through the table); a node that
dies mid-sweep costs only its running trial, which Tune restarts on the node that is left and
which resumes from its checkpoint."""

from __future__ import annotations

import csv
import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from cli_args import fast, spd_ray_cmd
from multinode import cluster_env, node_cluster, node_of, wait_until

from spd_ray.sweep.results import make_row, read_table, write_table

FAST = fast(train_log_freq=20, batch_size=1024)
SPACE = (
    "tms_5-2:\n"
    "  loss_metric_configs.ImportanceMinimalityLoss.coeff: "
    "{values: [1.0e-3, 2.0e-3, 3.0e-3, 4.0e-3]}\n"
)


def _sweep_args(tmp_path: Path, name: str, steps: int, *extra: str) -> list[str]:
    space = tmp_path / "space.yaml"
    space.write_text(SPACE)
    args = ["sweep", "tms_5-2", "--space", str(space), "--steps", str(steps), *FAST]
    return spd_ray_cmd(*args, "--name", name, *extra)


def _env(address: str, out: Path) -> dict[str, str]:
    return cluster_env(address, SPD_RAY_OUT=str(out), SPD_RAY_THREADS="1")


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / "results.csv").open() as f:
        return list(csv.DictReader(f))


def _worker_ids(cluster: Any) -> set[str]:
    return {n.node_id for n in cluster.worker_nodes}


def test_placement_columns_round_trip_and_stay_out_of_tables_without_them(tmp_path: Path) -> None:
    placed = make_row("a", "finished", {"seed": 1}, {"m": 1.0}, 5, "/r/a", "0123abc", "host-1")
    both = make_row("b", "finished", {"seed": 2}, {"m": 2.0}, 5, "/r/b", "0456,0789", "h2,h3")
    never = make_row("c", "error", {"seed": 3}, {}, 0, None)  # failed before it started
    rows = [placed, both, never]
    for path in write_table(rows, tmp_path / "results.csv"):
        assert read_table(path) == rows, path
    header = (tmp_path / "results.csv").read_text().splitlines()[0].split(",")
    assert header[-3:] == ["run_dir", "node_id", "hostname"]
    write_table([never], tmp_path / "old.csv")  # a table from before placement was recorded
    assert (tmp_path / "old.csv").read_text().splitlines()[0].endswith(",run_dir")
    assert read_table(tmp_path / "old.csv") == [never]


@pytest.mark.slow
def test_trials_spread_over_two_nodes_and_the_table_says_where(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with node_cluster(head_cpus=0, nodes=(1, 1)) as cluster:
        workers = _worker_ids(cluster)
        cmd = _sweep_args(tmp_path, "spread", 100, "--set", "eval_freq=50")
        res = subprocess.run(
            cmd, capture_output=True, text=True, env=_env(cluster.address, out), timeout=900
        )
    assert res.returncode == 0, res.stderr[-4000:]
    rows = _rows(out / "spread")
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows), rows
    # One trial per 1-CPU node at a time: both nodes ran trials, and nothing ran on the head.
    assert {r["node_id"] for r in rows} == workers
    assert {r["hostname"] for r in rows} == {socket.gethostname()}
    for r in rows:
        placed = json.loads((Path(r["run_dir"]) / "workers.json").read_text())
        assert [w["node_id"] for w in placed["workers"]] == [r["node_id"]]


def _running_on_worker(sweep_dir: Path, workers: set[str], min_step: int) -> tuple[str, str] | None:
    """(trial id, node id) of a trial on a worker node that has checkpointed `min_step` steps."""
    for placed in sorted(sweep_dir.glob("trials/*/workers.json")):
        trial = placed.parent
        node = json.loads(placed.read_text())["workers"][0]["node_id"]
        if node not in workers or (trial / "summary.json").exists():
            continue
        steps = (
            [
                json.loads(line)["step"]
                for line in (trial / "metrics.jsonl").read_text().splitlines()
                if line.strip()
            ]
            if (trial / "metrics.jsonl").exists()
            else []
        )
        if steps and max(steps) >= min_step:
            return trial.name, node
    return None


@pytest.mark.slow
def test_a_node_lost_mid_sweep_costs_only_its_running_trial(tmp_path: Path) -> None:
    out = tmp_path / "out"
    steps, save = 1200, 100
    with node_cluster(head_cpus=0, nodes=(1, 1)) as cluster:
        workers = _worker_ids(cluster)
        cmd = _sweep_args(
            tmp_path, "lossy", steps, "--set", f"eval_freq={save}", "--set", f"save_freq={save}"
        )
        log = tmp_path / "sweep.log"  # a file, not a pipe: Tune's tables would fill a pipe
        with log.open("w") as sink:
            proc = subprocess.Popen(
                cmd, stdout=sink, stderr=subprocess.STDOUT, env=_env(cluster.address, out)
            )
        try:
            found: list[tuple[str, str]] = []

            def running() -> bool:
                hit = _running_on_worker(out / "lossy", workers, 2 * save)
                found.extend([hit] if hit else [])
                return hit is not None or proc.poll() is not None

            wait_until(running, timeout_s=600, every_s=0.5)
            assert found, f"the sweep ended before a trial checkpointed:\n{log.read_text()}"
            trial, node = found[0]
            t_removed = time.time()
            cluster.remove_node(node_of(cluster, node))
            proc.wait(timeout=900)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert proc.returncode == 0, log.read_text()[-4000:]
    rows = _rows(out / "lossy")
    assert len(rows) == 4 and all(r["status"] == "finished" for r in rows), rows
    survivor = (workers - {node}).pop()
    lost = next(r for r in rows if r["trial_id"] == trial)
    assert lost["node_id"] == survivor  # restarted on the node that is left
    placed = json.loads((out / "lossy" / "trials" / trial / "workers.json").read_text())
    assert placed["attempt"] == 1 and placed["previous"][0]["workers"][0]["node_id"] == node
    # It resumed from a checkpoint of the lost start (step 200 was logged before the loss, so
    # step 100 at least was saved), not from step 0.
    resumed = placed["resumed_from_step"]
    assert save <= resumed < steps and resumed % save == 0, resumed
    assert placed["started_at"] > t_removed
    summary = json.loads((out / "lossy" / "trials" / trial / "summary.json").read_text())
    assert summary["final_step"] == steps
    # Every other trial ran once, where it started.
    for r in rows:
        if r["trial_id"] != trial:
            other = json.loads((Path(r["run_dir"]) / "workers.json").read_text())
            assert other["attempt"] == 0, r
