"""The `spd-ray` command: one small function per subcommand.

Every subcommand exits 0 on success and non-zero with a one-line reason on failure; `run` prints the
run directory on the last line of standard output.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from spd_ray.argtypes import MAX_FAILURES_LIMIT, int_in, nonneg_int, positive_float, positive_int
from spd_ray.config import Config
from spd_ray.errors import InputError, user_errors


def _add_overrides(p: argparse.ArgumentParser, help: str) -> None:
    """`--set KEY=VALUE` (repeatable) into `args.overrides`."""
    p.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "target",
        nargs="?",
        help="registry name (see `spd-ray list`) or a YAML/JSON config path; "
        "`spd-ray run` also takes several, comma-separated",
    )
    p.add_argument("--steps", type=positive_int, help="override the number of training steps")
    _add_overrides(
        p,
        "override a config key, e.g. --set seed=1 or "
        "--set loss_metric_configs.ImportanceMinimalityLoss.coeff=1e-3 (value parsed as YAML)",
    )
    p.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")


def load_target_config(target: str, overrides: list[str], steps: int | None) -> tuple[str, Config]:
    from spd_ray.registry import load_experiment

    extra = [f"steps={steps}"] if steps is not None else []
    return load_experiment(target, [*overrides, *extra])


def cmd_run(args: argparse.Namespace) -> int:
    from spd_ray.train.run import default_run_name, run_experiment

    targets = _run_targets(args)
    if len(targets) > 1:
        return _run_several(args, targets)
    experiment, config = load_target_config(targets[0], args.overrides, args.steps)
    name = default_run_name(experiment) if args.name is None else args.name
    outcome = run_experiment(config, name=name, in_process=args.in_process, **_launch_options(args))
    if outcome.already_finished:
        print(f"run {name} already finished at step {config.steps}", file=sys.stderr)
    elif outcome.resumed_from:
        print(f"resumed {name} from step {outcome.resumed_from}", file=sys.stderr)
    _print_headline(outcome.metrics)
    print(outcome.run_dir)
    return 0


def _launch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The `spd-ray run` flags that one run and several runs take alike."""
    return {
        "out": args.out,
        "fresh": args.fresh,
        "workers": args.workers,
        "use_gpu": args.gpu,
        "cpus_per_worker": args.cpus_per_worker,
        "max_failures": args.max_failures,
        "placement": args.placement,
        "wait_timeout_s": args.wait_timeout,
    }


def _run_targets(args: argparse.Namespace) -> list[str]:
    from spd_ray.registry import registry

    if args.all:
        if args.target:
            raise InputError("give either TARGET or --all, not both")
        return list(registry())
    if not args.target:
        raise InputError("TARGET is required (a registry name, a config path, or a,b,c), or --all")
    targets = [t.strip() for t in args.target.split(",") if t.strip()]
    if len(set(targets)) != len(targets):
        raise InputError(f"TARGET {args.target!r} names a target twice")
    return targets


def _run_several(args: argparse.Namespace, targets: list[str]) -> int:
    """One Ray Train run per target, concurrently as resources allow; a table of outcomes."""
    from spd_ray.train.many import format_outcomes, run_many
    from spd_ray.train.run import default_run_name

    if args.in_process:
        raise InputError("--in-process runs one target; several targets run on Ray")
    jobs = []
    for target in targets:
        experiment, config = load_target_config(target, args.overrides, args.steps)
        # --name is a prefix here: <name>-<experiment> keeps every run resumable by rerunning.
        name = default_run_name(experiment) if args.name is None else f"{args.name}-{experiment}"
        jobs.append((name, config))
    outcomes = run_many(jobs, **_launch_options(args))
    print(format_outcomes(outcomes))
    return 1 if any(o.error is not None for o in outcomes) else 0


def _print_headline(metrics: dict[str, float]) -> None:
    keys = [
        k
        for k in metrics
        if k.split("/")[1]
        in ("loss", "mmcs", "ml2r", "mmcs_filtered", "ml2r_filtered", "target_solution_error")
    ]
    for key in keys:
        print(f"  {key} = {metrics[key]:.6g}", file=sys.stderr)


def cmd_sweep(args: argparse.Namespace) -> int:
    from spd_ray.sweep.results import parse_objective
    from spd_ray.sweep.tune_driver import run_sweep, sweep_status

    if not args.target or "," in args.target:
        raise InputError("spd-ray sweep takes one TARGET (a registry name or a config path)")
    outcome = run_sweep(
        args.target,
        args.space,
        name=args.name,
        out=args.out,
        trials=args.trials,
        concurrent=args.concurrent,
        workers_per_trial=args.workers_per_trial,
        gpu=args.gpu,
        steps=args.steps,
        overrides=args.overrides,
        objectives=[parse_objective(o) for o in args.objective] or None,
        scheduler=args.scheduler,
        seed=args.seed,
        wait_timeout_s=args.wait_timeout,
    )
    print(sweep_status(outcome.sweep_dir.name, outcome.sweep_dir.parent), file=sys.stderr)
    if not outcome.complete:
        print(
            f"sweep {outcome.sweep_dir.name} is not complete; rerun the same command to go on",
            file=sys.stderr,
        )
    print(outcome.sweep_dir)
    return 0 if outcome.complete else 1


