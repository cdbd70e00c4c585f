"""Harvest accumulator throughput: tokens/s of `Accumulator.add_tokens` (in-process, no Ray, one
thread) with the exact output-mass product (`output_top_k` 0) and with top-k (16, 64, 256), and
the probability mass top-k leaves out.

    python benchmarks/harvest_output_mass.py RUN [--out ROOT] [--ci-thresholds 1e-6,0.99]

RUN is a language-model decomposition (e.g. a tiny Llama run); ROOT the output root holding its
assets. The same batches of the run's dataset (read in-process with the harvest's reader) go
through a fresh accumulator per setting, settings interleaved round by round; a row is the median
over rounds, and "x exact" the median of the per-round ratios to the exact path. "mass ms" is the
output-mass step alone per batch (the same firings and probabilities): the rest of `add_tokens`
(model forward, co-firing, input counts, example tables) is the same for every setting. Each CI
threshold is a firing regime: a short decomposition fires on far more positions than a trained
one, so a high threshold stands in for the sparse firing of a trained run.

Dropped mass: "dropped/token" is the mean over positions of 1 - (the kept top-k probabilities);
"bound" is what meta.json reports, the max over subcomponents of dropped mass / firing count (how
far, in L1, a subcomponent's mean predicted distribution over its firings can be from the exact
one).

`--large N,V,P,DENSITY` (default 2048,50257,512,0.02; "none" to skip) also times the output-mass
step alone at a GPT-2-sized vocabulary: random logits, random firing of that density.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from spd_ray.harvest.accumulate import (
    Accumulator,
    HarvestSettings,
    _sparse_rows_matmul,
    add_top_k_mass,
)
from spd_ray.harvest.pipeline import HarvestOptions, make_source
from spd_ray.harvest.sources import DocRows, LMSource
from spd_ray.loaded_run import LoadedRun, load_run
from spd_ray.targets.hf import vocab_size

KS = (0, 16, 64, 256)
Batch = tuple[Tensor, Tensor, Tensor]  # tokens [b, S], n_valid [b], row uid [b]


def _batches(run: Path, out: str | None, n: int, size: int) -> list[Batch]:
    source, _ = make_source(run, HarvestOptions(out=out))
    assert isinstance(source, LMSource), f"{run} is not a language-model run"
    rows = DocRows(source)({"id": np.arange(min(source.n_docs, 4 * n * size))})
    assert len(rows["uid"]) >= n * size, "not enough rows in the dataset for the batches asked"
    cut = [
        tuple(
            torch.tensor(rows[c][i * size : (i + 1) * size]) for c in ("tokens", "n_valid", "uid")
        )
        for i in range(n)
    ]
    return [(t, v, u) for t, v, u in cut]


def _mass_inputs(acc: Accumulator, batches: list[Batch]) -> list[tuple[Tensor, Tensor]]:
    """(firing [P, N], probabilities [P, V]) of each batch's valid positions, as add_tokens has."""
    out = []
    with torch.no_grad():
        for tokens, n_valid, _ in batches:
            logits, ci, _ = acc._ci_and_acts(tokens.long())
            valid = torch.arange(tokens.shape[1])[None, :] < n_valid[:, None]
            probs = torch.softmax(logits.float(), dim=-1)[valid][:, : acc.V]
            out.append((ci[valid] > acc.s.ci_threshold, probs))
    return out


def _mass_step(mass: Tensor, dropped: Tensor, fire: Tensor, probs: Tensor, k: int) -> None:
    """The output-mass lines of `Accumulator.add_tokens`."""
    if k == 0:
        mass += _sparse_rows_matmul(fire.T, probs).double()
    else:
        add_top_k_mass(mass, dropped, fire, probs, k)


