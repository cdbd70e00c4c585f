"""Multi-node Ray on one machine, for tests: `ray.cluster_utils.Cluster` (several raylets, each a
real Ray node with its own resources) and an autoscaling cluster on Ray's fake multi-node
provider (a real autoscaler starting and stopping local nodes). Both stop only their own
processes; neither touches another Ray on the machine."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray_head import RAY_TEST_ENV, RayHead, _free_ports, head_command, stop_head


@contextlib.contextmanager
def node_cluster(head_cpus: int = 0, nodes: tuple[int, ...] = (1, 1)) -> Iterator[Any]:
    """A `Cluster` with a head of `head_cpus` CPUs and one worker node per entry of `nodes`
    (its CPUs); yields the Cluster (`.address`, `.add_node`, `.remove_node`)."""
    from ray.cluster_utils import Cluster

    os.environ.update(RAY_TEST_ENV)
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": head_cpus, "num_gpus": 0, "include_dashboard": False},
    )
    try:
        for cpus in nodes:
            cluster.add_node(num_cpus=cpus, num_gpus=0)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        cluster.shutdown()


def cluster_env(address: str, **extra: str) -> dict[str, str]:
    """Environment for a driver process attached to the cluster at `address`."""
    venv_bin = str(Path(sys.executable).parent)
    env = {**os.environ, **RAY_TEST_ENV, "RAY_ADDRESS": address, **extra}
    env["PATH"] = venv_bin + os.pathsep + env.get("PATH", "")
    env.pop("RAY_TMPDIR", None)
    return env


def node_of(cluster: Any, node_id: str) -> Any:
    """The cluster's node object (for `remove_node`) with this Ray node id."""
    for node in cluster.worker_nodes:
        if node.node_id == node_id:
            return node
    raise KeyError(f"no worker node {node_id} in the cluster")


@dataclass
class AutoscalingHead(RayHead):
    config_file: Path = Path()


def start_autoscaling_head(
    worker_types: dict[str, Any], idle_timeout_minutes: float = 0.1, head_cpus: int = 0
) -> AutoscalingHead:
    """A head with a real autoscaler on Ray's fake multi-node provider, with its own temp dir
    and ports (unlike `AutoscalingCluster.start`, it never runs `ray stop --force`, which would
    stop every Ray on the machine). `worker_types` is the autoscaler's `available_node_types`
    for worker nodes."""
    temp_dir = Path(tempfile.mkdtemp(prefix="spdr-as-", dir="/tmp"))
    gcs, dashboard, client, agent = _free_ports(4)
    address = f"127.0.0.1:{gcs}"
    config = {
        "cluster_name": "spdr-fake",
        "max_workers": sum(int(t.get("max_workers", 0)) for t in worker_types.values()),
        "provider": {
            "type": "fake_multinode",
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
            "gcs_address": address,
        },
        "available_node_types": {
            **worker_types,
            "ray.head.default": {
                "resources": {"CPU": head_cpus},
                "node_config": {},
                "max_workers": 0,
            },
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": idle_timeout_minutes,
        "docker": {},
        "initialization_commands": [],
        "setup_commands": [],
        "head_setup_commands": [],
        "worker_setup_commands": [],
        "head_start_ray_commands": [],
        "worker_start_ray_commands": [],
        "file_mounts": {},
        "cluster_synced_files": [],
        "file_mounts_sync_continuously": False,
        "rsync_exclude": [],
        "rsync_filter": [],
    }
    config_file = temp_dir / "autoscaler.json"
    config_file.write_text(json.dumps(config))
    cmd = head_command(temp_dir, [gcs, dashboard, client, agent], head_cpus)
    cmd.append(f"--autoscaling-config={config_file}")
    env = {**os.environ, **RAY_TEST_ENV, "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    env["RAY_FAKE_CLUSTER"] = "1"
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    head = AutoscalingHead(
        address, f"http://127.0.0.1:{dashboard}", temp_dir, [gcs, client, dashboard], config_file
    )
    if res.returncode != 0:
        stop_head(head)
        raise RuntimeError(f"ray start failed:\n{res.stdout}\n{res.stderr}")
    return head


@contextlib.contextmanager
def blind_node(address: str, folder: Path, log: Path, nodes_after: int) -> Iterator[None]:
    """One more 1-CPU worker node of the cluster at `address`, in its own mount namespace where
    `folder` is an empty tmpfs (a node-local disk on a cloud cluster); the block runs once the
    cluster has `nodes_after` worker nodes, and the node is stopped when it ends."""
    script = (
        f"mount -t tmpfs tmpfs {folder} && exec {sys.executable} {Path(__file__).resolve()} "
        f"join {address} 1"
    )
    node = subprocess.Popen(
        ["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
        env=cluster_env(address),
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    try:
        try:
            wait_until(lambda: worker_node_count(address) == nodes_after, 120, every_s=3)
        except TimeoutError:
            raise AssertionError(log.read_text()[-3000:]) from None
        yield
    finally:
        os.killpg(node.pid, signal.SIGTERM)
        try:
            node.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(node.pid, signal.SIGKILL)


def worker_node_count(address: str) -> int:
    """Alive nodes other than the head, asked of the cluster's GCS."""
    code = (
        f"import ray,json; ray.init(address={address!r}, log_to_driver=False); "
        "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'] and "
        "'node:__internal_head__' not in n['Resources'])))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=cluster_env(address),
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return int(out.stdout.strip().splitlines()[-1])


def wait_until(predicate: Any, timeout_s: float, every_s: float = 1.0) -> float:
    """Seconds until `predicate()` held; raises TimeoutError after `timeout_s`."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"not within {timeout_s:.0f} s")
        time.sleep(every_s)
    return time.monotonic() - t0


def _join(address: str, cpus: int) -> None:
    """Start one worker node of the cluster at `address` in this process (as `Cluster.add_node`
    does; `ray start --address` would swap 127.0.0.1 for the machine's outside IP, where a test
    cluster's GCS does not listen) and keep it until SIGTERM."""
    import signal

    import ray._private.node
    import ray._private.parameter

    params = ray._private.parameter.RayParams(
        gcs_address=address,
        node_ip_address="127.0.0.1",
        num_cpus=cpus,
        num_gpus=0,
        min_worker_port=0,
        max_worker_port=0,
        dashboard_agent_listen_port=0,
    )
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=False, spawn_reaper=False)
    signal.signal(signal.SIGTERM, lambda *_: None)
    signal.pause()
    node.kill_all_processes(check_alive=False, allow_graceful=True)


if __name__ == "__main__":  # python tests/multinode.py join <gcs address> <cpus>
    _join(sys.argv[2], int(sys.argv[3]))
