"""What only a GPU can show: counter-based mask noise draws the CPU's bits on the device, the
compiled bf16 step there matches the eager one and never waits for the device between logs, and
the clustering merge on the device takes the CPU's merges.

Skipped without CUDA. On a lent GPU machine `benchmarks/gpu_session.sh` runs this file with
`pytest --noconftest` (the suite's conftest needs Ray, which that machine lacks), so nothing here
uses the suite's fixtures. `SPD_RAY_TEST_DEVICE=cpu` runs it on the CPU instead, to check the tests
themselves; the host-sync check needs CUDA and is skipped then.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from step_helpers import WITH_PGD, assert_same_train_metrics, count_graphs, tiny_config, train_tiny

from spd_ray.config import Config
from spd_ray.core import counter_rng
from spd_ray.core.masks import CounterNoise, counter_randint, counter_uniform, key_tensor
from spd_ray.core.streams import stream_seed

CPU = torch.device("cpu")
_WANT = os.environ.get("SPD_RAY_TEST_DEVICE") or ("cuda" if torch.cuda.is_available() else "")
DEVICE = torch.device(_WANT or "cpu")
CUDA = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(
    not _WANT, reason="needs a CUDA GPU (or SPD_RAY_TEST_DEVICE=cpu to check the tests)"
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_counter_noise_draws_the_cpu_bits_on_the_device(dtype: torch.dtype) -> None:
    seed = stream_seed(7, "train_masks")
    on_cpu, on_device = CounterNoise(seed), CounterNoise(seed)
    for shape in ((4096, 20), (3, 5, 7)):
        want = on_cpu.rand(shape, CPU, dtype)
        got = on_device.rand(shape, DEVICE, dtype)
        assert got.device.type == DEVICE.type and torch.equal(got.cpu(), want)
    assert torch.equal(
        on_device.randint(0, 13, (64, 3), DEVICE).cpu(), on_cpu.randint(0, 13, (64, 3), CPU)
    )
    # Worker 1 of 2 computes rows 2..3 of the global [4, 6] draw, in a compiled graph too.
    key = counter_rng.draw_key(seed, on_cpu.counter)
    want = on_cpu.rand((4, 6), CPU, dtype)[2:]
    graph = torch.compile(lambda k: counter_uniform(k, (2, 6), 12, DEVICE, dtype), fullgraph=True)
    assert torch.equal(graph(key_tensor(key, DEVICE)).cpu(), want)
    key = counter_rng.draw_key(seed, on_cpu.counter)
    want = on_cpu.randint(2, 9, (5,), CPU)
    assert torch.equal(counter_randint(key_tensor(key, DEVICE), (5,), 0, DEVICE, 2, 9).cpu(), want)


def _config(*overrides: str, steps: int = 8, log_every: int = 1) -> Config:
    return tiny_config("autocast_bf16=true", WITH_PGD, *overrides, steps=steps, log_every=log_every)


def test_the_compiled_bf16_step_on_the_device_matches_eager_and_compiles_once() -> None:
    eager = train_tiny(_config("compile=false"), DEVICE)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    graphs: list[int] = []
    compiled = train_tiny(_config("compile=true"), DEVICE, count_graphs(graphs))
    assert graphs[0] == 0 and graphs[1] >= 1
    assert graphs[2:] == [graphs[1]] * 6, graphs  # no recompilation as masks and p change
    assert_same_train_metrics(eager, compiled, rtol=2e-2)


@pytest.mark.skipif(not CUDA, reason="host syncs exist only on CUDA")
@pytest.mark.parametrize("compile_step", [True, False])
def test_steps_between_logs_never_wait_for_the_device(compile_step: bool) -> None:
    """From the end of step 2 (the compiled graph built) to the end of step 11, any op that makes
    the host wait for the GPU (`.item()`, a sync copy to the CPU, `nonzero`) raises."""
    steps = 12
    checked: list[int] = []

    def on_step(step: int, seconds: float) -> None:
        if step == 2:
            torch.cuda.set_sync_debug_mode("error")
        elif step == steps - 1:
            torch.cuda.set_sync_debug_mode(0)
        if 2 < step < steps:
            checked.append(step)

    try:
        config = _config(f"compile={str(compile_step).lower()}", steps=steps, log_every=steps)
        rows = train_tiny(config, DEVICE, on_step)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert checked == list(range(3, steps)) and steps in rows


def test_the_merge_on_the_device_takes_the_cpu_merges() -> None:
    from spd_ray.clustering.merge import MergeSettings, merge

    rng = np.random.default_rng(5)
    K, samples = 6, 3000
    owner = np.repeat(np.arange(K), rng.integers(1, 6, size=K))
    rng.shuffle(owner)
    fires = rng.random((samples, K)) < rng.uniform(0.05, 0.4, size=K)
    noise = rng.random((samples, owner.size)) < 0.01  # members do not fire in perfect lockstep
    active = torch.tensor(fires[:, owner] ^ noise)
    labels = [f"m:{c}" for c in range(owner.size)]
    settings = MergeSettings(sampler="range", threshold=0.0)
    a = merge(active, labels, settings, seed=1, device=CPU)
    b = merge(active, labels, settings, seed=1, device=DEVICE)
    np.testing.assert_array_equal(a.group_idxs, b.group_idxs)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    np.testing.assert_allclose(b.costs, a.costs, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(b.mdl, a.mdl, rtol=1e-6, atol=1e-9)
    ids = b.group_idxs[b.row_for_k(K)]
    assert ((ids[:, None] == ids[None, :]) == (owner[:, None] == owner[None, :])).all()
