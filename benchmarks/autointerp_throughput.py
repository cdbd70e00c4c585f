"""Autointerp throughput: labelled subcomponents per second against a local OpenAI-compatible
server with a fixed latency, for several (actors, concurrency) settings and one rpm limit.

    python benchmarks/autointerp_throughput.py [RUN] [--latency 0.2] [--limit 96]

RUN is a harvested run directory (default /tmp/hv/out/llama). Every setting gets a fresh test
server (tests/llm_server.py) and an empty label store, so everything is labelled
again. Ray is started once, before the first setting, so its startup is not timed; each setting
still pays for building its prompts on the driver, the endpoint check and the Ray Data actor
pool start, and the table shows those phases apart from the labelling itself.

With latency L, at most actors x concurrency requests in flight give at most
actors x concurrency / L labels per second; an rpm limit caps the requests in any 60 s window,
whatever the pool could do.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import ray  # noqa: E402 - the environment above must be set before Ray is imported

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from llm_server import LLMServer  # noqa: E402

from spd_ray.autointerp.client import LLMSettings  # noqa: E402
from spd_ray.autointerp.pipeline import AutointerpOptions, run_autointerp  # noqa: E402
from spd_ray.autointerp.store import LabelStore  # noqa: E402

MODEL = "test-model"
CHECK_TEXT = "Reply with OK."  # the endpoint check's message (client.LLMClient.check)
WINDOW_S = 60.0


@dataclass
class Row:
    actors: int
    concurrency: int
    rpm: int | None
    limit: int
    labels: int = 0
    seconds: float = 0.0
    prep_s: float = 0.0  # start -> check request arrives: harvest load + prompt building
    start_s: float = 0.0  # check arrives -> first label request arrives: check, limiter, pool
    phase_s: float = 0.0  # first label request arrives -> run_autointerp returns
    chat_requests: int = 0
    check_requests: int = 0
    max_in_flight: int = 0
    window_all: int = 0  # most chat requests in any 60 s window, check included
    window_labels: int = 0  # the same, label requests only
    label_times: tuple[float, ...] = ()  # label request arrivals, seconds after the first

    @property
    def rate(self) -> float:
        return self.labels / self.seconds if self.seconds > 0 else 0.0

    @property
    def phase_rate(self) -> float:
        return self.labels / self.phase_s if self.phase_s > 0 else 0.0


def max_in_window(times: list[float], window_s: float = WINDOW_S) -> int:
    """Most timestamps in any half-open window [t, t + window_s)."""
    times = sorted(times)
    best = j = 0
    for i, t in enumerate(times):
        while j < len(times) and times[j] - t < window_s:
            j += 1
        best = max(best, j - i)
    return best


def is_check(body: dict) -> bool:
    messages = body.get("messages") or []
    return len(messages) == 1 and messages[0].get("content") == CHECK_TEXT


def measure(run_dir: Path, row: Row, latency: float) -> Row:
    store_dir = LabelStore(run_dir, MODEL).dir
    shutil.rmtree(store_dir, ignore_errors=True)
    with LLMServer(latency_s=latency) as server:
        opts = AutointerpOptions(
            llm=LLMSettings(base_url=server.base_url, model=MODEL),
            actors=row.actors,
            concurrency=row.concurrency,
            rpm=row.rpm,
            limit=row.limit,
            progress=False,
        )
        t0 = time.monotonic()
        store = run_autointerp(run_dir, opts)
        t1 = time.monotonic()
        with server._lock:
            stamps = list(server.timestamps)
            bodies = list(server.bodies)
            row.chat_requests = server.chat_requests
            row.max_in_flight = server.max_in_flight
    checks = [t for t, b in zip(stamps, bodies, strict=True) if is_check(b)]
    labels = [t for t, b in zip(stamps, bodies, strict=True) if not is_check(b)]
    row.labels = sum(r.get("status") == "ok" for r in store.labels().values())
    row.seconds = t1 - t0
    row.check_requests = len(checks)
    first_check = min(checks) if checks else t0
    first_label = min(labels) if labels else t1
    row.prep_s = first_check - t0
    row.start_s = first_label - first_check
    row.phase_s = t1 - first_label
    row.window_all = max_in_window(stamps)
    row.window_labels = max_in_window(labels)
    row.label_times = tuple(t - first_label for t in sorted(labels))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", default="/tmp/hv/out/llama", help="harvested run dir")
    parser.add_argument("--latency", type=float, default=0.2, help="server latency, seconds")
    parser.add_argument("--limit", type=int, default=96, help="labels per unlimited setting")
    parser.add_argument("--rpm", type=int, default=30, help="requests per minute, last row")
    parser.add_argument("--rpm-limit", type=int, default=40, help="labels in the rpm row")
    args = parser.parse_args()
    run_dir = Path(args.run).expanduser().resolve()

    settings = [(1, 1, None), (1, 4, None), (2, 4, None), (2, 8, None), (2, 8, args.rpm)]
    ray.init(num_cpus=2, include_dashboard=False)
    rows = []
    t_all = time.monotonic()
    try:
        for actors, concurrency, rpm in settings:
            limit = args.limit if rpm is None else args.rpm_limit
            row = measure(run_dir, Row(actors, concurrency, rpm, limit), args.latency)
            rows.append(row)
            print(
                f"done: actors={actors} concurrency={concurrency} rpm={rpm}: "
                f"{row.labels} labels in {row.seconds:.1f}s",
                file=sys.stderr,
                flush=True,
            )
    finally:
        ray.shutdown()
    total = time.monotonic() - t_all

    print()
    print(f"autointerp throughput: run {run_dir}, server latency {args.latency:g}s, 2 CPUs")
    header = (
        f"{'actors':>6} {'conc':>4} {'rpm':>4} {'labels':>6} {'seconds':>7} {'lab/s':>6} "
        f"{'ideal':>6} {'prep s':>6} {'start s':>7} {'phase s':>7} {'ph lab/s':>8} "
        f"{'reqs':>4} {'inflt':>5} {'win60':>5} {'win60 lab':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        ideal = r.actors * r.concurrency / args.latency
        print(
            f"{r.actors:>6} {r.concurrency:>4} {r.rpm or '-':>4} {r.labels:>6} "
            f"{r.seconds:>7.2f} {r.rate:>6.2f} {ideal:>6.1f} {r.prep_s:>6.2f} "
            f"{r.start_s:>7.2f} {r.phase_s:>7.2f} {r.phase_rate:>8.2f} "
            f"{r.chat_requests:>4} {r.max_in_flight:>5} {r.window_all:>5} {r.window_labels:>9}"
        )
    print()
    print(
        "seconds: the whole run_autointerp call (Ray already up), driver-side harvest loading "
        "and prompt building included; lab/s = labels / seconds."
    )
    print(
        "prep s: start -> endpoint check arrives (harvest + prompts); start s: check arrives -> "
        "first label request arrives (check latency, limiter actor, Ray Data actor pool); "
        "phase s: first label request -> return; ph lab/s = labels / phase s."
    )
    print(
        "ideal = actors x concurrency / latency (labels/s with no overhead); an rpm row is also "
        "bounded by its rpm over a 60 s window."
    )
    print(
        "reqs, inflt (server max in flight) and win60 (most chat requests in any 60 s window) "
        "are server counts and include the one endpoint check request of each run (sent before "
        "the pool starts, outside the rpm limiter); win60 lab counts label requests only."
    )
    base = rows[0]
    print()
    print("ratios relative to (1, 1):")
    for r in rows:
        print(
            f"  ({r.actors}, {r.concurrency}, rpm={r.rpm or '-'}): lab/s x{r.rate / base.rate:.2f}"
            f", phase lab/s x{r.phase_rate / base.phase_rate:.2f}, "
            f"ideal x{r.actors * r.concurrency}"
        )
    for r in rows:
        a = r.label_times
        if r.rpm is not None and len(a) > r.rpm:
            # The limiter grants on its own clock; what a provider counts is arrivals.
            k = r.rpm
            closest = min(a[i + k] - a[i] for i in range(len(a) - k))
            print(
                f"rpm {r.rpm} row, label arrivals after the first: request {k} at "
                f"{a[k - 1]:.2f}s, request {k + 1} at {a[k]:.2f}s; the closest {k + 1} "
                f"arrivals span {closest:.2f}s (<60 s means {k + 1} in one 60 s window)"
            )
    for r in rows:
        cap = r.actors * r.concurrency
        if r.max_in_flight > cap:
            print(
                f"WARNING: ({r.actors}, {r.concurrency}) had {r.max_in_flight} requests in flight,"
                f" more than actors x concurrency = {cap}"
            )
        if r.rpm is not None and r.window_labels > r.rpm:
            print(f"WARNING: rpm {r.rpm} exceeded: {r.window_labels} label requests in 60 s")
        if r.labels != r.limit:
            print(f"WARNING: {r.labels} labels, expected {r.limit}")
    print(f"total benchmark time {total:.1f}s")


if __name__ == "__main__":
    main()
