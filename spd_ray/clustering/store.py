"""A clustering on disk: `<run>/clustering/<name>/`.

meta.json                    the settings (a rerun with others is refused) and what is done
members/<i>.npz              member i's merge history (written whole, atomically: a member file
                             that exists is finished)
ensemble.npz                 merge_array [members, T + 1, n] over the union of labels, labels
distances_<method>.npz       distances [T + 1, members, members] (lower triangle; NaN above)
plots/*.png
mappings/member<i>-iter<T>.json   cluster mappings (`spd-ray cluster-mapping`)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from spd_ray.clustering.merge import MergeHistory
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import atomic_write, write_json

META = "meta.json"
MEMBERS = "members"
ENSEMBLE = "ensemble.npz"


def member_path(root: Path, index: int) -> Path:
    return root / MEMBERS / f"{index}.npz"


def save_member(path: Path, history: MergeHistory, info: dict[str, Any]) -> None:
    save_npz(
        path,
        labels=np.array(history.labels),
        group_idxs=history.group_idxs,
        pairs=history.pairs,
        costs=history.costs,
        mdl=history.mdl,
        n_samples=np.array(history.n_samples),
        info=np.array(json.dumps(info)),
    )


def load_member(path: Path) -> tuple[MergeHistory, dict[str, Any]]:
    try:
        with np.load(path, allow_pickle=False) as z:
            history = MergeHistory(
                labels=[str(x) for x in z["labels"]],
                group_idxs=z["group_idxs"],
                pairs=z["pairs"],
                costs=z["costs"],
                mdl=z["mdl"],
                n_samples=int(z["n_samples"]),
            )
            info = json.loads(str(z["info"]))
    except (OSError, ValueError, KeyError) as err:
        raise InputError(f"{path}: not a readable clustering member ({err})") from None
    return history, info


def read_meta(root: Path) -> dict[str, Any]:
    path = root / META
    if not path.exists():
        raise NotFoundError(f"{root} is not a clustering (no {META}); run `spd-ray clustering`")
    try:
        data = json.loads(path.read_text())
    except ValueError as err:
        raise InputError(f"{path}: not valid JSON ({err})") from None
    assert isinstance(data, dict)
    return data


def write_meta(root: Path, meta: dict[str, Any]) -> None:
    write_json(root / META, meta)


def save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with tmp.open("wb") as f:
            np.savez_compressed(f, **arrays)  # type: ignore[arg-type]

    atomic_write(path, write)


def finished_members(root: Path, n: int) -> list[int]:
    return [i for i in range(n) if member_path(root, i).exists()]
