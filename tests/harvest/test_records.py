"""`HarvestMeta.to_json()` is the `meta.json` earlier versions wrote, key for key and in order (keys
added since come last), and the actors' records survive the trip between processes."""

from __future__ import annotations

import json
import pickle

from spd_ray.harvest.accumulate import HarvestSettings
from spd_ray.harvest.records import (
    ActorProgress,
    ActorSpan,
    HarvestMeta,
    ModelInfo,
    ModuleInfo,
    Placement,
)

PLACEMENT = Placement(actor=1, node_id="ab" * 28, hostname="h1", node_ip="10.0.0.2", pid=4242)
SETTINGS = HarvestSettings(ci_threshold=0.01, top_k=3, reservoir=4, context=2, seed=7)
SOURCE = {"task": {"data_generation_type": "exactly_one_active"}, "n_features": 5, "seed": 0}


def _old_meta() -> dict[str, object]:
    """The dict the harvest driver built and wrote as meta.json before it had typed records."""
    return {
        "format": 1,
        "kind": "toy",
        "run": "/runs/tms",
        "run_step": 60,
        "source": SOURCE,
        "rows_limit": 512,
        "batch_size": 256,
        "actors": 2,
        "gpu": False,
        "settings": {
            "ci_threshold": 0.01,
            "top_k": 3,
            "reservoir": 4,
            "context": 2,
            "seed": 7,
            "output_top_k": 64,  # added with top-k output mass: new keys come last
        },
        "n_tokens": 512,
        "seconds": 3.25,
        "tokens_per_s": 157.5,
        "streaming_seconds": 1.5,
        "streaming_tokens_per_s": 341.3,
        "actor_busy_seconds": [0.5, 0.75],
        "actor_state_mb": [1.5, 1.5],
        "actor_peak_rss_mb": [900.1, 880.0],
        "actor_nodes": [
            {"actor": 0, "node_id": "cd" * 28, "hostname": "h0", "node_ip": "10.0.0.1", "pid": 1},
            {
                "actor": 1,
                "node_id": "ab" * 28,
                "hostname": "h1",
                "node_ip": "10.0.0.2",
                "pid": 4242,
            },
        ],
        "component_keys": ["linear1:0", "linear1:1", "linear2:0"],
        "modules": [{"path": "linear1", "C": 2}, {"path": "linear2", "C": 1}],
        "n_classes": 5,
        "shards": [[0, 2], [2, 3]],
        "output_dropped_total": None,  # a toy harvest: no output tokens
        "output_dropped_per_firing_max": None,
    }


def test_meta_json_is_written_as_before() -> None:
    meta = HarvestMeta(
        format=1,
        kind="toy",
        run="/runs/tms",
        run_step=60,
        source=SOURCE,
        rows_limit=512,
        batch_size=256,
        actors=2,
        gpu=False,
        settings=SETTINGS,
        n_tokens=512,
        seconds=3.25,
        tokens_per_s=157.5,
        streaming_seconds=1.5,
        streaming_tokens_per_s=341.3,
        actor_busy_seconds=[0.5, 0.75],
        actor_state_mb=[1.5, 1.5],
        actor_peak_rss_mb=[900.1, 880.0],
        actor_nodes=[
            Placement(actor=0, node_id="cd" * 28, hostname="h0", node_ip="10.0.0.1", pid=1),
            PLACEMENT,
        ],
        component_keys=["linear1:0", "linear1:1", "linear2:0"],
        modules=[ModuleInfo("linear1", 2), ModuleInfo("linear2", 1)],
        n_classes=5,
        shards=[(0, 2), (2, 3)],
    )
    assert json.dumps(meta.to_json(), indent=1) == json.dumps(_old_meta(), indent=1)


def test_actor_records_cross_processes_and_name_the_actor() -> None:
    info = ModelInfo(["linear1:0"], [ModuleInfo("linear1", 1)], n_classes=5, step=60)
    for record in (
        PLACEMENT,
        info,
        ActorProgress(rows=3, valid_tokens=3, state_bytes=1 << 20, peak_rss_bytes=1 << 30),
        ActorSpan(first_batch=1.0, end=2.5, busy_s=0.75),
    ):
        assert pickle.loads(pickle.dumps(record)) == record
    assert PLACEMENT.describe() == f"actor 1 (node {'ab' * 6}, host h1, pid 4242)"
