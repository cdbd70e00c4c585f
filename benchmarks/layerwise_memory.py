"""Peak memory of a layerwise-loss training step against the number of decomposed modules, with and
without `masked_copies_per_forward`.

    python benchmarks/layerwise_memory.py [--layers 2,4,8] [--batch 4] [--seq 64] [--threads 1]
        [--budget-mb 64]

The target is a Llama with the registry `tiny_llama`'s sizes (d 128, MLP 341, 4 heads, 2 KV heads,
vocab 4096) and `--layers` layers, built locally with random weights (no download); every layer's 7
linear projections are decomposed (`experiments/tiny_llama.yaml`'s module_info and C), so a
layerwise loss stacks 7 x layers copies of the batch. The step is the project's own: the
registry config with its subset loss swapped for `StochasticReconLayerwiseLoss`, `train_step_losses`
under its autocast, then backward.

Each (layers, chunking) pair runs in a fresh process: build the model and batch, then reset the
peak-RSS mark (Linux `clear_refs`), run one step and read `ru_maxrss`. The table shows the peak
above the RSS after the build. Chunkings: `none` (every copy in one forward), `1` (one copy per
forward), and `budget` (`masked_forward_budget_mb`: the copies per forward follow from the
budget and each step's estimate of one copy's activations); and for reference
`one-copy`, the same step with `StochasticReconLoss` (one copy of the batch, every module masked)
in place of the layerwise loss: what a step at that depth needs whatever the loss.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
REGISTRY_CONFIG = ROOT / "experiments" / "tiny_llama.yaml"


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _reset_peak() -> None:
    """Set the peak-RSS mark to the current RSS, so ru_maxrss measures from here on (Linux)."""
    Path("/proc/self/clear_refs").write_text("5")


def child(
    layers: int,
    chunk: int | None,
    budget_mb: float | None,
    batch_size: int,
    seq: int,
    threads: int,
    one_copy: bool,
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spd_ray.config import config_from_dict, read_config_dict
    from spd_ray.core.masks import Noise
    from spd_ray.core.recon import chunk_size
    from spd_ray.core.step import autocast, build_component_model, step_inputs, train_step_losses
    from spd_ray.targets.tiny_lm import LLAMA_CONFIG, VOCAB_SIZE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = read_config_dict(REGISTRY_CONFIG)
    data["loss_metric_configs"] = [
        loss for loss in data["loss_metric_configs"] if "Subset" not in loss["classname"]
    ] + [{"classname": f"StochasticRecon{'' if one_copy else 'Layerwise'}Loss", "coeff": 1.0}]
    data["masked_copies_per_forward"] = chunk
    data["masked_forward_budget_mb"] = budget_mb
    config = config_from_dict(data, str(REGISTRY_CONFIG))
    arch = {**LLAMA_CONFIG, "num_hidden_layers": layers, "vocab_size": VOCAB_SIZE}
    target = LlamaForCausalLM(LlamaConfig(**arch)).eval()
    target.requires_grad_(False)
    model = build_component_model(config, target)
    batch = torch.randint(0, VOCAB_SIZE, (batch_size, seq))
    noise = Noise(torch.Generator().manual_seed(0))
    device = torch.device("cpu")
    with torch.no_grad():
        chunk = chunk_size(step_inputs(config, model, batch, noise, 0.0))  # what the step will use
    noise = Noise(torch.Generator().manual_seed(0))

    base = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    with autocast(config, device):
        total, _ = train_step_losses(config, model, batch, noise, 0.0)
    total.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    copies = (1 if one_copy else len(model.module_paths)) * config.n_mask_samples
    result = {
        "layers": layers,
        "modules": len(model.module_paths),
        "copies": copies,
        "chunk": chunk,
        "base_mb": base,
        "peak_above_base_mb": peak - base,
        "seconds": seconds,
        "loss": total.item(),
    }
    print(json.dumps(result))


def run_child(
    layers: int,
    chunk: int | None,
    budget_mb: float | None,
    one_copy: bool,
    args: argparse.Namespace,
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--layers", str(layers)]
    cmd += ["--one-copy"] if one_copy else []
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    if budget_mb is not None:
        cmd += ["--budget-mode", "--budget-mb", str(budget_mb)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])  # type: ignore[no-any-return]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", default="2,4,8", help="Comma-separated layer counts.")
    parser.add_argument("--batch", type=int, default=4, help="Sequences per batch.")
    parser.add_argument("--seq", type=int, default=64, help="Tokens per sequence.")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process.")
    parser.add_argument("--budget-mb", type=float, default=64.0, help="The budget mode's MB.")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--one-copy", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        budget = args.budget_mb if args.chunk is None and args.budget_mode else None
        child(
            int(args.layers), args.chunk, budget, args.batch, args.seq, args.threads, args.one_copy
        )
        return

    layer_counts = [int(x) for x in args.layers.split(",")]
    modes: dict[str, Any] = {
        "none": lambda n: None,
        "1": lambda n: 1,
        "budget": lambda n: None,
        "one-copy": lambda n: None,
    }
    print(
        f"batch {args.batch} x {args.seq} tokens, {args.threads} thread(s), bf16 autocast, "
        f"budget {args.budget_mb:g} MB"
    )
    header = f"{'layers':>6} {'modules':>7} {'copies':>6} {'chunking':>8} {'chunk':>5} "
    print(header + f"{'base MB':>8} {'peak-base MB':>12} {'step s':>7}")
    peaks: dict[str, dict[int, float]] = {mode: {} for mode in modes}
    for layers in layer_counts:
        for mode, chunk_of in modes.items():
            budget = args.budget_mb if mode == "budget" else None
            r = run_child(layers, chunk_of(layers), budget, mode == "one-copy", args)
            peaks[mode][layers] = r["peak_above_base_mb"]
            print(
                f"{r['layers']:>6} {r['modules']:>7} {r['copies']:>6} {mode:>8} "
                f"{str(r['chunk']):>5} {r['base_mb']:>8.0f} {r['peak_above_base_mb']:>12.0f} "
                f"{r['seconds']:>7.2f}",
                flush=True,
            )
    lo, hi = min(layer_counts), max(layer_counts)
    for mode, by_layers in peaks.items():
        ratio = by_layers[hi] / by_layers[lo]
        print(f"peak above base, {hi} vs {lo} layers, chunking {mode}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
