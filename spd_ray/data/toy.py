"""Sparse toy features for the TMS and ResidMLP targets, drawn from an explicit generator.

Every draw uses the `torch.Generator` passed in, never the global RNG, so a data stream is fully
described by its generator state and can be saved and resumed exactly (`ToyBatches.state_dict`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from spd_ray.config import DataGenerationType, ResidMLPTaskConfig, TMSTaskConfig
from spd_ray.errors import InputError

_N_ACTIVE: dict[str, int] = {
    "exactly_one_active": 1,
    "exactly_two_active": 2,
    "exactly_three_active": 3,
    "exactly_four_active": 4,
    "exactly_five_active": 5,
}


class SparseFeatureDataset:
    """Batches of `n_features` sparse features with values drawn uniformly from `value_range`.

    - `at_least_zero_active`: each feature is active independently with `feature_probability`.
    - `exactly_<n>_active` (n = one .. five): n distinct features are active per row
      (`feature_probability` is not used).
    - `synced_inputs`: groups of features that fire together - in a row where any feature of a
      group is active, its inactive features get values too (drawn after the row's own).
    """

    def __init__(
        self,
        n_features: int,
        feature_probability: float,
        data_generation_type: DataGenerationType,
        value_range: tuple[float, float],
        synced_inputs: list[list[int]] | None = None,
    ):
        assert n_features > 0, f"n_features must be positive, got {n_features}"
        assert 0.0 < feature_probability <= 1.0, f"feature_probability {feature_probability}"
        assert value_range[0] < value_range[1], f"value_range {value_range} is empty"
        if data_generation_type in _N_ACTIVE:
            n_active = _N_ACTIVE[data_generation_type]
            assert n_active <= n_features, f"{data_generation_type} needs >= {n_active} features"
        elif data_generation_type != "at_least_zero_active":
            raise InputError(f"unknown data_generation_type {data_generation_type!r}")
        self.n_features = n_features
        self.feature_probability = feature_probability
        self.data_generation_type = data_generation_type
        self.value_range = value_range
        for group in synced_inputs or []:
            if max(group) >= n_features:
                raise InputError(
                    f"synced_inputs group {group} names a feature >= n_features {n_features}"
                )
        self.synced_inputs = [list(g) for g in synced_inputs or []]

    def _values(self, shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
        lo, hi = self.value_range
        u = torch.rand(shape, generator=generator, device=generator.device)
        return lo + (hi - lo) * u

    def generate_batch(
        self,
        batch_size: int,
        generator: torch.Generator,
        device: torch.device | str = "cpu",
    ) -> Float[Tensor, "batch n_features"]:
        """Draw on the generator's device, then move to `device`."""
        shape = (batch_size, self.n_features)
        if self.data_generation_type == "at_least_zero_active":
            # One uniform u per entry decides both: active iff u < p, and then u / p ~ U[0, 1)
            # independently of which entries are active. Half the draws of a separate mask.
            p = self.feature_probability
            u = torch.rand(shape, generator=generator, device=generator.device)
            lo, hi = self.value_range
            x = torch.where(u < p, lo + (hi - lo) / p * u, torch.zeros_like(u))
        else:
            n_active = _N_ACTIVE[self.data_generation_type]
            # The n_active largest of i.i.d. uniforms: a uniformly random set of distinct features.
            scores = torch.rand(shape, generator=generator, device=generator.device)
            idx = scores.topk(n_active, dim=1).indices
            values = self._values((batch_size, n_active), generator)
            x = torch.zeros(shape, device=generator.device).scatter_(1, idx, values)
        for group in self.synced_inputs:
            fired = (x[:, group] != 0).any(dim=1, keepdim=True)
            fill = self._values((batch_size, len(group)), generator)
            x[:, group] = torch.where(fired & (x[:, group] == 0), fill, x[:, group])
        return x.to(device)


class ToyBatches:
    """An endless, resumable stream of toy batches, optionally sharded over data-parallel ranks.

    Every rank draws the full global batch of `batch_size` rows from the same seeded CPU generator
    and keeps rows `[rank * b, (rank + 1) * b)` with `b = batch_size // world_size`. Concatenating
    the shards in rank order therefore gives exactly the batch that `world_size=1` yields at that
    step; the redundant draws are cheap for toy data. Because the generator state does not depend on
    the rank or the world size, `state_dict()` from any rank resumes the stream on any number of
    ranks. A run passes its `train_data` / `eval_data` stream seed (`spd_ray.core.streams`), never
    `config.seed` itself, so the data never repeats the mask noise.
    """

    def __init__(
        self,
        dataset: SparseFeatureDataset,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        assert world_size > 0 and 0 <= rank < world_size, f"rank {rank} of world_size {world_size}"
        if batch_size % world_size != 0:
            raise InputError(
                f"batch_size {batch_size} is not divisible by world_size {world_size}: every rank "
                "must take an equal shard of the global batch"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.local_batch_size = batch_size // world_size
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.batches_served = 0

    def __iter__(self) -> ToyBatches:
        return self

    def _draw(self) -> Tensor:
        """The next global batch (every rank draws it and keeps its rows)."""
        return self.dataset.generate_batch(self.batch_size, self.generator)

    def __next__(self) -> Float[Tensor, "local_batch n_features"]:
        full = self._draw()
        start = self.rank * self.local_batch_size
        self.batches_served += 1
        return full[start : start + self.local_batch_size].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator.get_state(),
            "batches_served": self.batches_served,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batch_size"] != self.batch_size or state["seed"] != self.seed:
            raise InputError(
                f"{type(self).__name__} state is for batch_size {state['batch_size']}, "
                f"seed {state['seed']}; "
                f"this stream has batch_size {self.batch_size}, seed {self.seed}"
            )
        self.generator.set_state(state["generator_state"])
        self.batches_served = int(state["batches_served"])


def make_toy_dataset(
    task_config: TMSTaskConfig | ResidMLPTaskConfig, target_model: nn.Module
) -> SparseFeatureDataset:
    """The dataset of a toy task: values U[0, 1] for TMS, U[-1, 1] for ResidMLP.

    `target_model` must be the matching toy target (its `model_type` equals the task's `task_name`);
    the number of features comes from it.
    """
    model_type = getattr(target_model, "model_type", None)
    if model_type != task_config.task_name:
        raise InputError(
            f"task_config.task_name {task_config.task_name!r} needs a {task_config.task_name} "
            f"target, got {type(target_model).__name__} (model_type {model_type!r})"
        )
    n_features = getattr(target_model, "n_features", None)
    assert isinstance(n_features, int), f"{type(target_model).__name__} has no int n_features"
    value_range = (0.0, 1.0) if task_config.task_name == "tms" else (-1.0, 1.0)
    return SparseFeatureDataset(
        n_features=n_features,
        feature_probability=task_config.feature_probability,
        data_generation_type=task_config.data_generation_type,
        value_range=value_range,
        synced_inputs=task_config.synced_inputs,
    )
