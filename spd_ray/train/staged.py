"""A run whose output root is object storage (`--out s3://bucket/runs`).

The run works in a local staging folder that mirrors `<root>/<name>` (`spd_ray.sync.staging_dir`)
and the bucket is its home: the driver fetches the run from the bucket before it starts (so a
rerun resumes from the bucket even when the staging folder is gone), sends what it prepared
(config, target copy) before the workers start, and brings the finished run back at the end.
Each node's first worker fetches the run into that node's staging folder; rank 0 sends it after
every checkpoint, at the end and when it fails. Ray Train's own checkpoints go to the same URI
(`storage_path`). A lease object in the bucket keeps a second driver off the same run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from spd_ray.io import check_name
from spd_ray.lease import RemoteLease
from spd_ray.objstore import check_reachable, exists, join
from spd_ray.sync import staging_dir, sync_down


@dataclass(frozen=True)
class StagedRun:
    local_root: Path  # the staging folder of the output root; the run is local_root / name
    run_uri: str


@contextmanager
def staged_run(root_uri: str, name: str) -> Iterator[StagedRun]:
    """Check the bucket (seconds, one line when it cannot be reached or written), take the run's
    lease, and fetch what the bucket has of the run into its staging folder."""
    check_name(name, "--name")
    check_reachable(root_uri, "--out", write=True)
    run_uri = join(root_uri, name)
    with RemoteLease(run_uri):
        local = staging_dir(run_uri)
        if exists(join(run_uri, "config.yaml")):
            sync_down(run_uri, local)
        yield StagedRun(staging_dir(root_uri), run_uri)
