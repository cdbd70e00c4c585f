"""spd-ray: Stochastic Parameter Decomposition of neural networks on Ray."""

from spd_ray.api import LoadedRun, decompose, load_run

__all__ = ["LoadedRun", "decompose", "load_run"]
