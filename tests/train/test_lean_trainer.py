"""The TorchTrainer of our runs: Ray Train's default callbacks minus helper actors never needed."""

from __future__ import annotations

import ray.train

from spd_ray.train.ray_driver import lean_trainer_class

RAY_HELPERS = {"DatasetsCallback", "PlacementGroupCleanerCallback"}


def _callback_names(drop_pg_cleaner: bool, **kwargs: object) -> list[str]:
    trainer = lean_trainer_class(drop_pg_cleaner)(
        lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1), **kwargs
    )
    return [type(cb).__name__ for cb in trainer._create_default_callbacks()]


def _plain_names() -> list[str]:
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1))
    return [type(cb).__name__ for cb in trainer._create_default_callbacks()]


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
