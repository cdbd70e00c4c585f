"""Counter-based mask noise (`spd_ray.core.counter_rng`, `CounterNoise`): the definition pinned
against hand-computable values, every implementation giving the same bits (numpy, torch eager,
compiled), the statistics of uniform numbers, and independence of draws, streams and seeds."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from spd_ray.core import counter_rng
from spd_ray.core.masks import CounterNoise, Noise, counter_randint, counter_uniform, key_tensor
from spd_ray.core.streams import stream_seed

CPU = torch.device("cpu")
M32 = 0xFFFFFFFF


def _mix_reference(x: int) -> int:
    """The hash written out on Python ints, straight from the definition."""
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & M32
    return x ^ (x >> 15)


def _bits_reference(seed: int, counter: int, n: int) -> int:
    k0, k1 = counter_rng.draw_key(seed, counter)
    return _mix_reference((_mix_reference(n ^ k0) + k1) & M32)


def test_the_draw_key_is_splitmix64():
    # SplitMix64's published first output for state 0 is 0xE220A8397B1DCDAF.
    k0, k1 = counter_rng.draw_key(0, 0)
    assert (k1 << 32) | k0 == 0xE220A8397B1DCDAF
    # draw c is output c + 1: the key of draw 1 at seed s is the key of draw 0 at s + golden
    assert counter_rng.draw_key(5, 1) == counter_rng.draw_key(5 + 0x9E3779B97F4A7C15, 0)


def test_numpy_torch_and_compiled_bits_agree_with_the_definition():
    seed, counter = stream_seed(3, "train_masks"), 17
    key = counter_rng.draw_key(seed, counter)
    start, n = 2**32 - 1000, 1000  # up to the last index a draw may hold
    want = [_bits_reference(seed, counter, i) for i in range(start, start + n)]
    assert counter_rng.bits_np(key, start, n).tolist() == want
    kt = key_tensor(key, CPU)
    assert counter_rng.bits_torch(kt, start, n, CPU).tolist() == want
    compiled = torch.compile(lambda k: counter_rng.bits_torch(k, start, n, CPU), fullgraph=True)
    assert compiled(kt).tolist() == want
    words = torch.tensor([0, 1, 2**31, M32, 123456789], dtype=torch.int64)
    assert counter_rng.mix(words).tolist() == [_mix_reference(int(w)) for w in words]
    with pytest.raises(ValueError, match="at most 2\\*\\*32 elements"):
        counter_rng.bits_np(key, start, n + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_eager_and_graph_uniforms_are_the_same_numbers(dtype: torch.dtype):
    noise = CounterNoise(stream_seed(1, "train_masks"))
    eager = noise.rand((300, 7), CPU, dtype)
    key = key_tensor(counter_rng.draw_key(noise.seed, 0), CPU)
    assert torch.equal(eager, counter_uniform(key, (300, 7), 0, CPU, dtype))
    graph = torch.compile(lambda k: counter_uniform(k, (300, 7), 0, CPU, dtype), fullgraph=True)
    assert torch.equal(eager, graph(key))
    assert eager.dtype == dtype and eager.min() >= 0 and eager.max() < 1
    # The value is the top b bits of the hash, exactly.
    b = counter_rng.FLOAT_BITS[dtype]
    top = _bits_reference(noise.seed, 0, 0) >> (32 - b)
    assert eager[0, 0].item() == top * 2.0**-b


def test_workers_draw_their_rows_of_the_global_draw():
    one = Noise.for_run(4, "train", CPU)
    three = [Noise.for_run(4, "train", CPU, rank=r, world_size=3) for r in range(3)]
    for _ in range(2):
        want = one.rand((6, 5), CPU, torch.float32)
        assert torch.equal(torch.cat([n.rand((2, 5), CPU, torch.float32) for n in three]), want)
        want = one.randint(1, 9, (6, 2), CPU)
        assert torch.equal(torch.cat([n.randint(1, 9, (2, 2), CPU) for n in three]), want)
        want = one.pgd_init().rand_unbatched((1, 4), CPU, torch.float32)
        for n in three:  # no batch dim: every worker draws the same numbers
            assert torch.equal(n.pgd_init().rand_unbatched((1, 4), CPU, torch.float32), want)
    # The graph's version of a worker's rows.
    key = key_tensor(counter_rng.draw_key(one.seed, 4), CPU)
    want = one.rand((6, 5), CPU, torch.float32)
    assert torch.equal(counter_uniform(key, (2, 5), 2 * 10, CPU, torch.float32), want[4:])


def test_uniforms_are_uniform_and_serially_independent():
    n = 2**20
    u = CounterNoise(stream_seed(0, "train_masks")).rand((n,), CPU, torch.float64).numpy()
    assert abs(u.mean() - 0.5) < 4 * np.sqrt(1 / 12 / n)
    assert abs(u.var() - 1 / 12) < 4 * np.sqrt(1 / 180 / n)
    counts = np.bincount((u * 1024).astype(int), minlength=1024)
    assert stats.chisquare(counts).pvalue > 1e-3
    # Neighbouring elements (what sits side by side in a mask row) are independent: 32 x 32 bins
    # of (u[2i], u[2i+1]), and no lag-1 correlation.
    pairs = (u[0::2] * 32).astype(int) * 32 + (u[1::2] * 32).astype(int)
    assert stats.chisquare(np.bincount(pairs, minlength=1024)).pvalue > 1e-3
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 4 / np.sqrt(n)
    # The top bits of ascending indices are not a pattern: each of 32 bits is set half the time.
    bits = counter_rng.bits_np(counter_rng.draw_key(0, 0), 0, n).astype(np.int64)
    for b in range(32):
        assert abs(((bits >> b) & 1).mean() - 0.5) < 4 * 0.5 / np.sqrt(n), b


def test_draws_streams_and_seeds_are_uncorrelated_and_never_repeat():
    n = 2**16
    draws = {}
    for seed in (0, 1, 2**40 + 1):
        for stream in ("train_masks", "train_pgd_init", "eval_masks", "eval_pgd_init"):
            noise = CounterNoise(stream_seed(seed, stream))
            for c in range(3):
                draws[(seed, stream, c)] = noise.rand((n,), CPU, torch.float32).numpy()
    for (a, x), (b, y) in itertools.combinations(draws.items(), 2):
        assert abs(np.corrcoef(x, y)[0, 1]) < 4.5 / np.sqrt(n), (a, b)
        # Two independent streams of 24-bit uniforms share ~n / 2**24 values per position.
        assert (x == y).sum() <= 3, (a, b)


def test_randint_is_uniform_over_its_range():
    noise = CounterNoise(stream_seed(2, "train_masks"))
    k = noise.randint(1, 7, (60000,), CPU)
    assert k.dtype == torch.int64 and k.min() == 1 and k.max() == 6
    assert stats.chisquare(torch.bincount(k - 1).numpy()).pvalue > 1e-3
    key = key_tensor(counter_rng.draw_key(noise.seed, 0), CPU)
    assert torch.equal(counter_randint(key, (60000,), 0, CPU, 1, 7), k)
    with pytest.raises(ValueError, match="high - low"):
        noise.randint(3, 3, (2,), CPU)


def test_the_state_is_the_draw_count():
    a = Noise.for_run(9, "eval", CPU)
    assert isinstance(a, CounterNoise) and a.seed == stream_seed(9, "eval_masks")
    pgd = a.pgd_init()
    assert isinstance(pgd, CounterNoise) and pgd.seed == stream_seed(9, "eval_pgd_init")
    first = [a.rand((5,), CPU, torch.float32) for _ in range(3)]
    assert (a.counter, pgd.counter) == (3, 0)
    b = CounterNoise(a.seed, counter=1)
    assert torch.equal(b.rand((5,), CPU, torch.float32), first[1])
    with pytest.raises(ValueError, match="counter-based uniforms come in"):
        b.rand((2,), CPU, torch.int32)
    with pytest.raises(ValueError, match="mask_rng"):
        Noise.for_run(9, "eval", CPU, rng="mt")  # type: ignore[arg-type]
