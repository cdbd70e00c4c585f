"""How far the toy CI functions' cost is from its floor: the per-subcomponent CI function with one
hidden layer (`MLPCiFn`, `ci_fn_hidden_dims: [h]`: z[n, c] = sum_j wo[c, j] gelu(a[n, c] w[c, j] +
b[c, j])), forward and backward, three ways in one run:

- `eager`: the project's torch expression, eagerly;
- `inductor`: the same expression under `torch.compile` (what the compiled step runs);
- `fused`: a hand-written C++ kernel on ATen's `Vectorized<float>` (built here with the ISA flags
  Inductor picks), one pass over [n, c] each way, one SIMD vector per h-chunk, no [n, c, h] buffer,
  and the normal CDF and density from one exponential (erf by Abramowitz-Stegun 7.1.26, the
  approximation ATen's vectorised erf uses, shares exp(-x^2 / 2) with the density);

and `relu` (inductor, GELU swapped for ReLU: the same memory traffic without the transcendentals).

    python benchmarks/ci_fn_floor.py [--threads 2] [--reps 30]

Measured 2026-12-07, 2 threads, ms per forward + backward of one module (two runs): tms_5-2's
[4096 x 20 x 16] inductor 2.8-3.3, fused 2.2, eager 4.4-4.7, relu 1.2-2.0; resid_mlp1's
[2048 x 100 x 16] 6.6-6.7, 5.4, 14.9-16.3, 2.5. Alone the kernel takes 0.65-0.8x Inductor's time,
but inside the compiled training step, where Inductor fuses the CI function with the sigmoids and
losses around it and the kernel is an opaque call, the step was 3% slower on tms_5-2 (9.5-9.9 ms
vs 9.9-10.4) and 2-4% faster on resid_mlp1 (alternated runs) - not worth a C++ build in the
product. GELU's erf and exp per hidden unit (~0.5 ns per element here) are the toy step's floor.
The kernel matches a float64 reference within 2e-6 (the last column).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from spd_ray.argtypes import positive_int

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/vec.h>
#include <ATen/cpu/vec/functional.h>
#include <vector>

using Vec = at::vec::Vectorized<float>;

// Normal CDF and density of x (float32), erf by Abramowitz-Stegun 7.1.26 sharing exp(-x^2/2).
static inline void cdf_pdf(const Vec& x, Vec& cdf, Vec& pdf) {
  const Vec one(1.0f), half(0.5f), zero(0.0f);
  const Vec z = x * Vec(0.70710678118654752f);
  const Vec az = z.abs();
  const Vec t = one / at::vec::fmadd(Vec(0.3275911f), az, one);
  Vec poly = Vec(1.061405429f);
  poly = at::vec::fmadd(poly, t, Vec(-1.453152027f));
  poly = at::vec::fmadd(poly, t, Vec(1.421413741f));
  poly = at::vec::fmadd(poly, t, Vec(-0.284496736f));
  poly = at::vec::fmadd(poly, t, Vec(0.254829592f));
  poly = poly * t;
  const Vec e = (x * x * Vec(-0.5f)).exp_u20();
  const Vec erf_abs = one - poly * e;
  const Vec erf = Vec::blendv(erf_abs, zero - erf_abs, x < zero);
  cdf = half * (one + erf);
  pdf = e * Vec(0.39894228040143267f);
}

// a [N, C], w/b/wo [C, H] (contiguous float32) -> z [N, C]
torch::Tensor mlp_ci_forward(torch::Tensor a, torch::Tensor w, torch::Tensor b, torch::Tensor wo) {
  const int64_t N = a.size(0), C = a.size(1), H = w.size(1);
  auto z = torch::empty({N, C}, a.options());
  const float* ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float* op = wo.data_ptr<float>();
  float* zp = z.data_ptr<float>();
  const int64_t V = Vec::size();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const Vec av(ap[n * C + c]);
        Vec acc(0.0f);
        for (int64_t j = 0; j < H; j += V) {
          const int64_t k = std::min(V, H - j);
          const int64_t o = c * H + j;
          const Vec x = at::vec::fmadd(av, Vec::loadu(wp + o, k), Vec::loadu(bp + o, k));
          Vec cdf, pdf;
          cdf_pdf(x, cdf, pdf);
          // lanes past H load wo = 0, so they add nothing
          acc = at::vec::fmadd(x * cdf, Vec::loadu(op + o, k), acc);
        }
        zp[n * C + c] = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, acc);
      }
    }
  });
  return z;
}

// g [N, C] -> (grad a [N, C], grad w, grad b, grad wo [C, H])
std::vector<torch::Tensor> mlp_ci_backward(
    torch::Tensor g, torch::Tensor a, torch::Tensor w, torch::Tensor b, torch::Tensor wo) {
  const int64_t N = a.size(0), C = a.size(1), H = w.size(1);
  auto ga = torch::empty({N, C}, a.options());
  const int64_t T = at::get_num_threads();
  auto acc = torch::zeros({T, 3, C, H}, a.options());
  const float* gp = g.data_ptr<float>();
  const float* ap = a.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  const float* bp = b.data_ptr<float>();
  const float* op = wo.data_ptr<float>();
  float* gap = ga.data_ptr<float>();
  float* accp = acc.data_ptr<float>();
  const int64_t V = Vec::size();
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    float* gw = accp + at::get_thread_num() * 3 * C * H;
    float* gb = gw + C * H;
    float* go = gb + C * H;
    for (int64_t n = n0; n < n1; ++n) {
      for (int64_t c = 0; c < C; ++c) {
        const float gs = gp[n * C + c];
        const Vec gv(gs), av(ap[n * C + c]);
        Vec sa(0.0f);
        for (int64_t j = 0; j < H; j += V) {
          const int64_t k = std::min(V, H - j);
          const int64_t o = c * H + j;
          const Vec wv = Vec::loadu(wp + o, k);
          const Vec x = at::vec::fmadd(av, wv, Vec::loadu(bp + o, k));
          Vec cdf, pdf;
          cdf_pdf(x, cdf, pdf);
          const Vec t = gv * Vec::loadu(op + o, k) * at::vec::fmadd(x, pdf, cdf);
          sa = at::vec::fmadd(t, wv, sa);
          at::vec::fmadd(t, av, Vec::loadu(gw + o, k)).store(gw + o, k);
          (Vec::loadu(gb + o, k) + t).store(gb + o, k);
          at::vec::fmadd(gv, x * cdf, Vec::loadu(go + o, k)).store(go + o, k);
        }
        gap[n * C + c] = at::vec::vec_reduce_all<float>([](Vec& p, Vec& q) { return p + q; }, sa);
      }
    }
  });
  return {ga, acc.select(1, 0).sum(0), acc.select(1, 1).sum(0), acc.select(1, 2).sum(0)};
}
"""


