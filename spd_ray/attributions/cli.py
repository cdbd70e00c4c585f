"""`spd-ray attributions` and `spd-ray attributions-show`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from spd_ray.attributions.layout import OUTPUT
from spd_ray.errors import InputError

if TYPE_CHECKING:
    from spd_ray.attributions.store import Attribution, Attributions

OUT_HELP = "output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)"


def cmd_attributions(args: argparse.Namespace) -> int:
    from spd_ray.attributions.pipeline import (
        AttributionOptions,
        AttributionsFailedError,
        run_attributions,
    )

    opts = AttributionOptions(
        tokens=args.tokens,
        batches=args.batches,
        batch_size=args.batch_size,
        actors=args.actors,
        gpu=args.gpu,
        ci_threshold=args.ci_threshold,
        modules=args.modules,
        targets_per_backward=args.targets_per_backward,
        shard_mb=args.shard_mb,
        out=args.out,
        progress=not args.no_progress,
    )
    try:
        path = run_attributions(args.run, opts)
    except AttributionsFailedError as err:  # a lost node: one line saying what to rerun
        print(f"spd-ray attributions: failed: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    print(path)
    return 0


def cmd_attributions_show(args: argparse.Namespace) -> int:
    from spd_ray.attributions.store import Attributions

    if args.k < 1:
        raise InputError(f"-k must be at least 1, got {args.k}")
    attr = Attributions(args.run, args.out)
    print(render(attr, args.key, args.k, _token_text(attr)))
    return 0


def _token_text(attr: Attributions) -> Callable[[int], str] | None:
    """Token id -> its text with the tokenizer the attributions' data was read with (language
    models whose dataset was text); None otherwise."""
    if attr.layout.kind != "lm":
        return None
    name = attr.meta.get("source", {}).get("tokenizer")
    if name is None:
        return None
    from spd_ray.data.lm import load_tokenizer

    tok = load_tokenizer(name)
    return lambda t: str(tok.decode([t]))


def render(
    attr: Attributions, key: str, k: int, token_text: Callable[[int], str] | None = None
) -> str:
    """The top positive and negative sources into `key` (a subcomponent or an output token) and
    targets it drives (a subcomponent or an input token), token ids shown with their text."""
    layer = key.rpartition(":")[0]
    is_source = layer != OUTPUT
    is_target = layer != attr.layout.input_layer

    def label(name: str) -> str:
        kind, _, i = name.rpartition(":")
        if token_text is not None and kind in (attr.layout.input_layer, OUTPUT) and i.isdigit():
            return f"{name} {token_text(int(i))!r}"
        return name

    unit = "tokens" if attr.layout.kind == "lm" else "inputs"
    lines = [f"{label(key)}  ({attr.n_tokens} {unit}; mean grad x activation per {unit[:-1]})"]
    queries: list[tuple[str, Callable[..., list[Attribution]]]] = []
    if is_target:
        queries.append(("sources", attr.top_sources))
    if is_source:
        queries.append(("targets", attr.top_targets))
    for what, query in queries:
        for sign in ("positive", "negative"):
            found = query(key, k, sign)
            lines.append(f"  top {what} ({sign}):")
            lines += [f"    {a.value:+.4e}  {label(a.key)}" for a in found] or ["    -"]
    return "\n".join(lines)


def add_cli(sub: Any) -> None:
    p = sub.add_parser(
        "attributions",
        help="dataset attributions between subcomponents, input tokens and outputs (Ray Data)",
    )
    p.add_argument("run", help="run directory or name under the output root")
    amount = p.add_mutually_exclusive_group()
    # Numbers are checked by AttributionOptions: a bad one is one line, not argparse's usage.
    amount.add_argument(
        "--tokens",
        type=int,
        metavar="N",
        help="token positions to read (toy: inputs); default: the whole dataset (toy: 100 batches)",
    )
    amount.add_argument(
        "--batches", type=int, metavar="N", help="batches of --batch-size rows to read"
    )
    p.add_argument(
        "--batch-size", type=int, default=32, metavar="B", help="rows per forward (default 32)"
    )
    p.add_argument(
        "--actors", type=int, default=1, metavar="K", help="actors, each holding the model"
    )
    p.add_argument("--gpu", action="store_true", help="one GPU per actor")
    p.add_argument(
        "--ci-threshold",
        type=float,
        default=0.0,
        metavar="T",
        help="alive subcomponents: harvest mean CI above this (no harvest: all; default 0)",
    )
    p.add_argument(
        "--modules",
        metavar="GLOB",
        help="subcomponents of these modules only: glob(s) over module paths, comma-separated "
        "(default: all modules)",
    )
    p.add_argument(
        "--targets-per-backward",
        type=int,
        default=16,
        metavar="K",
        help="target rows per batched backward (default 16)",
    )
    p.add_argument(
        "--shard-mb",
        type=int,
        default=256,
        metavar="MB",
        help="memory of one merge task: every actor's slice of its target rows (default 256)",
    )
    p.add_argument("--out", help=OUT_HELP)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_attributions)

    q = sub.add_parser(
        "attributions-show", help="print the top sources and targets of one subcomponent or token"
    )
    q.add_argument("run", help="run directory or name under the output root")
    q.add_argument(
        "key",
        help="<module path>:<index>, wte:<token id> / input:<feature>, or output:<token id>",
    )
    q.add_argument("-k", type=int, default=10, help="entries per list (default 10)")
    q.add_argument("--out", help=OUT_HELP)
    q.set_defaults(func=cmd_attributions_show)