def cmd_sweep_status(args: argparse.Namespace) -> int:
    from spd_ray.sweep.tune_driver import sweep_status

    print(sweep_status(args.name, args.out))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from spd_ray.registry import describe, registry

    entries = registry()
    width = max((len(n) for n in entries), default=0)
    for name, path in entries.items():
        print(f"{name:<{width}}  {describe(path)}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from spd_ray.bench import BenchOptions, run_bench

    run_bench(
        BenchOptions(
            experiments=[e for e in args.experiments.split(",") if e],
            rounds=args.rounds,
            steps=args.steps,
            warmup=args.warmup,
            threads=args.threads,
            ray=args.ray,
            gpu=args.gpu,
            memory=args.memory,
            overrides=args.overrides,
            yardstick=args.yardstick,
            no_yardstick=args.no_yardstick,
            results=args.results,
            peak_tflops=args.peak_tflops,
        )
    )
    return 0


def _wait_timeout_arg(p: argparse.ArgumentParser) -> None:
    from spd_ray.ray_session import DEFAULT_WAIT_TIMEOUT_S

    p.add_argument(
        "--wait-timeout",
        type=positive_float,
        default=DEFAULT_WAIT_TIMEOUT_S,
        metavar="S",
        help="seconds to wait for an autoscaler to add the nodes the workers need "
        f"(default {DEFAULT_WAIT_TIMEOUT_S:g})",
    )


def _add_run(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("run", help="run one decomposition")
    _common_run_args(p)
    p.add_argument(
        "--name", help="run name (default: <experiment>-<timestamp>); reuse it to resume"
    )
    p.add_argument("--fresh", action="store_true", help="delete an existing run of that name first")
    p.add_argument(
        "--all", action="store_true", help="run every registry experiment (one Ray Train run each)"
    )
    p.add_argument(
        "--workers", type=positive_int, default=1, help="data-parallel Ray Train workers"
    )
    p.add_argument("--gpu", action="store_true", help="one GPU per worker (NCCL)")
    p.add_argument(
        "--cpus-per-worker",
        type=positive_float,
        help="CPUs (and torch threads) per worker (default: a local Ray's CPUs split evenly)",
    )
    p.add_argument(
        "--max-failures",
        type=int_in(0, MAX_FAILURES_LIMIT),
        default=3,
        help=f"worker-group restarts from the last checkpoint (0-{MAX_FAILURES_LIMIT})",
    )
    p.add_argument(
        "--placement",
        choices=["pack", "spread"],
        help="where the workers go: pack onto few nodes or spread over many "
        "(default: Ray Train's, pack)",
    )
    _wait_timeout_arg(p)
    p.add_argument(
        "--in-process",
        action="store_true",
        help="run the loop in this process without Ray (1 worker, CPU or the first GPU)",
    )
    p.set_defaults(func=cmd_run)


def _add_sweep(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("sweep", help="search hyperparameters with Ray Tune + Optuna")
    _common_run_args(p)
    p.add_argument("--space", required=True, help="search-space YAML (see experiments/sweeps/)")
    p.add_argument(
        "--trials", type=positive_int, default=8, help="trials to sample (a grid runs them all)"
    )
    p.add_argument(
        "--concurrent", type=positive_int, help="trials at once (default: as CPUs allow)"
    )
    p.add_argument(
        "--workers-per-trial", type=positive_int, default=1, help="Ray Train workers per trial"
    )
    p.add_argument("--gpu", action="store_true", help="one GPU per trial worker")
    p.add_argument(
        "--objective",
        action="append",
        default=[],
        metavar="METRIC:min|max",
        help="repeatable; default: eval/loss/StochasticReconLoss:min and eval/l0/total:min",
    )
    p.add_argument("--scheduler", choices=["asha", "none"], default="none")
    p.add_argument("--seed", type=nonneg_int, default=0, help="sampler seed")
    _wait_timeout_arg(p)
    p.add_argument(
        "--name", help="sweep name (default: sweep-<experiment>-<timestamp>); reuse it to resume"
    )
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("sweep-status", help="print a sweep's results table")
    p.add_argument("name", help="sweep name under the output root")
    p.add_argument("--out", help="output root (default: $SPD_RAY_OUT, else ~/spd_ray_out)")
    p.set_defaults(func=cmd_sweep_status)


def _add_list(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("list", help="list the registry")
    p.set_defaults(func=cmd_list)


def _add_bench(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "bench",
        help="time the training step of registry experiments against a yardstick",
        description="Rounds of: the yardstick script, then each experiment in a fresh process. "
        "Prints medians over rounds (steps/s, samples/s, tokens/s, p90 step, peak memory, "
        "FLOPs per step, MFU with --gpu) and the ratio to the yardstick; appends one JSON line "
        "per experiment to the results file.",
    )
    p.add_argument(
        "--experiments", default="tms_5-2,resid_mlp1", help="comma-separated registry experiments"
    )
    p.add_argument(
        "--rounds",
        type=positive_int,
        default=1,
        help="alternating rounds (yardstick, then each experiment), medians over them; default 1, "
        "since 3 rounds of the defaults take well over 2 min on 2 cores (each child compiles "
        "its step): ask for 3 for numbers to quote",
    )
    p.add_argument("--steps", type=positive_int, default=60, help="timed steps per experiment")
    p.add_argument(
        "--warmup", type=positive_int, default=10, help="untimed steps first (the first compiles)"
    )
    p.add_argument(
        "--threads",
        type=nonneg_int,
        default=0,
        help="torch threads, yardstick's too (0: all cores)",
    )
    p.add_argument(
        "--ray", action="store_true", help="time the loop inside a Ray Train worker (local Ray)"
    )
    p.add_argument(
        "--gpu",
        action="store_true",
        help="on CUDA, bf16 autocast and the compiled step where the config has `compile`; "
        "reports MFU",
    )
    p.add_argument(
        "--peak-tflops",
        type=positive_float,
        help="the GPU's dense bf16 peak for MFU (known: H100, H200, A100)",
    )
    p.add_argument(
        "--memory",
        action="store_true",
        help="also print memory once the model is built and the steps' peak above it "
        "(always in the results file)",
    )
    _add_overrides(p, "config override for every experiment (repeatable), e.g. --set compile=false")
    yard = p.add_mutually_exclusive_group()
    yard.add_argument(
        "--yardstick",
        metavar="PATH",
        help="yardstick script run as `python PATH THREADS` (default: $SPD_RAY_YARDSTICK, else "
        "../shared/bench/lean_tms_step.py beside the checkout, if there)",
    )
    yard.add_argument("--no-yardstick", action="store_true", help="no yardstick, no ratio")
    p.add_argument(
        "--results",
        metavar="PATH",
        help="JSON-lines file to append to (default: benchmarks/results.jsonl in a checkout, "
        "else <output root>/bench/results.jsonl)",
    )
    p.set_defaults(func=cmd_bench)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="spd-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_sweep(sub)  # sweep, sweep-status

    from spd_ray.analysis.cli import add_cli as add_analysis_cli
    from spd_ray.app.cli import add_cli as add_app_cli
    from spd_ray.attributions.cli import add_cli as add_attributions_cli
    from spd_ray.autointerp.cli import add_cli as add_autointerp_cli
    from spd_ray.clustering.cli import add_cli as add_clustering_cli
    from spd_ray.harvest.cli import add_cli as add_harvest_cli
    from spd_ray.targets.tiny_lm import add_cli as add_tiny_lm_cli

    add_tiny_lm_cli(sub)  # make-tiny-lm, pretrain
    add_harvest_cli(sub)  # harvest, harvest-show
    add_autointerp_cli(sub)  # autointerp, labels
    add_clustering_cli(sub)  # clustering, cluster-mapping
    add_analysis_cli(sub)  # compare, plot-activations
    add_attributions_cli(sub)  # attributions, attributions-show
    add_app_cli(sub)  # app (the viewer)
    _add_list(sub)
    _add_bench(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    from spd_ray.autointerp.errors import LLMError  # not .client: that imports openai

    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return func(args)
    except user_errors() as err:
        print(f"spd-ray {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 2
    except LLMError as err:
        print(f"spd-ray {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except RuntimeError as err:
        from spd_ray.train.loop import NonFiniteLossError
        from spd_ray.train.ray_driver import RunFailedError

        if not isinstance(err, NonFiniteLossError | RunFailedError):
            raise
        print(f"spd-ray {args.command}: run failed: {_one_line(err)}", file=sys.stderr)
        return 1
    except OSError as err:  # a full disk, a read-only folder, ...: what was written stays
        print(f"spd-ray {args.command}: error: {_one_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"spd-ray {args.command}: interrupted; rerun the same command to resume",
            file=sys.stderr,
        )
        return 130


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
