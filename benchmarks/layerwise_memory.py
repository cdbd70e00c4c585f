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

Each (layers, chunking) pair runs in a fresh process (glibc's mmap threshold fixed at 64 KiB, so
freed tensors leave the RSS): build the model and batch, then reset the peak-RSS mark (Linux
`clear_refs`), run one step and read `ru_maxrss`. Column (a) is that peak above the RSS after the
build, the whole step; (b) is (a) minus (a) of `no-recon` (the same step without a recon loss) at
that depth: the recon loss's own memory. Chunkings: `none` (every copy in one forward), `1` (one
copy per forward), and `budget` (`masked_forward_budget_mb`: the copies per forward follow from the
budget and the measured bytes one copy keeps for backward, `copy MB`); and for reference
`one-copy`, the same step with `StochasticReconLoss` (one copy of the batch, every module masked)
in place of the layerwise loss. The default budget chunks every depth from 2 to 8 layers.
"""

from __future__ import annotations

import argparse
import json
import os
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


RECON_LOSS = {
    "layerwise": "StochasticReconLayerwiseLoss",
    "one-copy": "StochasticReconLoss",
    "no-recon": None,
}


def child(
    layers: int,
    chunk: int | None,
    budget_mb: float | None,
    batch_size: int,
    seq: int,
    threads: int,
    recon: str,
) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from spd_ray.config import config_from_dict, read_config_dict
    from spd_ray.core.masks import Noise
    from spd_ray.core.recon import measured_copy_bytes
    from spd_ray.core.step import autocast, build_component_model, train_step_losses
    from spd_ray.targets.tiny_lm import LLAMA_CONFIG, VOCAB_SIZE

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    data = read_config_dict(REGISTRY_CONFIG)
    loss = RECON_LOSS[recon]
    data["loss_metric_configs"] = [
        cfg for cfg in data["loss_metric_configs"] if "Subset" not in cfg["classname"]
    ] + ([] if loss is None else [{"classname": loss, "coeff": 1.0}])
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

    base = _rss_mb()
    _reset_peak()
    start = time.perf_counter()
    with autocast(config, device):
        total, _ = train_step_losses(config, model, batch, noise, 0.0)
    total.backward()
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    measured = measured_copy_bytes(model)  # what the budget sized the chunks from (one loss)
    assert len(measured) == (budget_mb is not None), measured
    if measured:
        assert budget_mb is not None
        chunk = max(1, int(budget_mb * 2**20) // measured[0])
    copies = {"layerwise": len(model.module_paths), "one-copy": 1, "no-recon": 0}[recon]
    result = {
        "layers": layers,
        "modules": len(model.module_paths),
        "copies": copies * config.n_mask_samples,
        "chunk": chunk,
        "copy_mb": measured[0] / 2**20 if measured else None,
        "base_mb": base,
        "peak_above_base_mb": peak - base,
        "seconds": seconds,
        "loss": total.item(),
    }
    print(json.dumps(result))


def run_child(
    layers: int, chunk: int | None, budget_mb: float | None, recon: str, args: argparse.Namespace
) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", "--layers", str(layers), "--recon", recon]
    cmd += ["--batch", str(args.batch), "--seq", str(args.seq), "--threads", str(args.threads)]
    if chunk is not None:
        cmd += ["--chunk", str(chunk)]
    if budget_mb is not None:
        cmd += ["--budget-mode", "--budget-mb", str(budget_mb)]
    # glibc raises its mmap threshold as big blocks are freed, after which freed tensors stay in
    # the heap and the RSS high-water mark measures fragmentation; a fixed threshold returns
    # every block of 64 KiB or more to the OS on free, so RSS follows the live tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT, env=env).stdout
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
    parser.add_argument("--recon", default="layerwise", choices=RECON_LOSS, help=argparse.SUPPRESS)
    parser.add_argument("--budget-mode", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        budget = args.budget_mb if args.chunk is None and args.budget_mode else None
        child(int(args.layers), args.chunk, budget, args.batch, args.seq, args.threads, args.recon)
        return

    layer_counts = [int(x) for x in args.layers.split(",")]
    # mode: (recon loss, copies per forward, budget MB); no-recon first, as the others' reference.
    modes: dict[str, tuple[str, int | None, float | None]] = {
        "no-recon": ("no-recon", None, None),
        "one-copy": ("one-copy", None, None),
        "none": ("layerwise", None, None),
        "1": ("layerwise", 1, None),
        "budget": ("layerwise", None, args.budget_mb),
    }
    print(
        f"batch {args.batch} x {args.seq} tokens, {args.threads} thread(s), bf16 autocast, "
        f"budget {args.budget_mb:g} MB; (a) peak RSS above the post-build RSS, (b) (a) minus "
        "no-recon's (a) at that depth: the recon loss's own memory"
    )
    header = f"{'layers':>6} {'modules':>7} {'copies':>6} {'chunking':>8} {'chunk':>5} "
    print(header + f"{'copy MB':>7} {'base MB':>7} {'(a) MB':>6} {'(b) MB':>6} {'step s':>6}")
    peaks: dict[str, dict[int, float]] = {mode: {} for mode in modes}
    own: dict[str, dict[int, float]] = {mode: {} for mode in modes}
    for layers in layer_counts:
        for mode, (recon, chunk, budget) in modes.items():
            r = run_child(layers, chunk, budget, recon, args)
            peaks[mode][layers] = r["peak_above_base_mb"]
            own[mode][layers] = r["peak_above_base_mb"] - peaks["no-recon"][layers]
            copy_mb = "-" if r["copy_mb"] is None else f"{r['copy_mb']:.1f}"
            print(
                f"{r['layers']:>6} {r['modules']:>7} {r['copies']:>6} {mode:>8} "
                f"{str(r['chunk']):>5} {copy_mb:>7} {r['base_mb']:>7.0f} "
                f"{r['peak_above_base_mb']:>6.0f} {own[mode][layers]:>6.0f} {r['seconds']:>6.2f}",
                flush=True,
            )
    lo, hi = min(layer_counts), max(layer_counts)
    for mode in modes:
        a = peaks[mode][hi] / peaks[mode][lo]
        b = "" if mode == "no-recon" else f", (b) {own[mode][hi] / own[mode][lo]:.2f}x"
        print(f"{hi} vs {lo} layers, {mode}: (a) {a:.2f}x{b}")


if __name__ == "__main__":
    main()
