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

import torch
from jaxtyping import Int
from torch import Tensor, nn

from spd_ray.config import IHTargetConfig, IHTaskConfig
from spd_ray.data.toy import ToyBatches
from spd_ray.errors import InputError

BOS = 0


class InductionTask:
    """Batches of induction sequences and their labels (see the module docstring)."""

    def __init__(self, vocab_size: int, seq_len: int, prefix_window: int | None = None):
        # Four slots are needed for S A ... S besides BOS; the reference's default window.
        window = seq_len - 3 if prefix_window is None else prefix_window
        assert vocab_size > 0, f"vocab_size must be positive, got {vocab_size}"
        if not 1 < window < seq_len - 2:
            raise InputError(
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


class IHBatches(ToyBatches):
    """An endless, resumable stream of induction token batches (labels dropped: the decomposition
    compares with the target's output), sharded over data-parallel ranks exactly as `ToyBatches`:
    every rank draws the global batch from the same seeded generator and keeps its rows."""

    def __init__(
        self,
        task: InductionTask,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        device: torch.device | str = "cpu",
    ):
        super().__init__(task, batch_size, seed, rank, world_size, device)  # type: ignore[arg-type]
        self.task = task

    def _draw(self) -> Int[Tensor, "batch seq_len"]:
        tokens, _ = self.task.generate_batch(self.batch_size, self.generator)
        return tokens


def make_ih_task(task_config: IHTaskConfig, target_model: nn.Module) -> InductionTask:
    """The induction task of an IH target: vocabulary and length from the target's config, the
    window from the task config (None: the widest, seq_len - 3)."""
    model_type = getattr(target_model, "model_type", None)
    if model_type != "ih":
        raise InputError(
            f"task_config.task_name 'ih' needs an ih target, got {type(target_model).__name__} "
            f"(model_type {model_type!r})"
        )
    cfg = getattr(target_model, "config", None)
    assert isinstance(cfg, IHTargetConfig), f"{type(target_model).__name__} has no IH config"
    return InductionTask(cfg.vocab_size, cfg.seq_len, task_config.prefix_window)
