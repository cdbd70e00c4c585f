"""`spd-ray clustering` and `spd-ray cluster-mapping`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from spd_ray.argtypes import float_in, nonneg_float, positive_float, positive_int


def cmd_clustering(args: argparse.Namespace) -> int:
    from spd_ray.clustering.ensemble import ClusteringOptions, run_clustering
    from spd_ray.clustering.merge import MergeSettings

    settings = MergeSettings(
        alpha=args.alpha,
        iters=args.iters,
        sampler=args.sampler,
        threshold=args.threshold,
        temperature=args.temperature,
        activation_threshold=args.activation_threshold,
        filter_dead_threshold=args.dead_threshold,
    )
    opts = ClusteringOptions(
        runs=args.runs,
        batch_size=args.batch_size,
        seed=args.seed,
        modules=args.modules,
        merge=settings,
        distances=tuple(m.strip() for m in args.distances.split(",") if m.strip()),
        name=args.name,
        gpu=args.gpu,
        out=args.out,
        progress=not args.no_progress,
        fresh=args.fresh,
    )
    if args.tune is not None:
        from spd_ray.clustering.search import search_merge

        result = search_merge(args.run, opts, args.tune, args.trials, args.tune_k)
        print(result)
        return 0
    print(run_clustering(args.run, opts))
    return 0


def cmd_cluster_mapping(args: argparse.Namespace) -> int:
    from spd_ray.clustering.mapping import cluster_mapping

    mapping, path = cluster_mapping(
        Path(args.clustering), k=args.k, iteration=args.iter, member=args.member
    )
    print(json.dumps(mapping, indent=2))
    print(f"written to {path}", file=sys.stderr)
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "clustering",
        help="merge subcomponents into components: an ensemble of MDL merges on Ray",
    )
    p.add_argument("run", help="run directory or name under the output root")
    p.add_argument("--runs", type=positive_int, default=4, help="ensemble members (default 4)")
    p.add_argument(
        "--iters", type=positive_int, help="merges per member (default: down to one group)"
    )
    p.add_argument(
        "--alpha", type=nonneg_float, default=1.0, help="weight of the group-size term (default 1)"
    )
    p.add_argument(
        "--threshold",
        type=float_in(0.0, 1.0),
        default=0.05,
        help="range sampler: draw among pairs within this fraction of the cost range of the "
        "cheapest (default 0.05)",
    )
    p.add_argument("--sampler", choices=["range", "mcmc"], default="range")
    p.add_argument(
        "--temperature", type=positive_float, default=1.0, help="mcmc sampler temperature"
    )
    p.add_argument(
        "--activation-threshold",
        type=float_in(0.0, 1.0, lo_open=True),
        default=0.01,
        help="a subcomponent fires where its CI is above this (default 0.01)",
    )
    p.add_argument(
        "--dead-threshold",
        type=float_in(0.0, 1.0),
        default=0.001,
        help="drop subcomponents whose largest CI on the batch is below this (default 0.001)",
    )
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=1024,
        help="inputs (sequences for language models) in each member's batch (default 1024)",
    )
    p.add_argument("--modules", help="glob(s) over module paths, comma-separated (default: all)")
    p.add_argument(
        "--distances",
        default="perm_invariant_hamming",
        help="comma-separated: perm_invariant_hamming, matching_dist",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds every member's data and merge")
    p.add_argument("--gpu", action="store_true", help="one GPU per member")
    p.add_argument("--name", default="default", help="clustering name (folder under clustering/)")
    p.add_argument(
        "--fresh", action="store_true", help="replace a clustering of this name made otherwise"
    )
    p.add_argument(
        "--tune",
        metavar="PARAMS",
        help="search the merge settings instead (comma-separated: alpha, threshold, "
        "temperature) with Ray Tune + Optuna, two objectives: stability and final MDL",
    )
    p.add_argument("--trials", type=positive_int, default=8, help="--tune: trials (default 8)")
    p.add_argument(
        "--tune-k",
        type=positive_int,
        help="--tune: the number of groups at which stability and MDL are measured "
        "(default: a quarter of the subcomponents)",
    )
    p.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_clustering)

    q = sub.add_parser(
        "cluster-mapping", help="write and print a clustering's subcomponent -> group mapping"
    )
    q.add_argument("clustering", help="the clustering folder: <run>/clustering/<name>")
    which = q.add_mutually_exclusive_group(required=True)
    which.add_argument("--k", type=positive_int, help="the iteration with K groups")
    which.add_argument("--iter", type=int, help="iteration T (0: before any merge)")
    q.add_argument("--member", type=int, default=0, help="ensemble member (default 0)")
    q.set_defaults(func=cmd_cluster_mapping)
