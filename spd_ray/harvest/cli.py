"""`spd-ray harvest` and `spd-ray harvest-show`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from spd_ray.argtypes import int_in, nonneg_float, nonneg_int, positive_int
from spd_ray.harvest.accumulate import OUTPUT_TOP_K, HarvestSettings


def cmd_harvest(args: argparse.Namespace) -> int:
    from spd_ray.harvest.pipeline import HarvestFailedError, HarvestOptions, run_harvest

    settings = HarvestSettings(
        ci_threshold=args.ci_threshold,
        top_k=args.top_k,
        reservoir=args.reservoir,
        context=args.context,
        seed=args.seed,
        output_top_k=args.output_top_k,
    )
    opts = HarvestOptions(
        dataset=args.dataset,
        split=args.split,
        column=args.column,
        tokens=args.tokens,
        batches=args.batches,
        batch_size=args.batch_size,
        actors=args.actors,
        gpu=args.gpu,
        settings=settings,
        out=args.out,
        progress=not args.no_progress,
    )
    try:
        path = run_harvest(args.run, opts)
    except HarvestFailedError as err:  # a lost node: one line saying what to rerun
        print(f"spd-ray harvest: failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_harvest_show(args: argparse.Namespace) -> int:
    from spd_ray.harvest.show import render_component
    from spd_ray.harvest.store import Harvest

    h = Harvest(_run_path(args.run, args.out))
    print(render_component(h, args.component, n_examples=args.examples, k=args.k))
    return 0


def _run_path(run: str, out: str | None) -> Any:
    from spd_ray.runs import resolve_run_dir

    return resolve_run_dir(run, out)


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "harvest",
        help="component statistics and activation examples over a dataset (Ray Data)",
    )
    p.add_argument("run", help="run directory or name under the output root")
    p.add_argument(
        "--dataset",
        help="language models: dataset name or path (default: the run's); toy runs: a "
        "data_generation_type (e.g. exactly_one_active)",
    )
    p.add_argument("--split", help="dataset split (default: the run's training split)")
    p.add_argument("--column", help="text or token column (default: the run's)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--tokens", type=positive_int, help="token positions to read (toy: inputs)")
    amount.add_argument("--batches", type=positive_int, help="batches of --batch-size rows to read")
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="rows per forward (default 32)"
    )
    p.add_argument(
        "--actors", type=positive_int, default=1, help="harvest actors, each holding the model"
    )
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument(
        "--ci-threshold",
        type=nonneg_float,
        default=1e-6,
        help="a subcomponent fires where CI > this",
    )
    p.add_argument(
        "--top-k", type=nonneg_int, default=20, help="top-activating examples kept per subcomponent"
    )
    p.add_argument(
        "--reservoir", type=nonneg_int, default=100, help="uniform examples kept per subcomponent"
    )
    p.add_argument(
        "--context", type=int_in(0, 1024), default=10, help="tokens each side of a firing (0-1024)"
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the reservoir sampling")
    p.add_argument(
        "--output-top-k",
        type=nonneg_int,
        default=OUTPUT_TOP_K,
        help="language models: predicted tokens each firing position adds to a subcomponent's "
        f"output mass, its most probable ones (0: all, exact; default {OUTPUT_TOP_K}); the mass "
        "left out is reported in meta.json",
    )
    p.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_harvest)

    q = sub.add_parser("harvest-show", help="print one subcomponent's harvest summary")
    q.add_argument("run", help="run directory or name under the output root")
    q.add_argument("component", help="<module path>:<index>, e.g. model.layers.0.mlp.down_proj:17")
    q.add_argument("--examples", type=nonneg_int, default=5, help="examples of each kind to print")
    q.add_argument("-k", type=positive_int, default=8, help="entries per ranked list")
    q.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    q.set_defaults(func=cmd_harvest_show)
