"""`spd-ray harvest` on a multi-node Ray cluster (a 0-CPU head and two 1-CPU worker nodes on this
machine, `tests/multinode.py`): two actors on two nodes give the harvest one actor gives, and
`meta.json` says where each actor ran; an actor lost with its node ends the harvest with one line
naming it and what to rerun, and leaves the previous harvest as it was; a run directory some node
cannot see is refused before any work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from cli_args import spd_ray_cmd
from harvest_fixtures import short_tms_run, spd_ray_cli
from multinode import blind_node, cluster_env, node_cluster, wait_until

STEPS = 60


@pytest.fixture(scope="module")
def tms_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short tms_5-2 decomposition: a harvest needs a checkpoint, not a good one."""
    return short_tms_run(tmp_path_factory.mktemp("harvest-multinode"), STEPS)


def _harvest(env: dict[str, str], run: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return spd_ray_cli(env, "harvest", str(run), "--no-progress", *args)


@pytest.mark.slow
def test_two_actors_on_two_nodes_equal_one_actor(tms_run: Path, tmp_path: Path) -> None:
    args = ["--dataset", "exactly_one_active", "--batches", "8", "--batch-size", "256"]
    with node_cluster(head_cpus=0, nodes=(1, 1)) as cluster:
        workers = {n.node_id for n in cluster.worker_nodes}
        env = cluster_env(cluster.address, OMP_NUM_THREADS="1")
        res = _harvest(env, tms_run, *args, "--actors", "1")
        assert res.returncode == 0, res.stderr[-4000:]
        one = tmp_path / "one"
        shutil.copytree(tms_run / "harvest", one)
        res = _harvest(env, tms_run, *args, "--actors", "2")
        assert res.returncode == 0, res.stderr[-4000:]
    two = tms_run / "harvest"
    meta_one = json.loads((one / "meta.json").read_text())
    meta_two = json.loads((two / "meta.json").read_text())
    assert [p["actor"] for p in meta_one["actor_nodes"]] == [0]
    assert meta_one["actor_nodes"][0]["node_id"] in workers
    # One actor per 1-CPU node: both nodes held one, and the meta says which.
    assert [p["actor"] for p in meta_two["actor_nodes"]] == [0, 1]
    assert {p["node_id"] for p in meta_two["actor_nodes"]} == workers
    assert "2 actor(s) on 2 node(s)" in res.stderr

    assert meta_one["n_tokens"] == meta_two["n_tokens"] == 8 * 256
    ca, cb = pq.read_table(one / "components.parquet"), pq.read_table(two / "components.parquet")
    assert ca.column_names == cb.column_names
    # Reservoirs are random samples, different per actor layout; their sizes are not.
    for col in ca.column_names:
        if col not in ("mean_ci", "mean_abs_act_firing"):
            assert ca[col].to_pylist() == cb[col].to_pylist(), col
    assert sum(ca["firing_count"].to_pylist()) > 0
    for col in ("mean_ci", "mean_abs_act_firing"):  # float sums in another order
        np.testing.assert_allclose(ca[col].to_numpy(), cb[col].to_numpy(), rtol=1e-6)
    for name in ("cofiring", "input_counts", "input_totals"):
        np.testing.assert_array_equal(np.load(one / f"{name}.npy"), np.load(two / f"{name}.npy"))
    ea = pq.read_table(one / "examples").to_pandas()
    eb = pq.read_table(two / "examples").to_pandas()
    top_a = ea[ea.kind == "top"].sort_values(["component", "rank"]).reset_index(drop=True)
    top_b = eb[eb.kind == "top"].sort_values(["component", "rank"]).reset_index(drop=True)
    assert len(top_a) > 0
    assert top_a.component.tolist() == top_b.component.tolist()
    assert top_a.uid.tolist() == top_b.uid.tolist()
    np.testing.assert_allclose(top_a.key.to_numpy(), top_b.key.to_numpy(), rtol=1e-6)


@pytest.mark.slow
def test_an_actor_lost_with_its_node_fails_in_one_line_and_writes_nothing(
    tms_run: Path, tmp_path: Path
) -> None:
    args = ["--dataset", "exactly_one_active", "--batches", "4000", "--batch-size", "256"]
    meta = tms_run / "harvest" / "meta.json"
    before = meta.read_bytes() if meta.exists() else None
    log = tmp_path / "harvest.log"
    with node_cluster(head_cpus=0, nodes=(1, 1)) as cluster:
        env = cluster_env(cluster.address, OMP_NUM_THREADS="1")
        cmd = spd_ray_cmd("harvest", str(tms_run), "--no-progress")
        with log.open("w") as sink:
            proc = subprocess.Popen(
                [*cmd, *args, "--actors", "2"], stdout=sink, stderr=subprocess.STDOUT, env=env
            )
        try:
            placed: list[str] = []

            def started() -> bool:
                found = re.search(
                    r"actor\(s\) on 2 node\(s\): 0@\w+ \(.*\), 1@(\w+) ", log.read_text()
                )
                placed.extend([found.group(1)] if found else [])
                return found is not None or proc.poll() is not None

            wait_until(started, timeout_s=240, every_s=0.2)
            assert placed, log.read_text()[-4000:]
            node = next(n for n in cluster.worker_nodes if n.node_id.startswith(placed[0]))
            time.sleep(3)  # into the streaming
            cluster.remove_node(node)
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert proc.returncode == 1, text[-4000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith("spd-ray harvest: failed: the harvest of "), text[-4000:]
    assert f"lost actor 1 (node {placed[0]}" in last and "actor 0" not in last
    assert f"rerun `spd-ray harvest {tms_run}`" in last
    assert "Traceback" not in text
    # A complete harvest from before is untouched; nothing half-made took its place.
    assert (meta.read_bytes() if meta.exists() else None) == before


def _listing(run: Path) -> list[tuple[str, float]]:
    """Every path under the run (but the harvest's lock file) and when it last changed."""
    return sorted(
        (str(p.relative_to(run)), p.stat().st_mtime)
        for p in run.rglob("*")
        if p.name != ".harvest.lock"
    )


@pytest.mark.slow
def test_a_run_directory_a_node_cannot_see_is_refused(tms_run: Path, tmp_path: Path) -> None:
    """A third node in its own mount namespace, where the run's output root is an empty tmpfs:
    its actor would read no run and its merge tasks would write where nobody looks."""
    root = tms_run.parent
    before = _listing(tms_run)
    with (
        node_cluster(head_cpus=0, nodes=(1, 1)) as cluster,
        blind_node(cluster.address, root, tmp_path / "node.log", nodes_after=3),
    ):
        args = ["--dataset", "exactly_one_active", "--batches", "2", "--actors", "2"]
        res = _harvest(cluster_env(cluster.address), tms_run, *args)
    assert res.returncode == 2, res.stderr[-3000:]
    lines = [x for x in res.stderr.splitlines() if x.startswith("spd-ray harvest: error: ")]
    assert len(lines) == 1, res.stderr[-3000:]
    assert f"the run directory {tms_run}: 1 node(s)" in lines[0] and "s3://" in lines[0]
    assert _listing(tms_run) == before  # refused before any harvest file
