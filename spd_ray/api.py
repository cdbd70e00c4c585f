"""The Python API: `decompose` (one run in-process, no Ray), `load_run` (a finished or running
run) and `resolve_run_dir`. For users and the CLI; the package's own modules import the modules
behind these names."""

from __future__ import annotations

from spd_ray.loaded_run import LoadedRun, load_run
from spd_ray.runs import resolve_run_dir
from spd_ray.train.run import RunResult, decompose

__all__ = ["LoadedRun", "RunResult", "decompose", "load_run", "resolve_run_dir"]
