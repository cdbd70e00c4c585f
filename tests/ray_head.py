"""A private Ray head for the test session: `ray start --head` on 127.0.0.1 with its own temp dir
and ports, stopped by process id (never a machine-wide `ray stop`, which would hit every Ray on the
machine). Run this file to start one by hand: `python tests/ray_head.py` prints its address."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

# Ray settings every process of the test cluster gets (ray-notes §2).
RAY_TEST_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_prestart_worker_first_driver": "0",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}


@dataclass
class RayHead:
    address: str  # GCS host:port, for RAY_ADDRESS
    dashboard: str  # http://127.0.0.1:<port>, for `ray job submit --address`
    temp_dir: Path
    ports: list[int]

    def env(self) -> dict[str, str]:
        """Environment for a process that should use this cluster."""
        return {**os.environ, **RAY_TEST_ENV, "RAY_ADDRESS": self.address}


def _free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def head_command(temp_dir: Path, ports: list[int], num_cpus: int) -> list[str]:
    """`ray start --head` on 127.0.0.1 with its own temp dir and the (GCS, dashboard, client,
    agent) `ports`, and no GPUs."""
    gcs, dashboard, client, agent = ports
    return [
        str(Path(sys.executable).parent / "ray"),
        "start",
        "--head",
        f"--temp-dir={temp_dir}",
        f"--port={gcs}",
        f"--num-cpus={num_cpus}",
        "--num-gpus=0",
        "--node-ip-address=127.0.0.1",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--ray-client-server-port={client}",
        "--disable-usage-stats",
    ]


def start_head(num_cpus: int = 2) -> RayHead:
    # Short path: Ray's Unix sockets live under it and must stay below ~107 characters.
    temp_dir = Path(tempfile.mkdtemp(prefix="spdr-", dir="/tmp"))
    gcs, dashboard, client, agent = _free_ports(4)
    cmd = head_command(temp_dir, [gcs, dashboard, client, agent], num_cpus)
    env = {**os.environ, **RAY_TEST_ENV}
    env.pop("RAY_ADDRESS", None)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    head = RayHead(
        f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dashboard}", temp_dir, [gcs, client, dashboard]
    )
    if res.returncode != 0:
        stop_head(head)
        raise RuntimeError(f"ray start failed:\n{res.stdout}\n{res.stderr}")
    return head


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line) for every process we can read."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore")
            stat = (entry / "stat").read_text()
            ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry.name)] = (ppid, cmdline)
    return table


def cluster_pids(head: RayHead) -> set[int]:
    """The head's processes (their command lines carry its temp dir or its ports) and all their
    descendants (workers rename themselves `ray::...`)."""
    table = _proc_table()
    marks = [str(head.temp_dir), *(f"={p}" for p in head.ports), *(f":{p}" for p in head.ports)]
    roots = {
        pid for pid, (_, cmd) in table.items() if "ray" in cmd and any(m in cmd for m in marks)
    }
    roots.discard(os.getpid())
    pids = set(roots)
    changed = True
    while changed:
        changed = False
        for pid, (ppid, _) in table.items():
            if ppid in pids and pid not in pids and pid != os.getpid():
                pids.add(pid)
                changed = True
    return pids


def stop_head(head: RayHead, grace_s: float = 5.0) -> None:
    pids = cluster_pids(head)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.time() + grace_s
        while time.time() < deadline:
            pids = {p for p in pids if Path(f"/proc/{p}").exists() and not _zombie(p)}
            if not pids:
                break
            time.sleep(0.1)
        if not pids:
            break
    shutil.rmtree(head.temp_dir, ignore_errors=True)


def _zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] == "Z"


if __name__ == "__main__":
    h = start_head()
    print(f"RAY_ADDRESS={h.address} dashboard={h.dashboard} temp_dir={h.temp_dir} ports={h.ports}")
