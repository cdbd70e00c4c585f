"""Cross-worker reductions on a real 2-process gloo group (no Ray): importance minimality's
all-reduced S_c gives the 1-worker loss and, after gradient averaging, the 1-worker gradient."""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from spd_ray.core.losses import importance_minimality_loss

P, BETA, EPS = 0.9, 0.5, 1e-12


def _inputs(n: int = 6, c: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(n, c, generator=g), "b": torch.randn(n, 3, c, generator=g)}


def _weights() -> dict[str, torch.Tensor]:
    """Parameters shared by every worker (like the CI functions'), one scale per component."""
    g = torch.Generator().manual_seed(1)
    return {k: torch.randn(5, generator=g).requires_grad_(True) for k in ("a", "b")}


def _ci(x: dict[str, torch.Tensor], w: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.sigmoid(x[k] * w[k]) for k in x}


def _worker(rank: int, store_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank, world_size=2)
    w = _weights()
    rows = {k: v[3 * rank : 3 * rank + 3] for k, v in _inputs().items()}
    loss = importance_minimality_loss(_ci(rows, w), P, BETA, EPS, world_size=2)
    loss.backward()
    grads = {k: v.grad for k, v in w.items()}
    for g in grads.values():
        assert g is not None
        dist.all_reduce(g)
        g /= 2  # the loop's gradient averaging
    torch.save({"loss": loss.detach(), "grads": grads}, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def test_importance_minimality_matches_one_worker_across_two_processes(tmp_path: Path) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    w = _weights()
    ref = importance_minimality_loss(_ci(_inputs(), w), P, BETA, EPS, world_size=1)
    ref.backward()
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        # Every worker sees the global loss ...
        torch.testing.assert_close(got["loss"], ref.detach(), rtol=1e-6, atol=0)
        # ... and the averaged gradient of the shared parameters is the 1-worker gradient.
        for k, g in got["grads"].items():
            torch.testing.assert_close(g, w[k].grad, rtol=1e-5, atol=1e-7)
