"""spd-ray: Stochastic Parameter Decomposition of neural networks on Ray.

The top-level names load on first use, so importing one layer (`spd_ray.core`, `spd_ray.evals`, ...)
does not import the training, Ray and storage stack behind the API.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from spd_ray.api import LoadedRun, decompose, load_run

__all__ = ["LoadedRun", "decompose", "load_run"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from spd_ray import api

        return getattr(api, name)
    raise AttributeError(f"module 'spd_ray' has no attribute '{name}'")
