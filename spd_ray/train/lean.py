"""A leaner `TorchTrainer` for runs on a Ray of their own: without the helper actors (dataset
manager, placement-group cleaner, autoscaling coordinator) that such a run never uses.

It subclasses Ray Train's private classes, so it is used only on the Ray versions it was checked
against (`CHECKED_RAY`); `tests/train/test_lean.py` fails on any other installed Ray, so whoever
upgrades Ray checks these classes again (or drops this module) before the tests pass.
"""

from __future__ import annotations

from typing import Any

# Ray releases whose private Train classes this module was read against (ray.__version__ prefixes)
CHECKED_RAY = ("2.60.",)


def lean_applies() -> bool:
    import ray

    return ray.__version__.startswith(CHECKED_RAY)


def fixed_policy_without_coordinator() -> type:
    """Ray Train's fixed-size scaling policy minus its autoscaling-coordinator client: on a Ray
    that lives and dies with this process there is no autoscaler to tell about a run's
    resources, yet the client starts Ray Data's `_AutoscalingCoordinatorActor` (one more process:
    ~1 s of CPU while the worker starts, ~0.3% of the machine while it trains)."""
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    hooks = ("after_controller_start", "_maybe_send_resource_request", "_send_resource_request")
    assert all(hasattr(FixedScalingPolicy, h) for h in hooks), "Ray's FixedScalingPolicy moved"

    class LocalFixedScalingPolicy(FixedScalingPolicy):  # type: ignore[misc, valid-type]
        def after_controller_start(self, train_run_context: Any) -> None:
            pass  # no coordinator client; cancelling a request then does nothing

        def _maybe_send_resource_request(self) -> None:
            pass

        def _send_resource_request(self) -> None:
            pass

    return LocalFixedScalingPolicy


def lean_trainer_class(own_ray: bool) -> type:
    """`TorchTrainer` without the helper actors a run of ours never uses: Ray Train V2 starts a
    dataset manager even when no dataset is given; on a Ray this process started (`own_ray`),
    also no placement-group cleaner and no autoscaling coordinator (there is no autoscaler). Each
    is a Python process that imports Ray as it starts and takes ~0.3-0.5% of a core while idle -
    on a 2-core machine, time taken from the workers. Built on Ray's private callback and policy
    classes, so only on the Ray versions it was checked against (`CHECKED_RAY`); on any other
    the plain TorchTrainer."""
    from ray.train.torch import TorchTrainer

    if not lean_applies():
        return TorchTrainer
    from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
    from ray.train.v2._internal.callbacks.placement_group_callback import (
        PlacementGroupCleanerCallback,
    )
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    assert hasattr(TorchTrainer, "_create_default_callbacks"), "Ray's TorchTrainer changed"
    unused: tuple[type, ...] = (DatasetsCallback,)
    local_policy = None
    if own_ray:
        unused += (PlacementGroupCleanerCallback,)
        local_policy = fixed_policy_without_coordinator()

    class LeanTorchTrainer(TorchTrainer):  # type: ignore[misc, valid-type]
        def _create_default_callbacks(self) -> list[Any]:
            callbacks = super()._create_default_callbacks()  # type: ignore[misc]
            if self.datasets:
                return callbacks
            return [cb for cb in callbacks if not isinstance(cb, unused)]

        def _initialize_and_run_controller(self, **kwargs: Any) -> Any:
            policy = kwargs.get("scaling_policy")
            if local_policy is not None and type(policy) is FixedScalingPolicy:
                kwargs["scaling_policy"] = local_policy(policy.scaling_config)
            return super()._initialize_and_run_controller(**kwargs)  # type: ignore[misc]

    return LeanTorchTrainer
