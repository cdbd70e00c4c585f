"""The Optuna study of a sweep: `study.db` (SQLite) in the sweep's folder on this machine."""

from __future__ import annotations

from typing import Any

from optuna.storages import RDBStorage

from spd_ray.sweep.place import STUDY_FILE, SweepPlace


def study_url(place: SweepPlace) -> str:
    return f"sqlite:///{place.dir / STUDY_FILE}"


class SweepStudyStorage(RDBStorage):  # type: ignore[misc]
    """`study.db` of `place`, found again wherever it is loaded: Tune saves the searcher (and
    this storage in it) with the sweep, and a sweep kept in a bucket may resume on a machine
    whose staging folder lies elsewhere, so the path is worked out anew when it is unpickled."""

    def __init__(self, place: SweepPlace) -> None:
        self.place = place
        super().__init__(study_url(place))

    def __setstate__(self, state: dict[str, Any]) -> None:
        state["url"] = study_url(state["place"])
        super().__setstate__(state)
