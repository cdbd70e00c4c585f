"""Where results may live on a multi-node cluster: a folder every node sees (this module), or
object storage (`spd_ray.objstore`, staged and synced by `spd_ray.sync`).

Rank 0 of a run, a sweep's trials and a harvest's actors can land on any node, and
each writes or reads the output root there. A local path is only right when every node sees the
same folder (NFS, Lustre, a SLURM cluster's shared home): `check_shared_root` writes a probe file
from the driver and reads it back from a task pinned to each node.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import TYPE_CHECKING, Any

from spd_ray.errors import InputError
from spd_ray.io import write_text
from spd_ray.objstore import PROBE_PREFIX

if TYPE_CHECKING:
    pass


PROBE_TIMEOUT_S = 120.0


def _read_probe(path: str) -> str | None:
    """On a node: the probe's content, or None when this node cannot see it."""
    try:
        return Path(path).read_text()
    except OSError:
        return None


def nodes_missing(root: Path) -> list[dict[str, Any]]:
    """The alive nodes that do not see `root` as the driver does (an empty list when all do)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from spd_ray.ray_session import alive_nodes

    base = root  # nothing is created for a root that may be refused: probe its nearest folder
    while not base.is_dir() and base != base.parent:
        base = base.parent
    token = secrets.token_hex(16)
    probe = base / f"{PROBE_PREFIX}{token}"
    write_text(probe, token)
    try:
        nodes = alive_nodes()
        read = ray.remote(num_cpus=0, max_retries=0)(_read_probe)
        refs = [
            read.options(
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
            ).remote(str(probe))
            for n in nodes
        ]
        seen = ray.get(refs, timeout=PROBE_TIMEOUT_S)
    finally:
        probe.unlink(missing_ok=True)
    return [n for n, got in zip(nodes, seen, strict=True) if got != token]


def check_shared_root(root: Path, flag: str = "--out") -> None:
    """On a multi-node cluster, refuse a local output root that some node cannot see: rank 0 (or a
    trial, or an actor) would write there, and its results would be lost with that node."""
    from spd_ray.ray_session import is_local_cluster

    if is_local_cluster():
        return
    missing = nodes_missing(root)
    if missing:
        where = ", ".join(
            f"{n['NodeID'][:12]} ({n.get('NodeManagerHostname', '?')}, "
            f"{n.get('NodeManagerAddress', '?')})"
            for n in missing
        )
        raise InputError(
            f"{flag} {root}: {len(missing)} node(s) of the Ray cluster cannot see this folder "
            f"({where}); results written there would be lost with their node - use a path "
            "every node mounts (a shared filesystem) or object storage (s3://bucket/prefix)"
        )
