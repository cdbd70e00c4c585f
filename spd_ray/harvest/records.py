"""What a harvest's actors report to the driver, and what the driver records in `meta.json`.

The actors' records cross Ray process boundaries (pickled); `HarvestMeta.to_json()` is the
`meta.json` of the run layout (store.py), key for key in the order earlier versions wrote it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from spd_ray.harvest.accumulate import HarvestSettings


@dataclass(frozen=True)
class Placement:
    """Where one harvest actor runs."""

    actor: int
    node_id: str
    hostname: str
    node_ip: str
    pid: int

    def describe(self) -> str:
        return (
            f"actor {self.actor} (node {self.node_id[:12]}, host {self.hostname}, pid {self.pid})"
        )


@dataclass(frozen=True)
class ModuleInfo:
    path: str
    C: int  # subcomponents of the module


@dataclass(frozen=True)
class ModelInfo:
    """The decomposed model an actor holds: its component keys (`<module path>:<index>`, in
    order), its modules, the classes of its token statistics (vocabulary or input features) and
    the training step of its checkpoint."""

    keys: list[str]
    modules: list[ModuleInfo]
    n_classes: int
    step: int


@dataclass(frozen=True)
class ActorProgress:
    """One actor's counts so far."""

    rows: int
    valid_tokens: int
    state_bytes: int  # its harvest state (accumulators and keep tables)
    peak_rss_bytes: int  # the peak resident memory of its process


@dataclass(frozen=True)
class ActorSpan:
    """One actor's streaming: wall times (`time.time()`) of its first batch and of its end, and
    the seconds it spent in the model and the accumulators."""

    first_batch: float
    end: float
    busy_s: float


@dataclass(frozen=True)
class ShardColumns:
    """The per-component columns of one merged component range, and the run's totals (the same
    in every shard)."""

    firing_counts: np.ndarray  # [components of the range]
    ci_sums: np.ndarray
    act_sums: np.ndarray
    n_top: np.ndarray
    n_reservoir: np.ndarray
    output_dropped: np.ndarray  # output mass top-k left out (zero: exact, or a toy model)
    n_tokens: int
    input_totals: np.ndarray  # [V]
    output_totals: np.ndarray  # [V]


@dataclass(frozen=True)
class HarvestMeta:
    """`meta.json`: what was harvested, how, how fast, and where the shards are."""

    format: int
    kind: str  # "lm" | "toy"
    run: str
    run_step: int
    source: dict[str, Any]
    rows_limit: int | None  # None: the whole dataset
    batch_size: int
    actors: int
    gpu: bool
    settings: HarvestSettings
    n_tokens: int
    seconds: float
    tokens_per_s: float
    # From the first batch any actor started to the last one finished: without the start-up.
    streaming_seconds: float
    streaming_tokens_per_s: float
    actor_busy_seconds: list[float]
    actor_state_mb: list[float]
    actor_peak_rss_mb: list[float]
    actor_nodes: list[Placement]
    component_keys: list[str]
    modules: list[ModuleInfo]
    n_classes: int
    shards: list[tuple[int, int]]
    # Language models: the output mass that top-k (settings.output_top_k) left out, summed over
    # components, and its max over components per firing: no output-token measure of a component
    # is off by more than that fraction of its mass (None: a toy model, no output tokens).
    output_dropped_total: float | None = None
    output_dropped_per_firing_max: float | None = None

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
