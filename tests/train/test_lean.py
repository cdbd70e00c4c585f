"""The TorchTrainer of our runs: Ray Train's default callbacks minus helper actors never needed,
and only on a Ray it was checked against."""

from __future__ import annotations

import ray
import ray.train

from spd_ray.train.lean import CHECKED_RAY, fixed_policy_without_coordinator, lean_trainer_class

RAY_HELPERS = {"DatasetsCallback", "PlacementGroupCleanerCallback"}


def _callback_names(own_ray: bool, **kwargs: object) -> list[str]:
    trainer = lean_trainer_class(own_ray)(
        lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), **kwargs
    )
    return [type(cb).__name__ for cb in trainer._create_default_callbacks()]


def _plain_names() -> list[str]:
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    return [type(cb).__name__ for cb in trainer._create_default_callbacks()]


def test_the_installed_ray_is_one_the_lean_trainer_was_checked_against() -> None:
    """Fails when Ray is upgraded: spd_ray/train/lean.py subclasses Ray Train's private classes,
    so read them again for the new version (these tests show what must still hold) and add it
    to CHECKED_RAY, or drop the module."""
    assert ray.__version__.startswith(CHECKED_RAY), (
        f"Ray {ray.__version__} is not in spd_ray.train.lean.CHECKED_RAY {CHECKED_RAY}"
    )


def test_another_ray_gets_the_plain_torch_trainer(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    from ray.train.torch import TorchTrainer

    monkeypatch.setattr(ray, "__version__", "2.99.0")
    assert lean_trainer_class(True) is TorchTrainer
    assert lean_trainer_class(False) is TorchTrainer


def test_a_run_on_its_own_ray_drops_the_dataset_manager_and_the_pg_cleaner() -> None:
    plain = _plain_names()
    assert set(plain) >= RAY_HELPERS  # pins Ray's defaults: a rename would show here
    assert _callback_names(True) == [n for n in plain if n not in RAY_HELPERS]


def test_an_attached_run_keeps_the_pg_cleaner() -> None:
    names = _callback_names(False)
    assert "PlacementGroupCleanerCallback" in names
    assert "DatasetsCallback" not in names
    assert names == [n for n in _plain_names() if n != "DatasetsCallback"]


def test_datasets_keep_every_default_callback() -> None:
    assert _callback_names(True, datasets={"train": lambda: None}) == _plain_names()


def test_the_local_scaling_policy_decides_like_ray_s_fixed_one_without_a_coordinator() -> None:
    """On a Ray this process started, the controller's policy makes Ray's fixed-size decisions
    but never creates the autoscaling coordinator actor (no Ray needed: creating it would fail)."""
    from ray.train.v2._internal.execution.scaling_policy import ResizeDecision
    from ray.train.v2._internal.execution.scaling_policy.fixed import FixedScalingPolicy

    policy_cls = fixed_policy_without_coordinator()
    assert issubclass(policy_cls, FixedScalingPolicy)
    config = ray.train.ScalingConfig(num_workers=3, resources_per_worker={"CPU": 2})
    policy = policy_cls(config)
    policy.after_controller_start(object())
    decision = policy.make_decision_for_non_running_worker_group()
    assert isinstance(decision, ResizeDecision)
    assert (decision.num_workers, decision.resources_per_worker) == (3, {"CPU": 2})
    assert (
        type(policy.make_decision_for_running_worker_group(None, None)).__name__ == "NoopDecision"
    )
    assert policy._coordinator_client is None
    policy.before_controller_abort()  # nothing to cancel


def test_only_a_run_on_its_own_ray_swaps_the_scaling_policy(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """What Ray's fit() hands over (its fixed policy) reaches Ray's controller set-up swapped on
    a Ray of our own and untouched on an attached cluster. (Ray's set-up is replaced by a
    recorder here; test_ray.py's local-Ray test shows that the actor is really not started.)"""
    from ray.train.v2._internal.execution.scaling_policy import create_scaling_policy
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    seen: list[str] = []

    def record(self: object, **kwargs: object) -> None:
        seen.append(type(kwargs["scaling_policy"]).__name__)

    monkeypatch.setattr(DataParallelTrainer, "_initialize_and_run_controller", record)
    for lean in (True, False):
        trainer = lean_trainer_class(lean)(
            lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1)
        )
        policy = create_scaling_policy(trainer.scaling_config)
        trainer._initialize_and_run_controller(scaling_policy=policy)
    assert seen == ["LocalFixedScalingPolicy", "FixedScalingPolicy"]
