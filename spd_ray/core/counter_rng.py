"""Counter-based uniform numbers: draw `c` of a stream is a pure function of (stream seed, c) and
each element's flat index, so it can be computed inside a compiled graph, on any device, for any
slice of a global batch, and always gives the same bits.

Why: the run's mask noise used to come from a `torch.Generator` (a serial Mersenne Twister on the
CPU), drawn eagerly and handed into the compiled step: ~1.7 ms of a ~8.5 ms `tms_5-2` step. Hashing
indices is elementwise, so Inductor fuses it with the mask arithmetic and vectorises it.

The definition (words are 32-bit, arithmetic mod 2**32 unless said otherwise):

    draw key of draw c of the stream seeded S (64-bit): z = the (c+1)-th output of SplitMix64
        started at S, i.e. z = S + (c + 1) * 0x9E3779B97F4A7C15 mod 2**64, then
        z ^= z >> 30; z *= 0xBF58476D1CE4E5B9; z ^= z >> 27; z *= 0x94D049BB133111EB; z ^= z >> 31
        (mod 2**64); k0, k1 = the low and high words of z
    mix(x): x ^= x >> 16; x *= 0x21F0AAAD; x ^= x >> 15; x *= 0x735A2D97; x ^= x >> 15
        (a bijective 32-bit hash with two multiplies, from Wellons' hash-prospector search)
    element n (flat, row-major index in the *global* draw): bits = mix(mix(n ^ k0) + k1)
    U[0, 1) in a dtype with b significant bits (float32 24, float16 11, bfloat16 8, float64 32):
        (bits >> (32 - b)) * 2**-b                        (exact: every value is representable)
    an integer in [low, high):  low + (bits * (high - low)) >> 32

The key is computed on the host (Python ints); the elementwise part has two implementations with
identical bits (tested): numpy uint32 arrays for eager CPU draws (faster than the Mersenne Twister),
and torch int64 tensors (words kept below 2**32 and multipliers below 2**31, so no product
overflows) for compiled graphs and other devices. A draw holds at most 2**32 elements (checked).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

MASK = 0xFFFFFFFF
MASK64 = 2**64 - 1
MUL_A, MUL_B = 0x21F0AAAD, 0x735A2D97
LIMIT = 2**32  # elements per draw

FLOAT_BITS: dict[torch.dtype, int] = {
    torch.float32: 24,
    torch.float16: 11,
    torch.bfloat16: 8,
    torch.float64: 32,
}


def draw_key(seed: int, counter: int) -> tuple[int, int]:
    """(k0, k1) of draw `counter` of the stream seeded `seed` (SplitMix64's output counter + 1)."""
    z = (seed + (counter + 1) * 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    z ^= z >> 31
    return z & MASK, z >> 32


def mix(x: Tensor) -> Tensor:
    """The 32-bit hash on int64 tensors of words (< 2**32)."""
    x = x ^ (x >> 16)
    x = (x * MUL_A) & MASK
    x = x ^ (x >> 15)
    x = (x * MUL_B) & MASK
    return x ^ (x >> 15)


def mix_np(x: np.ndarray) -> np.ndarray:
    """`mix` on a uint32 array, in place (numpy's unsigned products wrap mod 2**32)."""
    x ^= x >> np.uint32(16)
    x *= np.uint32(MUL_A)
    x ^= x >> np.uint32(15)
    x *= np.uint32(MUL_B)
    x ^= x >> np.uint32(15)
    return x


def check_size(start: int, n: int) -> None:
    if start + n > LIMIT:
        raise ValueError(f"a counter-based draw holds at most 2**32 elements, not {start + n}")


def bits_np(key: tuple[int, int], start: int, n: int) -> np.ndarray:
    """The uint32 bits of elements start..start+n-1 of the draw with `key` (numpy, CPU)."""
    check_size(start, n)
    x = np.arange(start, start + n, dtype=np.uint32)
    x ^= np.uint32(key[0])
    mix_np(x)
    x += np.uint32(key[1])
    return mix_np(x)


def bits_torch(key: Tensor, start: int, n: int, device: torch.device) -> Tensor:
    """The same bits as int64 words; `key` an int64 tensor [k0, k1] (traceable, any device)."""
    check_size(start, n)
    x = torch.arange(start, start + n, dtype=torch.int64, device=device)
    x = mix(x ^ key[0])
    return mix((x + key[1]) & MASK)


def uniform_from_bits(bits: Tensor, dtype: torch.dtype) -> Tensor:
    """U[0, 1) in `dtype` from int64 words < 2**32."""
    if dtype not in FLOAT_BITS:
        known = ", ".join(map(str, FLOAT_BITS))
        raise ValueError(f"counter-based uniforms come in {known}, not {dtype}")
    b = FLOAT_BITS[dtype]
    if dtype == torch.float64:
        return bits.to(torch.float64) * 2.0**-32
    return ((bits >> (32 - b)).to(torch.float32) * 2.0**-b).to(dtype)


def uniform_np(bits: np.ndarray, dtype: torch.dtype) -> Tensor:
    """`uniform_from_bits` from numpy's uint32 bits (the arithmetic in numpy)."""
    if dtype not in FLOAT_BITS:
        return uniform_from_bits(torch.from_numpy(bits.astype(np.int64)), dtype)  # its error
    if dtype == torch.float64:
        return torch.from_numpy(bits.astype(np.float64) * 2.0**-32)
    b = FLOAT_BITS[dtype]
    u = (bits >> np.uint32(32 - b)).astype(np.float32) * np.float32(2.0**-b)
    return torch.from_numpy(u).to(dtype)


def randint_from_bits(bits: Tensor, low: int, high: int) -> Tensor:
    """Integers in [low, high) (int64) from 32-bit words: the top word of bits * (high - low)."""
    span = high - low
    if not 0 < span <= 2**31:
        raise ValueError(f"randint needs 0 < high - low <= 2**31, got [{low}, {high})")
    return low + ((bits.to(torch.int64) * span) >> 32)
