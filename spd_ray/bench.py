"""`spd-ray bench`: time the training step of registry experiments side by side with a yardstick.

Each round runs the yardstick script (a hand-written step, `python PATH THREADS`), then every
experiment in a fresh child process (`python -m spd_ray.bench`, which prints one JSON line), so
peak memory and compile caches are per experiment. A child runs the real loop (the step function
of `spd-ray run`, `compile: null` pinned to what the experiment's full run decides) with evals and
the faithfulness warmup off, and times `steps` steps after `warmup` untimed ones as one block:
steps/s = steps / the block's wall time, synchronised around the block on a GPU (no sync inside).
It then counts one more step's FLOPs with `FlopCounterMode` (untimed, eager). The parent prints
per experiment the medians over rounds and the ratio to the yardstick (the median of the per-round
ratios: absolute speed drifts by 20-50% between days on a shared machine, ratios measured side by
side do not) and appends one JSON line per experiment to the results file.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure

from spd_ray.config import Config, LMTaskConfig
from spd_ray.errors import InputError, NotFoundError
from spd_ray.io import append_jsonl, repair_tail
from spd_ray.registry import load_experiment

REPO = Path(__file__).resolve().parents[1]
RESULT_MARKER = "spd-ray-bench-result "
YARDSTICK_ENV = "SPD_RAY_YARDSTICK"
_YARDSTICK_SPEED = re.compile(r"steps/s median ([0-9.]+)")
# Dense bf16 peak of a device, by a word of torch.cuda.get_device_name().
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
# glibc's equivalents of `tune_malloc()`, which every child applies to itself: the yardstick gets
# the same allocator settings through the environment.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(16 * 2**20), "MALLOC_TRIM_THRESHOLD_": str(128 * 2**20)}


class BenchError(RuntimeError):
    """A child or the yardstick failed; the message holds the end of its output."""


# ---------------------------------------------------------------------------------------------
# In the child: one experiment timed
# ---------------------------------------------------------------------------------------------


class _NullReporter:
    def log(self, step: int, metrics: dict[str, float]) -> None:
        pass

    def figures(self, step: int, figures: dict[str, Figure]) -> None:
        pass

    def checkpoint(self, step: int, state: dict[str, Any], final: bool) -> None:
        pass


def _no_eval(model: Any, step: int, slow: bool) -> tuple[dict[str, Any], dict[str, Figure]]:
    return {}, {}


def peak_mem_mb(device: torch.device) -> float:
    """This process's peak so far: allocated GPU memory, else resident memory (ru_maxrss)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class _StepClock:
    """`on_step` of the loop: the timed block runs from the end of step `warmup` to the end of
    step `total`, synchronised at both ends (no sync inside it); per-step times from the loop's
    clock on a CPU, from CUDA events (recorded without a sync) on a GPU."""

    def __init__(self, warmup: int, total: int, device: torch.device):
        self.warmup, self.total, self.device = warmup, total, device
        self.cuda = device.type == "cuda"
        self.step_s: list[float] = []
        self.events: list[torch.cuda.Event] = []
        self.start = self.end = self.peak_mb = 0.0

    def __call__(self, step: int, seconds: float) -> None:
        if step > self.warmup:
            self.step_s.append(seconds)
        if self.cuda and step >= self.warmup:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.events.append(event)
        if step == self.warmup:
            self._sync()
            self.start = time.perf_counter()
        elif step == self.total:
            self._sync()
            self.end = time.perf_counter()
            self.peak_mb = peak_mem_mb(self.device)

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def step_ms(self) -> list[float]:
        if self.cuda:
            return [a.elapsed_time(b) for a, b in zip(self.events, self.events[1:], strict=False)]
        return [1000 * s for s in self.step_s]