def build() -> Any:
    from torch._inductor import cpu_vec_isa
    from torch.utils.cpp_extension import load_inline

    isa = cpu_vec_isa.pick_vec_isa()
    macros = [f"-D{m}" for m in isa.build_macro()] if isa else []
    arch = isa.build_arch_flags().split() if isa else []
    return load_inline(
        name="spd_ray_ci_fn_floor_" + (str(isa).split()[0] if isa else "default"),
        cpp_sources=_SOURCE,
        functions=["mlp_ci_forward", "mlp_ci_backward"],
        extra_cflags=["-O3", *macros, *arch],
    )


def expression(act: Callable[[Tensor], Tensor]) -> Callable[..., Tensor]:
    def ci(a: Tensor, w: Tensor, b: Tensor, wo: Tensor) -> Tensor:
        return (act(a.unsqueeze(-1) * w + b) * wo).sum(-1)

    return ci


def ms_per_call(fn: Callable[[], object], reps: int) -> float:
    for _ in range(3):
        fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps * 1e3


def measure(kernel: Any, N: int, C: int, H: int, reps: int) -> tuple[dict[str, float], float]:
    """ms per forward + backward of one module each way, and the kernel's largest error relative
    to a float64 reference (output and the four gradients)."""
    a, w, b, wo = (torch.randn(N, C), torch.randn(C, H), torch.randn(C, H), torch.randn(C, H))
    g = torch.randn(N, C)
    leaves = [t.clone().requires_grad_() for t in (a, w, b, wo)]

    def fwd_bwd(fn: Callable[..., Tensor]) -> Callable[[], object]:
        return lambda: torch.autograd.grad(fn(*leaves), leaves, g)

    def fused() -> object:
        return kernel.mlp_ci_forward(a, w, b, wo), kernel.mlp_ci_backward(g, a, w, b, wo)

    times = {
        "inductor": ms_per_call(fwd_bwd(torch.compile(expression(F.gelu))), reps),
        "fused": ms_per_call(fused, reps),
        "eager": ms_per_call(fwd_bwd(expression(F.gelu)), reps),
        "relu": ms_per_call(fwd_bwd(torch.compile(expression(F.relu))), reps),
    }
    ref = [t.double().requires_grad_() for t in (a, w, b, wo)]
    z = expression(F.gelu)(*ref)
    want = [z, *torch.autograd.grad(z, ref, g.double())]
    got = [kernel.mlp_ci_forward(a, w, b, wo), *kernel.mlp_ci_backward(g, a, w, b, wo)]
    err = max(
        float((x.double() - y.detach()).abs().max() / y.detach().abs().max())
        for x, y in zip(got, want, strict=True)
    )
    return times, err


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--reps", type=positive_int, default=30)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernel = build()
    torch.manual_seed(0)
    print(
        "experiment  N x C x H     inductor ms  fused ms  eager ms  relu ms  fused/inductor  error"
    )
    for name, (N, C, H) in {"tms_5-2": (4096, 20, 16), "resid_mlp1": (2048, 100, 16)}.items():
        t, err = measure(kernel, N, C, H, args.reps)
        print(
            f"{name:11s} {f'{N}x{C}x{H}':12s}  {t['inductor']:10.2f}  {t['fused']:8.2f}  "
            f"{t['eager']:8.2f}  {t['relu']:7.2f}  {t['fused'] / t['inductor']:14.2f}  {err:.1e}"
        )


if __name__ == "__main__":
    main()