def _timed(fn: Callable[[], None]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _ratio(xs: list[float], base: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(xs, base, strict=True))


def _run_regime(
    loaded: LoadedRun, V: int, thr: float, warm: Batch, batches: list[Batch], rounds: int
) -> None:
    def acc_for(k: int) -> Accumulator:
        return Accumulator(loaded.model, HarvestSettings(ci_threshold=thr, output_top_k=k), "lm", V)

    n_tokens = sum(int(b[1].sum()) for b in batches)
    probe = acc_for(0)
    probe.add_tokens(*warm)
    inputs = _mass_inputs(probe, batches)
    density = sum(int(f.sum()) for f, _ in inputs) / sum(f.numel() for f, _ in inputs)
    tok_s: dict[int, list[float]] = {k: [] for k in KS}
    mass_s: dict[int, list[float]] = {k: [] for k in KS}
    bound: dict[int, float] = {}
    for _ in range(rounds):
        for k in KS:
            acc = acc_for(k)

            def feed(acc: Accumulator = acc) -> None:
                for b in batches:
                    acc.add_tokens(*b)

            tok_s[k].append(n_tokens / _timed(feed))
            bound[k] = float((acc.output_dropped / acc.firing_counts.clamp(min=1)).max())

            def mass_only(acc: Accumulator = acc, k: int = k) -> None:
                for fire, probs in inputs:
                    _mass_step(acc.output_mass, acc.output_dropped, fire, probs, k)

            mass_s[k].append(_timed(mass_only) / len(inputs))
    print(f"\nci_threshold {thr:g}: firing density {density:.3f}")
    print(
        f"{'output_top_k':>12} {'tokens/s':>9} {'x exact':>8} {'mass ms':>8} {'x exact':>8} "
        f"{'dropped/token':>14} {'bound':>7}"
    )
    for k in KS:
        per_token = 0.0
        if k:
            per_token = statistics.fmean(
                float((p.sum(1) - p.topk(min(k, V), 1).values.sum(1)).mean()) for _, p in inputs
            )
        name = "0 (exact)" if k == 0 else str(k)
        print(
            f"{name:>12} {statistics.median(tok_s[k]):9.0f} {_ratio(tok_s[k], tok_s[0]):8.2f} "
            f"{1e3 * statistics.median(mass_s[k]):8.2f} {_ratio(mass_s[0], mass_s[k]):8.2f} "
            f"{per_token:14.4f} {bound[k]:7.4f}"
        )


def _run_large(spec: str, rounds: int) -> None:
    N, V, P = (int(x) for x in spec.split(",")[:3])
    density = float(spec.split(",")[3])
    g = torch.Generator().manual_seed(0)
    fire = torch.rand(P, N, generator=g) < density
    probs = torch.softmax(3 * torch.randn(P, V, generator=g), dim=-1)
    mass = torch.zeros(N, V, dtype=torch.float64)
    dropped = torch.zeros(N, dtype=torch.float64)
    times: dict[int, list[float]] = {k: [] for k in KS}
    for _ in range(rounds):
        for k in KS:

            def step(k: int = k) -> None:
                _mass_step(mass, dropped, fire, probs, k)

            times[k].append(_timed(step))
    print(
        f"\nlarge: output-mass step alone, N={N}, V={V}, P={P} positions, firing density "
        f"{density} (random), {rounds} rounds"
    )
    print(f"{'output_top_k':>12} {'mass ms':>9} {'x exact':>8}")
    for k in KS:
        name = "0 (exact)" if k == 0 else str(k)
        print(
            f"{name:>12} {1e3 * statistics.median(times[k]):9.1f} {_ratio(times[0], times[k]):8.1f}"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--out", help="output root holding the run's assets")
    ap.add_argument("--ci-thresholds", default="1e-6,0.99", help="firing regimes, comma-separated")
    ap.add_argument("--batches", type=int, default=6, help="batches per round")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--large", default="2048,50257,512,0.02", help="N,V,P,DENSITY or none")
    args = ap.parse_args()
    torch.set_num_threads(1)
    loaded = load_run(args.run, out=args.out)
    V = vocab_size(loaded.target)
    assert V is not None, "the target has no vocab_size"
    warm, *batches = _batches(args.run, args.out, args.batches + 1, args.batch_size)
    N = sum(loaded.model.C(p) for p in loaded.model.module_paths)
    print(
        f"run {args.run}: {len(loaded.model.module_paths)} modules, N={N}, V={V}; "
        f"{len(batches)} batches of {args.batch_size} rows "
        f"({sum(int(b[1].sum()) for b in batches)} tokens) per round, {args.rounds} rounds, "
        f"torch threads {torch.get_num_threads()}"
    )
    for thr in (float(t) for t in args.ci_thresholds.split(",")):
        _run_regime(loaded, V, thr, warm, batches, args.rounds)
    if args.large != "none":
        _run_large(args.large, max(1, args.rounds // 2))


if __name__ == "__main__":
    main()
