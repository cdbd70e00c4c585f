"""`spd-ray compare` and `spd-ray plot-activations`."""

from __future__ import annotations

import argparse
from typing import Any

from spd_ray.argtypes import float_in, nonneg_float, nonneg_int, positive_int


def cmd_compare(args: argparse.Namespace) -> int:
    from spd_ray.analysis.compare import COMPARISON_FILE, compare_runs, format_table

    result = compare_runs(
        args.run_a,
        args.run_b,
        out=args.out,
        density_threshold=args.density_threshold,
        n_batches=args.batches,
        batch_size=args.batch_size,
        seed=args.seed,
        ci_threshold=args.ci_threshold,
    )
    print(format_table(result))
    print(f"{result['run_a']}/{COMPARISON_FILE}")
    return 0


def cmd_plot_activations(args: argparse.Namespace) -> int:
    from spd_ray.analysis.activation_plots import plot_activations

    paths = plot_activations(
        args.run,
        out=args.out,
        ci_threshold=args.ci_threshold,
        n_batches=args.batches,
        batch_size=args.batch_size,
        seed=args.seed,
    )
    for path in paths:
        print(path)
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "compare",
        help="best |cos| of each firing subcomponent of RUN_A against RUN_B's, per module",
    )
    p.add_argument("run_a", help="run directory or name under the output root (its data is read)")
    p.add_argument("run_b", help="run to compare against (same target modules)")
    p.add_argument(
        "--density-threshold",
        type=float_in(0.0, 1.0),
        default=0.001,
        help="keep A's subcomponents firing on more than this fraction of inputs (default 0.001)",
    )
    p.add_argument(
        "--ci-threshold",
        type=nonneg_float,
        default=0.0,
        help="a subcomponent fires where its CI > this (default 0)",
    )
    p.add_argument(
        "--batches", type=positive_int, default=5, help="batches of A's data (default 5)"
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="rows per batch (default 32)"
    )
    p.add_argument("--seed", type=nonneg_int, default=0, help="seeds the data stream (default 0)")
    p.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    p.set_defaults(func=cmd_compare)

    q = sub.add_parser(
        "plot-activations",
        help="per module, scatter of each subcomponent's normalised activations where it fires",
    )
    q.add_argument("run", help="run directory or name under the output root")
    q.add_argument(
        "--ci-threshold",
        type=nonneg_float,
        default=0.1,
        help="plot the inputs where CI > this (default 0.1)",
    )
    q.add_argument(
        "--batches", type=positive_int, default=10, help="batches of the run's data (default 10)"
    )
    q.add_argument(
        "--batch-size", type=positive_int, default=64, help="rows per batch (default 64)"
    )
    q.add_argument("--seed", type=nonneg_int, default=0, help="seeds the data stream (default 0)")
    q.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    q.set_defaults(func=cmd_plot_activations)
