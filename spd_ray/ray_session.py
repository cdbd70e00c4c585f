"""The Ray connection every command shares: attach or start, what travels to the workers, how many
CPUs and threads a piece gets, where it ran, and whether the cluster can hold what a command asks
for (waiting for an autoscaler when there is one).

Runs, sweeps, harvests and autointerp all connect here; nothing else calls `ray.init`.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

# AWS_: the object store's endpoint and region (its keys are secrets and stay behind).
FORWARDED_ENV_PREFIXES = ("SPD_RAY_", "HF_", "TRANSFORMERS_", "WANDB_", "RAY_TRAIN_", "AWS_")
# Keys and tokens: a runtime env is stored by the cluster and shown on its dashboard, so these
# never travel in one; a cluster gets them from its own environment (README: secrets).
_SECRET_WORDS = {
    "KEY",
    "APIKEY",
    "TOKEN",
    "SECRET",
    "PASSWORD",
    "PASSWD",
    "CREDENTIAL",
    "CREDENTIALS",
}
DEFAULT_WAIT_TIMEOUT_S = 600.0


def ray_env() -> dict[str, str]:
    """Environment for Ray processes (defaults; what the user set wins): no usage stats, no
    migration warnings, no tokenizer threads. The Train controller's poll of its workers stays at
    Ray's 2 s (`RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`): every poll is an actor call into the worker
    whose training thread then waits for the GIL: at 0.5 s that cost a tiny Llama 5.5% of its
    step time, at 2 s nothing measurable (`benchmarks/ray_overhead.py --interleave`), and a
    shorter interval only saves ~3 s of each run's start and end (the tests set 0.2 s)."""
    return {
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
        "TOKENIZERS_PARALLELISM": "false",
    }


def say(line: str) -> None:
    """A progress line, to standard error (commands keep standard output for their results). Ray
    Train V2 patches `print` in its workers to tee into its logger, which shows every line twice
    on the driver; writing to the stream shows it once."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _recorded_cluster() -> str | None:
    """The address of a cluster started with `ray start` on this machine (Ray records it in its
    temp dir), if that cluster still answers."""
    try:
        from ray._private.utils import read_ray_address

        address = read_ray_address()
    except Exception:  # noqa: BLE001 - a private helper; without it we just start a local Ray
        return None
    if not address or ":" not in address:
        return None
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except (OSError, ValueError):
        return None
    return address


def is_secret(name: str) -> bool:
    """WANDB_API_KEY, HF_TOKEN, AWS_SECRET_ACCESS_KEY, ...: a word of the name says it."""
    return any(word in _SECRET_WORDS for word in name.upper().split("_"))


def forwarded_env() -> dict[str, str]:
    """The driver's settings that the workers of an attached cluster must see too, less any
    secret."""
    return {
        k: v
        for k, v in os.environ.items()
        if k.startswith(FORWARDED_ENV_PREFIXES) and not is_secret(k)
    }


def driver_secrets() -> tuple[str, ...]:
    """Names (never values) of the secrets among the settings this driver would forward."""
    return tuple(
        sorted(k for k in os.environ if k.startswith(FORWARDED_ENV_PREFIXES) and is_secret(k))
    )


def warn_missing_secrets(names: tuple[str, ...] | list[str]) -> None:
    """On a worker: name the driver's secrets this node's environment lacks."""
    missing = [n for n in names if not os.environ.get(n)]
    if missing:
        say(
            f"warning: {', '.join(missing)} set where spd-ray was started but not on this "
            "worker's node; secrets are not sent through Ray - set them in the cluster's own "
            "environment (README: Secrets on a cluster)"
        )


def local_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


_started_local = False


def started_local_ray() -> bool:
    """True when this process started the Ray it is connected to (so it ends with this process)."""
    return _started_local


def cluster_address() -> str | None:
    """The address of the cluster `connect_ray` would attach to, None when it would start a
    private local Ray."""
    address = os.environ.get("RAY_ADDRESS") or _recorded_cluster()
    return None if not address or address == "local" else address


def connect_ray() -> None:
    """Attach to a running cluster - `RAY_ADDRESS`, or one started with `ray start` on this
    machine - or else start a local Ray sized to this machine (`RAY_ADDRESS=local` forces a
    private local Ray); `started_local_ray()` says which happened."""
    import ray

    global _started_local
    if ray.is_initialized():
        return
    for key, value in ray_env().items():
        os.environ.setdefault(key, value)
    address = cluster_address()
    if address is not None:
        # No num_cpus here: a cluster's resources are its own. Its workers get their environment
        # from `ray start`, so this process's spd-ray, Hugging Face and wandb settings travel in
        # the runtime env - except under `ray job submit`, whose runtime env already has them.
        kwargs: dict[str, Any] = {}
        forwarded = forwarded_env()
        if forwarded and "RAY_JOB_CONFIG_JSON_ENV_VAR" not in os.environ:
            kwargs["runtime_env"] = {"env_vars": forwarded}
        ray.init(address=address, log_to_driver=True, **kwargs)
        return
    # Node drains (preemption) do not happen on a Ray that lives and dies with this process, and
    # the watcher is one more idle process taking CPU from the workers.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    ray.init(
        address="local",
        num_cpus=local_cpus(),
        include_dashboard=False,
        log_to_driver=True,
        # Ray prestarts one idle worker per CPU for the first driver's tasks; Train's actors never
        # use them (each has its own runtime env), and on a small machine starting them delays the
        # run's own processes.
        _system_config={"prestart_worker_first_driver": False},
    )
    _started_local = True


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n.get("Alive")]


def is_local_cluster() -> bool:
    """True when the connected Ray has exactly one node, and it is this machine."""
    import ray

    nodes = alive_nodes()
    return len(nodes) == 1 and nodes[0].get("NodeManagerAddress") == ray.util.get_node_ip_address()


def held_cpus(default: float = 1.0) -> float:
    """CPUs Ray assigned to the calling task or actor (a Train worker's bundle included)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0)
    return cpus if cpus > 0 else default


def worker_threads(requested: int | None = None) -> int:
    """Torch threads for a Ray worker: `requested` if given, else the whole CPUs it holds
    (at least one): a worker on a 16-CPU bundle of a multi-node cluster uses 16 threads, two
    workers sharing a 2-CPU machine use one each."""
    if requested:
        return max(1, requested)
    return max(1, int(held_cpus()))


def here() -> dict[str, Any]:
    """Where the calling process runs: Ray node id, host name, node IP, process id."""
    import ray

    ctx = ray.get_runtime_context()
    return {
        "node_id": ctx.get_node_id(),
        "hostname": socket.gethostname(),
        "node_ip": ray.util.get_node_ip_address(),
        "pid": os.getpid(),
    }
