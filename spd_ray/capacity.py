"""Can the connected cluster hold what a command asks for - now, ever, or after an autoscaler adds
nodes? Checked on the driver before any training, so a request that can never be met fails with
one line instead of waiting in Ray's queue forever.

A request is a list of bundles (one per worker: `{"CPU": 1.0}`, `{"CPU": 1.0, "GPU": 1.0}`); each
bundle must fit on one node. Without an autoscaler the nodes that are alive now are all there
will ever be. With one, the driver asks it for the bundles (`ray.autoscaler.sdk.
request_resources`, the request an autoscaler on any provider - cloud, KubeRay, the fake
multi-node one - acts on), waits with a visible message, and fails after `--wait-timeout`.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from spd_ray.errors import InputError
from spd_ray.ray_session import alive_nodes, say

Bundle = dict[str, float]
# Node types an autoscaler does not manage show as "node_<node id>" (Ray's read-only provider).
_READONLY_TYPE = re.compile(r"^node_[0-9a-f]+$")
_KINDS = ("GPU", "CPU")


def node_totals() -> list[Bundle]:
    """Every alive node's total resources (CPU, GPU, memory, custom)."""
    return [dict(n.get("Resources", {})) for n in alive_nodes()]


def can_place(bundles: list[Bundle], nodes: list[Bundle]) -> bool:
    """Whether every bundle fits on some node at once (largest bundle first, first node that
    fits); `nodes` are the free resources per node."""
    free = [dict(n) for n in nodes]
    for bundle in sorted(bundles, key=lambda b: tuple(-b.get(k, 0.0) for k in _KINDS)):
        for node in free:
            if all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return False
    return True


def _v1_report() -> dict[str, Any] | None:
    from ray.experimental.internal_kv import _internal_kv_get, _internal_kv_initialized

    if not _internal_kv_initialized():
        return None
    raw = _internal_kv_get("__autoscaling_status")
    if not raw:
        return None
    report = json.loads(raw).get("autoscaler_report")
    return report if isinstance(report, dict) else None


def _v2_types() -> list[str]:
    import ray

    try:
        from ray.autoscaler.v2.sdk import get_cluster_status

        status = get_cluster_status(ray.get_runtime_context().gcs_address)
    except Exception:  # noqa: BLE001 - an older Ray or no v2 state: the v1 report decides
        return []
    nodes = [*status.active_nodes, *status.idle_nodes, *status.pending_nodes]
    types = [n.ray_node_type_name for n in nodes]
    return types + [launch.ray_node_type_name for launch in status.pending_launches]


def autoscaler_present() -> bool:
    """Whether an autoscaler with node types manages the connected cluster: its status names
    real node types (`ray.worker.gpu`, a KubeRay worker group), where a cluster of `ray start`
    nodes only shows Ray's read-only `node_<id>` entries. `SPD_RAY_AUTOSCALER=1|0` overrides."""
    forced = os.environ.get("SPD_RAY_AUTOSCALER")
    if forced in ("0", "1"):
        return forced == "1"
    report = _v1_report() or {}
    types = list((report.get("node_type_mapping") or {}).values())
    types += list(report.get("pending_launches") or {})
    types += _v2_types()
    return any(t and not _READONLY_TYPE.match(t) for t in types)


def require_gpus(needed: int, what: str) -> None:
    """Fail at once, naming `--gpu`, when the connected cluster has fewer GPUs than `needed` and
    no autoscaler that could add them: Ray would otherwise queue the work forever."""
    import ray

    # An autoscaler's node types are in its config on the head, out of a driver's sight: with
    # one, GPUs may come.
    have = ray.cluster_resources().get("GPU", 0.0)
    if have < needed and not autoscaler_present():
        raise InputError(
            f"--gpu: {what} needs {needed} GPU(s), but the Ray cluster has {have:g} "
            "(drop --gpu, or attach to a cluster with GPUs through RAY_ADDRESS)"
        )


def describe(bundles: list[Bundle]) -> str:
    total = {k: sum(b.get(k, 0.0) for b in bundles) for k in _KINDS}
    parts = [f"{total[k]:g} {k}s" for k in _KINDS if total[k]]
    shape = ", ".join(f"{v:g} {k}" for k, v in bundles[0].items() if v) if bundles else ""
    return f"{len(bundles)} x {{{shape}}} ({', '.join(parts)})"


def _describe_nodes(nodes: list[Bundle]) -> str:
    if not nodes:
        return "no alive nodes"
    shapes = [
        "/".join(f"{n.get(k, 0.0):g} {k}" for k in ("CPU", "GPU") if k == "CPU" or n.get(k))
        for n in nodes
    ]
    return f"{len(nodes)} node(s): " + ", ".join(shapes)


def _missing(bundles: list[Bundle], nodes: list[Bundle]) -> str:
    total = {k: sum(b.get(k, 0.0) for b in bundles) for k in _KINDS}
    have = {k: sum(n.get(k, 0.0) for n in nodes) for k in _KINDS}
    short = [f"{total[k] - have[k]:g} more {k}s" for k in _KINDS if total[k] > have[k]]
    return " and ".join(short) or "nodes that can each hold one worker"


@contextmanager
def capacity_for(bundles: list[Bundle], what: str, wait_timeout_s: float) -> Iterator[None]:
    """Hold the command until the cluster can place `bundles` (`what` names the asking flag,
    e.g. "--workers 4"): at once when its nodes can; after the autoscaler added nodes when
    there is one (the request stands until the block ends, so the nodes are not scaled away
    before the work lands on them); else a ValueError that says what the cluster has."""
    if not bundles or can_place(bundles, node_totals()):
        yield
        return
    if not autoscaler_present():
        raise InputError(
            f"{what}: needs {describe(bundles)}, but the Ray cluster has "
            f"{_describe_nodes(node_totals())} and no autoscaler, so it can never hold them "
            "(ask for fewer workers or fewer CPUs per worker, or add nodes)"
        )
    from ray.autoscaler.sdk import request_resources

    request_resources(bundles=bundles)
    try:
        _wait_for(bundles, what, wait_timeout_s)
        yield
    finally:
        request_resources(bundles=[])


def _wait_for(bundles: list[Bundle], what: str, wait_timeout_s: float) -> None:
    t0 = time.monotonic()
    last_said = -1e9
    while not can_place(bundles, nodes := node_totals()):
        waited = time.monotonic() - t0
        if waited > wait_timeout_s:
            raise InputError(
                f"{what}: the autoscaler did not add {_missing(bundles, nodes)} within "
                f"--wait-timeout {wait_timeout_s:g} s (the cluster has {_describe_nodes(nodes)})"
            )
        if waited - last_said >= 15.0:
            say(f"waiting for {_missing(bundles, nodes)} from the autoscaler ({waited:.0f} s)")
            last_said = waited
        time.sleep(1.0)
    waited = time.monotonic() - t0
    if waited >= 1.0:
        say(f"the autoscaler added the nodes for {what} in {waited:.0f} s")
