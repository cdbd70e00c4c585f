"""cluster/validate.py loaded once for the cluster tests (a script beside the configs, not part of
the package), and `broken`: a copy of a shipped file with one mistake put in."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def _load() -> ModuleType:
    name = "spd_ray_cluster_validate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "cluster" / "validate.py")
        assert spec is not None and spec.loader is not None
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


V = _load()


def broken(tmp_path: Path, source: Path, old: str, new: str, count: int = 1) -> Path:
    """A copy of `source` with `old` (which must occur `count` times) replaced by `new`."""
    text = source.read_text()
    assert text.count(old) == count, f"{old!r} occurs {text.count(old)} times in {source}"
    path = tmp_path / source.name
    path.write_text(text.replace(old, new))
    return path
