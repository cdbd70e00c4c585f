"""`spd-ray autointerp` on a multi-node Ray cluster (a 0-CPU head and two 1-CPU worker nodes on
this machine, `tests/multinode.py`): two workers on two nodes share one requests-per-minute
window - the server on 127.0.0.1 never sees more than `--rpm` requests in any 60 s - and the
store's `workers.json` says where each worker ran; a worker lost with its node is restarted on the
node left and its share redone; grants a lost worker never released come back."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from cli_args import spd_ray_cmd
from harvest_fixtures import short_tms_run, spd_ray_cli
from llm_server import LLMServer
from multinode import cluster_env, node_cluster, wait_until

from spd_ray.autointerp.limits import LimiterCore

STEPS = 60
RPM = 4
LIMIT = 6


@pytest.fixture(scope="module")
def tms_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short tms_5-2 decomposition: labelling needs a harvest, not a good run."""
    return short_tms_run(tmp_path_factory.mktemp("autointerp-multinode"), STEPS)


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return spd_ray_cli(env, *args, timeout=400)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_grants_lost_with_a_worker_come_back_after_max_hold() -> None:
    """A worker that dies with requests in flight never releases them: without `max_hold_s`
    its slots stay taken for the rest of the run (at rpm 2, forever); with it they come back."""
    clock = Clock()
    stuck = LimiterCore(rpm=2, budget_usd=None, clock=clock)
    core = LimiterCore(rpm=2, budget_usd=None, clock=clock, max_hold_s=300.0)
    for limiter in (stuck, core):
        assert limiter.try_acquire()[0] and limiter.try_acquire()[0]  # both lost, unreleased
    clock.now = 299.0
    assert not core.try_acquire()[0] and not stuck.try_acquire()[0]
    clock.now = 300.0
    assert not stuck.try_acquire()[0]
    # Presumed released at 300: their slots stay taken for the 60 s after, like any release.
    assert not core.try_acquire()[0] and core.stats()["presumed_lost"] == 2
    clock.now = 360.0
    assert core.try_acquire() == (True, 0.0) and not stuck.try_acquire()[0]
    core.release()
    # A grant presumed lost whose answer comes after all is not released twice.
    clock.now = 900.0
    assert core.try_acquire()[0]
    clock.now = 1250.0
    core.release()  # the answer of the grant of 900, after it was presumed lost
    assert core.stats()["presumed_lost"] == 3 and core.stats()["in_flight"] == 0
    core.release()  # the two grants of 0 may still answer too; nothing beyond them
    core.release()
    with pytest.raises(ValueError, match="without a matching grant"):
        core.release()


@pytest.mark.slow
def test_rate_limit_holds_across_two_workers_on_two_nodes(tms_run: Path) -> None:
    with node_cluster(head_cpus=0, nodes=(1, 1)) as cluster:
        workers = {n.node_id for n in cluster.worker_nodes}
        env = cluster_env(cluster.address, OMP_NUM_THREADS="1", TEST_LLM_KEY="sk-test")
        args = ["--dataset", "exactly_one_active", "--batches", "8", "--batch-size", "256"]
        res = _cli(env, "harvest", str(tms_run), "--no-progress", *args)
        assert res.returncode == 0, res.stderr[-4000:]
        with LLMServer(api_key="sk-test", latency_s=0.2) as server:
            t0 = time.monotonic()
            res = _cli(
                env,
                "autointerp",
                str(tms_run),
                "--base-url",
                server.base_url,
                "--model",
                "test-model",
                "--api-key-env",
                "TEST_LLM_KEY",
                "--no-progress",
                "--limit",
                str(LIMIT),
                "--actors",
                "2",
                "--concurrency",
                "1",  # one task per batch, so both workers get some
                "--rpm",
                str(RPM),
            )
            seconds = time.monotonic() - t0
            assert res.returncode == 0, res.stderr[-4000:]
            times = sorted(server.timestamps)
    # The endpoint check and one request per label, each sent once.
    assert len(times) == 1 + LIMIT
    busiest = max(sum(1 for u in times if t <= u < t + 60) for t in times)
    assert busiest <= RPM
    # The limit bound: request RPM + 1 waited for the first one's slot to leave the window.
    assert times[RPM] - times[0] >= 59.5 and seconds >= 60
    store = tms_run / "autointerp" / "test-model"
    rows = [json.loads(line) for line in (store / "labels.jsonl").read_text().splitlines()]
    assert len(rows) == LIMIT and all(r["status"] == "ok" for r in rows)
    placed = json.loads((store / "workers.json").read_text())["workers"]
    assert {w["node_id"] for w in placed} == workers
    assert sum(w["results"] for w in placed) == LIMIT and all(w["results"] >= 1 for w in placed)
    assert "on 2 worker(s) of 2 node(s)" in res.stderr


@pytest.mark.slow
def test_a_worker_lost_with_its_node_is_redone_elsewhere(tms_run: Path, tmp_path: Path) -> None:
    """Ray Data restarts an actor of the pool whose node died and resends its unfinished batch:
    every subcomponent ends labelled once, none is missing."""
    limit = 12
    store = tms_run / "autointerp" / "test-model"
    shutil.rmtree(store, ignore_errors=True)
    labels = store / "labels.jsonl"
    log = tmp_path / "autointerp.log"
    with node_cluster(head_cpus=0, nodes=(1, 1)) as cluster:
        env = cluster_env(cluster.address, OMP_NUM_THREADS="1", TEST_LLM_KEY="sk-test")
        if not (tms_run / "harvest").exists():
            args = ["--dataset", "exactly_one_active", "--batches", "8", "--batch-size", "256"]
            res = _cli(env, "harvest", str(tms_run), "--no-progress", *args)
            assert res.returncode == 0, res.stderr[-4000:]
        with LLMServer(api_key="sk-test", latency_s=1.0) as server:
            cmd = spd_ray_cmd("autointerp", str(tms_run))
            cmd += ["--base-url", server.base_url, "--model", "test-model"]
            cmd += ["--api-key-env", "TEST_LLM_KEY", "--no-progress", "--limit", str(limit)]
            cmd += ["--actors", "2", "--concurrency", "1"]
            with log.open("w") as sink:
                proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)
            try:

                def labelled(n: int) -> bool:
                    done = labels.exists() and len(labels.read_text().splitlines()) >= n
                    return done or proc.poll() is not None

                wait_until(lambda: labelled(2), timeout_s=240, every_s=0.2)
                assert proc.poll() is None, log.read_text()[-4000:]
                lost = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]  # each holds one
                survivor = next(n.node_id for n in cluster.worker_nodes if n is not lost)
                cluster.remove_node(lost)
                proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
            sent = server.chat_requests
    text = log.read_text()
    assert proc.returncode == 0, text[-4000:]
    rows = [json.loads(line) for line in labels.read_text().splitlines()]
    # Every subcomponent labelled once; the lost worker's unfinished request was sent again.
    assert len(rows) == limit and len({r["key"] for r in rows}) == limit
    assert all(r["status"] == "ok" for r in rows)
    assert 1 + limit <= sent <= 1 + limit + 1
    # Ray Data restarted the lost actor on the node that is left: a third worker process.
    placed = json.loads((store / "workers.json").read_text())["workers"]
    assert len(placed) == 3 and len({w["actor"] for w in placed}) == 2, placed
    restarted = [w for w in placed if sum(v["actor"] == w["actor"] for v in placed) == 2]
    assert {w["node_id"] for w in restarted} == {lost.node_id, survivor}
    assert sum(w["results"] for w in placed) == limit