def flops_of(fn: Callable[[], object]) -> int:
    """FLOPs `fn` runs, as `FlopCounterMode` counts them (matmuls, convolutions, attention),
    with compiled code run eagerly so that every op is seen."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.compiler.set_stance("force_eager"), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def step_flops(config: Config, ctx: Any, state: Any) -> int:
    """FLOPs of one more training step of the loop (forward, backward, optimizer), evals off."""
    from spd_ray.train.loop import run_loop

    one_more = config.model_copy(update={"steps": state.step + 1})
    quiet = dataclasses.replace(ctx, evaluate=_no_eval, on_step=None)
    return flops_of(lambda: run_loop(one_more, quiet, state, _NullReporter()))


def pinned_compile(experiment: str, overrides: list[str]) -> list[str]:
    """`compile: null` decides on the run's step count; the bench's few steps would decide
    otherwise, so it is pinned to what the experiment's own config decides (the step `spd-ray
    run` takes). Nothing to pin when an override sets it."""
    if any(o.partition("=")[0].strip() == "compile" for o in overrides):
        return []
    from spd_ray.core.step import compiles_step

    _, config = load_experiment(experiment, overrides)
    return [f"compile={str(compiles_step(config)).lower()}"]


def bench_config(experiment: str, steps: int, warmup: int, overrides: list[str]) -> Config:
    total = warmup + steps
    _, config = load_experiment(
        experiment,
        [
            *overrides,
            *pinned_compile(experiment, overrides),
            f"steps={total}",
            f"train_log_freq={total}",  # the loop's one host sync: after the timed block
            f"eval_freq={total}",
            "slow_eval_freq=null",
            "n_eval_steps=1",
            "eval_metric_configs=[]",
            "faithfulness_warmup_steps=0",
            "slow_eval_on_first_step=false",
        ],
    )
    return config


def measure(
    experiment: str,
    steps: int,
    warmup: int,
    overrides: list[str],
    threads: int,
    device: str | torch.device = "cpu",
) -> dict[str, Any]:
    """Time `steps` steps of `experiment` after `warmup` steps in this process (see the module
    docstring); the numbers of one round."""
    from spd_ray.runs import tune_malloc
    from spd_ray.train.loop import make_state, run_loop
    from spd_ray.train.worker import build_worker

    assert warmup >= 1, "the first step compiles: at least one warm-up step"
    tune_malloc()
    torch.set_num_threads(threads)
    device = torch.device(device)
    config = bench_config(experiment, steps, warmup, overrides)
    worker = build_worker(config, device=device)
    build_mb = peak_mem_mb(device)
    clock = _StepClock(warmup, config.steps, device)
    ctx = dataclasses.replace(worker.ctx, evaluate=_no_eval, on_step=clock)
    state = make_state(config, ctx)
    run_loop(config, ctx, state, _NullReporter())
    assert clock.end > clock.start, "the timed block did not end"
    flops = step_flops(config, ctx, state)
    steps_per_s = steps / (clock.end - clock.start)
    step_ms = clock.step_ms()
    task = config.task_config
    tokens = config.batch_size * task.max_seq_len if isinstance(task, LMTaskConfig) else None
    return {
        "steps_per_s": steps_per_s,
        "samples_per_s": steps_per_s * config.batch_size,
        "tokens_per_s": None if tokens is None else steps_per_s * tokens,
        "median_step_ms": statistics.median(step_ms),
        "p90_step_ms": statistics.quantiles(step_ms, n=10)[-1] if len(step_ms) > 1 else step_ms[0],
        "peak_mem_mb": clock.peak_mb,
        "build_mem_mb": build_mb,
        "step_mem_mb": clock.peak_mb - build_mb,
        "flops_per_step": flops,
        "batch_size": config.batch_size,
        "tokens_per_step": tokens,
        "torch_threads": torch.get_num_threads(),
        "compiled_step": bool(config.compile),
    }


def _ray_worker(args: dict[str, Any]) -> None:
    """The Ray Train worker: `measure` on its device, the numbers reported with a checkpoint
    (Ray Train keeps a report's metrics in the trainer's result only with one)."""
    import ray.train
    import ray.train.torch

    device = ray.train.torch.get_device() if args.pop("gpu") else torch.device("cpu")
    result = measure(**args, device=device)
    with tempfile.TemporaryDirectory() as d:
        Path(d, "result.json").write_text(json.dumps(result))
        ray.train.report(result, checkpoint=ray.train.Checkpoint.from_directory(d))


def measure_on_ray(args: dict[str, Any], gpu: bool) -> dict[str, Any]:
    """`measure` inside one Ray Train worker of a private local Ray started here (all local
    CPUs) and shut down after."""
    import ray
    import ray.train

    from spd_ray.ray_session import connect_ray, local_cpus
    from spd_ray.train.lean import lean_trainer_class
    from spd_ray.train.ray_driver import worker_bundle

    os.environ["RAY_ADDRESS"] = "local"
    connect_ray()
    try:
        with tempfile.TemporaryDirectory(prefix="spd-ray-bench-") as storage:
            trainer = lean_trainer_class(own_ray=True)(
                _ray_worker,
                train_loop_config={**args, "gpu": gpu},
                scaling_config=ray.train.ScalingConfig(
                    num_workers=1,
                    use_gpu=gpu,
                    resources_per_worker=worker_bundle(float(local_cpus()), gpu),
                ),
                run_config=ray.train.RunConfig(name="bench", storage_path=storage),
            )
            metrics = trainer.fit().metrics
    finally:
        ray.shutdown()
    assert metrics, "the Ray Train worker reported no result"
    return dict(metrics)


def child_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m spd_ray.bench", description="one bench child")
    p.add_argument("--experiment", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--warmup", type=int, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--device", default="cpu")
    p.add_argument("--ray", action="store_true")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    a = p.parse_args(argv)
    args = {k: getattr(a, k) for k in ("experiment", "steps", "warmup", "overrides", "threads")}
    if a.ray:
        result = measure_on_ray(args, gpu=a.device == "cuda")
    else:
        result = measure(**args, device=a.device)
    print(RESULT_MARKER + json.dumps(result), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------
# In the parent: rounds, yardstick, results
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BenchOptions:
    experiments: list[str]
    rounds: int = 1
    steps: int = 60
    warmup: int = 10
    threads: int = 0  # 0: every core this process may use
    ray: bool = False
    gpu: bool = False
    memory: bool = False
    overrides: list[str] = dataclasses.field(default_factory=list)
    yardstick: str | None = None  # an explicit path; None: the default one, if any
    no_yardstick: bool = False
    results: str | None = None
    peak_tflops: float | None = None


def find_yardstick(explicit: str | None, disabled: bool) -> Path | None:
    """The yardstick script: `explicit`, else $SPD_RAY_YARDSTICK, else
    `<repo>/../shared/bench/lean_tms_step.py` when it exists. One that was asked for (a path or
    the variable) and is missing is an error."""
    if disabled:
        return None
    asked = explicit or os.environ.get(YARDSTICK_ENV)
    if asked:
        path = Path(asked).expanduser()
        if not path.is_file():
            what = "--yardstick" if explicit else f"${YARDSTICK_ENV}"
            raise NotFoundError(f"{what}: yardstick script {path} does not exist")
        return path
    default = REPO.parent / "shared" / "bench" / "lean_tms_step.py"
    return default if default.is_file() else None


def run_yardstick(path: Path, threads: int) -> float:
    """The yardstick's steps/s: `python PATH THREADS`, eager."""
    res = subprocess.run(
        [sys.executable, str(path), str(threads)],
        capture_output=True,
        text=True,
        env={**os.environ, **MALLOC_ENV},
        timeout=900,
    )
    found = _YARDSTICK_SPEED.search(res.stdout)
    if res.returncode != 0 or found is None:
        raise BenchError(
            f"yardstick {path} exited {res.returncode} without 'steps/s median X': "
            f"{(res.stdout + res.stderr)[-2000:]}"
        )
    return float(found.group(1))


def run_child(experiment: str, opts: BenchOptions, overrides: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "spd_ray.bench", "--experiment", experiment]
    cmd += ["--steps", str(opts.steps), "--warmup", str(opts.warmup), "--threads", str(threads)]
    cmd += ["--device", "cuda" if opts.gpu else "cpu", *(["--ray"] if opts.ray else [])]
    for o in overrides:
        cmd += ["--set", o]
    res = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if res.returncode != 0 or not lines:
        raise BenchError(
            f"bench of {experiment} exited {res.returncode}: {(res.stdout + res.stderr)[-3000:]}"
        )
    return dict(json.loads(lines[-1][len(RESULT_MARKER) :]))


def peak_flops(device_name: str, given_tflops: float | None) -> float:
    if given_tflops is not None:
        return given_tflops * 1e12
    for word, flops in PEAK_FLOPS.items():
        if word in device_name:
            return flops
    raise InputError(f"no peak FLOP/s known for GPU {device_name!r}: give --peak-tflops")


def gpu_overrides() -> list[str]:
    """A --gpu run's settings: bf16 autocast and the whole step compiled. The user's --set come
    after, so they win."""
    return ["autocast_bf16=true", "compile=true"]


def results_path(explicit: str | None) -> Path:
    """`explicit`, else the checkout's benchmarks/results.jsonl, else the output root's."""
    if explicit:
        return Path(explicit).expanduser()
    if (REPO / "benchmarks").is_dir() and (REPO / "pyproject.toml").is_file():
        return REPO / "benchmarks" / "results.jsonl"
    from spd_ray.runs import output_root

    return output_root() / "bench" / "results.jsonl"


def append_result(path: Path, row: dict[str, Any]) -> None:
    """One durable append (one write, fsync); a torn last line left by a kill is cut first, so
    the file stays readable by `spd_ray.io.read_jsonl`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    repair_tail(path)
    append_jsonl(path, row, sync=True)


def _git(*args: str) -> str | None:
    res = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else None


def machine() -> dict[str, Any]:
    cpu = None
    if Path("/proc/cpuinfo").exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = names[0].strip() if names else None
    commit = _git("rev-parse", "HEAD") if (REPO / ".git").exists() else None
    dirty = None if commit is None else bool(_git("status", "--porcelain", "--untracked-files=no"))
    return {
        "hostname": socket.gethostname(),
        "cpu_model": cpu,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "ray": importlib.metadata.version("ray"),
        "commit": commit,
        "dirty": dirty,
        "spd_ray_version": importlib.metadata.version("spd-ray"),
    }


def _median(values: list[Any]) -> Any:
    """The median of the values present; of whole numbers (batch size, FLOPs), one of them."""
    present = [v for v in values if v is not None]
    if not present:
        return None
    if all(isinstance(v, int) for v in present):
        return statistics.median_low(present)
    return statistics.median(present)


def run_bench(opts: BenchOptions) -> list[dict[str, Any]]:
    """Every round: the yardstick, then each experiment in a child. Prints the table, appends
    one row per experiment to the results file and returns the rows."""
    from spd_ray.ray_session import local_cpus

    yardstick = find_yardstick(opts.yardstick, opts.no_yardstick)
    peak = None
    if opts.gpu:
        if not torch.cuda.is_available():
            raise InputError(f"--gpu: CUDA is not available here (torch {torch.__version__})")
        peak = peak_flops(torch.cuda.get_device_name(), opts.peak_tflops)
    overrides = [*(gpu_overrides() if opts.gpu else []), *opts.overrides]
    for name in opts.experiments:  # unknown names and bad --set fail before anything runs
        bench_config(name, opts.steps, opts.warmup, overrides)
    out = results_path(opts.results)
    threads = opts.threads or local_cpus()
    where = ("Ray Train worker, " if opts.ray else "") + ("cuda" if opts.gpu else "cpu")
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    say(f"# torch {torch.__version__}, {threads} threads, {where}, overrides {overrides}")
    if yardstick is None:
        say(f"# no yardstick (--yardstick, ${YARDSTICK_ENV}): steps/s without a ratio")
    per_round: dict[str, list[dict[str, Any]]] = {name: [] for name in opts.experiments}
    for r in range(opts.rounds):
        yard = None if yardstick is None else run_yardstick(yardstick, threads)
        line = f"round {r + 1}/{opts.rounds}:" + ("" if yard is None else f" yardstick {yard:.1f}")
        for name in opts.experiments:
            res = run_child(name, opts, overrides, threads)
            res["yardstick_steps_per_s"] = yard
            res["ratio"] = None if yard is None else res["steps_per_s"] / yard
            per_round[name].append(res)
            line += f"; {name} {res['steps_per_s']:.1f}"
            line += "" if yard is None else f" ({res['ratio']:.2f}x)"
        say(line)
    info = machine()
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    rows = []
    for name, results in per_round.items():
        row: dict[str, Any] = {"time": stamp, **info, "threads": threads, "experiment": name}
        row |= {"overrides": overrides, "rounds": opts.rounds, "steps": opts.steps}
        row |= {"warmup": opts.warmup, "device": "cuda" if opts.gpu else "cpu", "on_ray": opts.ray}
        row |= {k: _median([res[k] for res in results]) for k in results[0]}
        row["mfu"] = None if peak is None else row["flops_per_step"] * row["steps_per_s"] / peak
        row["yardstick"] = None if yardstick is None else str(yardstick)
        row["per_round"] = [
            {k: res[k] for k in ("steps_per_s", "yardstick_steps_per_s", "ratio")}
            for res in results
        ]
        append_result(out, row)
        rows.append(row)
    print(format_table(rows, opts.memory))
    say(f"# {len(rows)} row(s) appended to {out}")
    return rows


def format_table(rows: list[dict[str, Any]], memory: bool) -> str:
    name_width = max([14, *(len(str(row["experiment"])) for row in rows)])  # YAML paths too
    cols: list[tuple[str, str, str]] = [
        ("experiment", "experiment", f"<{name_width}"),
        ("steps/s", "steps_per_s", ">8.1f"),
        ("samples/s", "samples_per_s", ">10.0f"),
        ("tokens/s", "tokens_per_s", ">9.0f"),
        ("p90 ms", "p90_step_ms", ">7.1f"),
        ("peak MB", "peak_mem_mb", ">8.0f"),
    ]
    if memory:
        cols += [("build MB", "build_mem_mb", ">8.0f"), ("+step MB", "step_mem_mb", ">8.0f")]
    cols += [("MFLOP/step", "flops_per_step", ">10.3g"), ("MFU", "mfu", ">6.1%")]
    cols += [("yard/s", "yardstick_steps_per_s", ">7.1f"), ("ratio", "ratio", ">6.2f")]

    def cell(value: Any, key: str, fmt: str) -> str:
        width = fmt.lstrip("<>").split(".")[0]
        if value is None:
            return f"{'-':>{width}}"
        return format(value / 1e6 if key == "flops_per_step" else value, fmt)

    head = " ".join(f"{title:{fmt[0]}{fmt.lstrip('<>').split('.')[0]}}" for title, _, fmt in cols)
    body = [" ".join(cell(row[key], key, fmt) for _, key, fmt in cols) for row in rows]
    return "\n".join([head, *body])


if __name__ == "__main__":
    # Through the package's module, so that Ray pickles `_ray_worker` by reference.
    from spd_ray.bench import child_main as _child_main

    sys.exit(_child_main())
