"""`spd-ray autointerp` and `spd-ray labels`."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from spd_ray.argtypes import float_in, int_in, nonneg_float, positive_float, positive_int
from spd_ray.errors import InputError


def cmd_autointerp(args: argparse.Namespace) -> int:
    from spd_ray.autointerp.client import LLMSettings
    from spd_ray.autointerp.pipeline import (
        AutointerpFailedError,
        AutointerpOptions,
        run_autointerp,
    )

    if args.api_key_env is None:  # OPENAI_API_KEY when set; a local server may need none
        key = os.environ.get("OPENAI_API_KEY", "EMPTY")
    else:
        if args.api_key_env not in os.environ and not args.dry_run:
            raise InputError(f"--api-key-env {args.api_key_env}: that variable is not set")
        key = os.environ.get(args.api_key_env, "EMPTY")
    llm = LLMSettings.model_validate(
        {
            "base_url": args.base_url,
            "model": args.model,
            "api_key": key,
            "timeout_s": args.timeout,
            "max_retries": args.max_retries,
            "price_in_per_mtok": args.price_in,
            "price_out_per_mtok": args.price_out,
        }
    )
    opts = AutointerpOptions(
        llm=llm,
        actors=args.actors,
        concurrency=args.concurrency,
        rpm=args.rpm,
        budget_usd=args.budget_usd,
        limit=args.limit,
        min_density=args.min_density,
        modules=tuple(args.modules.split(",")) if args.modules else (),
        scores=tuple(s for s in args.score.split(",") if s) if args.score else (),
        dry_run=args.dry_run,
        seed=args.seed,
        progress=not args.no_progress,
    )
    try:
        store = run_autointerp(args.run, opts, out=args.out)
    except AutointerpFailedError as err:  # a lost node: one line saying what to rerun
        print(f"spd-ray autointerp: failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    if not opts.dry_run:
        print(store.dir)
    return 0


def cmd_labels(args: argparse.Namespace) -> int:
    from spd_ray.autointerp.table import labels_table
    from spd_ray.runs import resolve_run_dir

    print(labels_table(resolve_run_dir(args.run, args.out), args.model, failed=args.failed))
    return 0


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "autointerp", help="label harvested subcomponents with an LLM and score the labels"
    )
    p.add_argument("run", help="run directory or name under the output root (harvested)")
    p.add_argument(
        "--base-url", required=True, help="OpenAI-compatible API root, e.g. http://host:8000/v1"
    )
    p.add_argument("--model", required=True, help="model name as the endpoint knows it")
    p.add_argument(
        "--api-key-env",
        help="environment variable holding the API key (default: OPENAI_API_KEY when set)",
    )
    p.add_argument("--actors", type=positive_int, default=2, help="async worker actors")
    p.add_argument(
        "--concurrency", type=positive_int, default=8, help="requests in flight per actor"
    )
    p.add_argument(
        "--rpm", type=float_in(1.0), help="requests per minute (>= 1), shared by all actors"
    )
    p.add_argument(
        "--budget-usd",
        type=nonneg_float,
        help="stop sending once this store has spent this much, counting earlier runs",
    )
    p.add_argument(
        "--price-in", type=nonneg_float, default=0.0, help="USD per million prompt tokens"
    )
    p.add_argument(
        "--price-out", type=nonneg_float, default=0.0, help="USD per million completion tokens"
    )
    p.add_argument(
        "--limit", type=positive_int, help="label at most this many subcomponents (densest first)"
    )
    p.add_argument(
        "--min-density",
        type=float_in(0.0, 1.0),
        default=0.0,
        help="skip subcomponents firing less often",
    )
    p.add_argument("--modules", help="comma-separated module-path globs to label")
    p.add_argument("--score", help="comma-separated scores: detection,fuzzing,intruder")
    p.add_argument(
        "--timeout", type=positive_float, default=60.0, help="per-request timeout in seconds"
    )
    p.add_argument("--max-retries", type=int_in(0, 100), default=6, help="retries of one request")
    p.add_argument("--seed", type=int, default=0, help="seeds the score trials")
    p.add_argument(
        "--dry-run",
        type=positive_int,
        nargs="?",
        const=3,
        default=0,
        metavar="N",
        help="print the first N prompts (default 3) and send nothing",
    )
    p.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_autointerp)

    q = sub.add_parser("labels", help="print a run's labels and scores")
    q.add_argument("run", help="run directory or name under the output root")
    q.add_argument("--model", help="labelling model (default: the only or latest one)")
    q.add_argument("--failed", action="store_true", help="also list failed subcomponents")
    q.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    q.set_defaults(func=cmd_labels)
