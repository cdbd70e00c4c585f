"""The induction task of the IH toy target, drawn from an explicit generator.

A sequence of `seq_len` tokens is `[BOS] T ... T S A T ... T S` (method.md §5):

- BOS = 0, ordinary tokens T and the memorised token A are uniform in 1..vocab_size, and the
  induction token S = vocab_size + 1 never occurs among the T;
- the first S sits at sequence position 1 + p with p uniform in [1, prefix_window), p counted from
  the first token after BOS as in the reference, and A follows it;
- the last token is S again, and the label is A: the token that followed the first S.

Every draw uses the `torch.Generator` passed in, never the global RNG, so a stream is fully
described by its generator state and resumes exactly (`IHBatches.state_dict`).
"""

from __future__ import annotations

from typing import Any

import torch
from jaxtyping import Int
from torch import Tensor, nn

from spd_ray.config import IHTargetConfig, IHTaskConfig

BOS = 0


class InductionTask:
    """Batches of induction sequences and their labels (see the module docstring)."""

    def __init__(self, vocab_size: int, seq_len: int, prefix_window: int | None = None):
        # Four slots are needed for S A ... S besides BOS; the reference's default window.
        window = seq_len - 3 if prefix_window is None else prefix_window
        assert vocab_size > 0, f"vocab_size must be positive, got {vocab_size}"
        if not 1 < window < seq_len - 2:
            raise ValueError(
                f"prefix_window {window} must lie in (1, seq_len - 2 = {seq_len - 2}): the first "
                "S A pair and the final S must fit in a sequence of seq_len tokens"
            )
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.prefix_window = window
        self.induction_token = vocab_size + 1
        self.n_tokens = vocab_size + 2  # BOS, 1..vocab_size, S

    @torch.no_grad()
    def generate_batch(
        self, batch_size: int, generator: torch.Generator
    ) -> tuple[Int[Tensor, "batch seq_len"], Int[Tensor, " batch"]]:
        """(tokens, labels) drawn on the generator's device."""
        dev, gen = generator.device, generator
        lo, hi = 1, self.vocab_size + 1
        label = torch.randint(lo, hi, (batch_size, 1), generator=gen, device=dev)
        body = torch.randint(lo, hi, (batch_size, self.seq_len - 2), generator=gen, device=dev)
        where = torch.randint(1, self.prefix_window, (batch_size, 1), generator=gen, device=dev)
        body.scatter_(1, where, self.induction_token)
        body.scatter_(1, where + 1, label)
        bos = torch.full((batch_size, 1), BOS, dtype=torch.long, device=dev)
        last = torch.full((batch_size, 1), self.induction_token, dtype=torch.long, device=dev)
        tokens = torch.cat([bos, body, last], dim=1)
        assert tokens.shape == (batch_size, self.seq_len)
        return tokens, label.squeeze(1)


class IHBatches:
    """An endless, resumable stream of induction token batches (labels dropped: the decomposition
    compares with the target's output), optionally sharded over data-parallel ranks.

    As `ToyBatches`: every rank draws the full global batch from the same seeded CPU generator and
    keeps rows `[rank * b, (rank + 1) * b)`, `b = batch_size // world_size`, so the shards
    concatenated in rank order are the `world_size=1` batch, and `state_dict()` from any rank
    resumes the stream on any number of ranks.
    """

    def __init__(
        self,
        task: InductionTask,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        assert world_size > 0 and 0 <= rank < world_size, f"rank {rank} of world_size {world_size}"
        if batch_size % world_size != 0:
            raise ValueError(
                f"batch_size {batch_size} is not divisible by world_size {world_size}: every rank "
                "must take an equal shard of the global batch"
            )
        self.task = task
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.device = device
        self.local_batch_size = batch_size // world_size
        self.generator = torch.Generator(device="cpu").manual_seed(seed)
        self.batches_served = 0

    def __iter__(self) -> IHBatches:
        return self

    def __next__(self) -> Int[Tensor, "local_batch seq_len"]:
        tokens, _ = self.task.generate_batch(self.batch_size, self.generator)
        start = self.rank * self.local_batch_size
        self.batches_served += 1
        return tokens[start : start + self.local_batch_size].to(self.device)

    def state_dict(self) -> dict[str, Any]:
        return {
            "generator_state": self.generator.get_state(),
            "batches_served": self.batches_served,
            "seed": self.seed,
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["batch_size"] != self.batch_size or state["seed"] != self.seed:
            raise ValueError(
                f"IHBatches state is for batch_size {state['batch_size']}, seed {state['seed']}; "
                f"this stream has batch_size {self.batch_size}, seed {self.seed}"
            )
        self.generator.set_state(state["generator_state"])
        self.batches_served = int(state["batches_served"])


def make_ih_task(task_config: IHTaskConfig, target_model: nn.Module) -> InductionTask:
    """The induction task of an IH target: vocabulary and length from the target's config, the
    window from the task config (None: the widest, seq_len - 3)."""
    model_type = getattr(target_model, "model_type", None)
    if model_type != "ih":
        raise ValueError(
            f"task_config.task_name 'ih' needs an ih target, got {type(target_model).__name__} "
            f"(model_type {model_type!r})"
        )
    cfg = getattr(target_model, "config", None)
    assert isinstance(cfg, IHTargetConfig), f"{type(target_model).__name__} has no IH config"
    return InductionTask(cfg.vocab_size, cfg.seq_len, task_config.prefix_window)
