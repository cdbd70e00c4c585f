"""The cluster mapping the viewer colours by: one member's grouping at one iteration, as
`{"<module path>:<index>": group id | null}` (singletons and dead subcomponents null; the groups
of two or more numbered 0, 1, ... in the order their first subcomponent appears)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spd_ray.clustering import store
from spd_ray.clustering.distances import label_order
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import write_json


def cluster_mapping(
    root: Path, k: int | None = None, iteration: int | None = None, member: int = 0
) -> tuple[dict[str, Any], Path]:
    """The mapping and the file it was written to (`mappings/member<i>-iter<t>.json`)."""
    if (k is None) == (iteration is None):
        raise InputError("give exactly one of --k and --iter")
    meta = store.read_meta(root)
    path = store.member_path(root, member)
    if not path.exists():
        n = meta.get("runs")
        raise NotFoundError(
            f"member {member} of {root} is not there (the ensemble has {n} members"
            f"{'' if meta.get('status') == 'finished' else ' and is not finished'})"
        )
    history, info = store.load_member(path)
    rows = history.group_idxs.shape[0]
    if k is not None:
        t = history.row_for_k(k)
    else:
        assert iteration is not None
        if not 0 <= iteration < rows:
            raise InputError(f"--iter {iteration}: member {member} has iterations 0..{rows - 1}")
        t = iteration
    ids = history.group_idxs[t]
    sizes = np.bincount(ids)
    numbering: dict[int, int] = {}
    clusters: dict[str, int | None] = {}
    for label, g in zip(history.labels, ids.tolist(), strict=True):
        if sizes[g] < 2:
            clusters[label] = None
        else:
            clusters[label] = numbering.setdefault(g, len(numbering))
    for label in info.get("dead", []):
        clusters[label] = None
    ordered = {lab: clusters[lab] for lab in sorted(clusters, key=label_order)}
    mapping = {
        "run": meta["run"],
        "clustering": meta["name"],
        "member": member,
        "iteration": t,
        "k": int(history.n - t),
        "clusters": ordered,
    }
    out = root / "mappings" / f"member{member}-iter{t}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, mapping)
    return mapping, out
