"""Latency of the viewer's endpoints, as a browser sees them: `spd-ray app RUN` is started as a
user starts it and every request goes over real HTTP on loopback.

    python benchmarks/app_latency.py RUN [--n 20] [--threads T] [--ci-threshold C] [--json out.json]

RUN is a language-model run with a harvest. Per endpoint, `--n` requests (after one warm-up):
the component page and its example list (the most active components, a different one each
time), the prompt CI of a 64-token prompt, the attribution graph of a 32-token prompt and an
intervention (ablate the top-CI subcomponents of the last position). Prints median and max in
milliseconds, and the machine's speed on the shared yardstick (../shared/bench) when present.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]


def _call(url: str, body: Any = None) -> tuple[float, Any]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=120) as resp:
        out = json.loads(resp.read())
    return time.perf_counter() - t0, out


def start(run: str, threads: int | None) -> tuple[subprocess.Popen[str], str]:
    extra = [] if threads is None else ["--threads", str(threads)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "spd_ray.cli", "app", run, *extra],
        stdout=subprocess.PIPE,
        text=True,
        env={"OMP_NUM_THREADS": "1", **__import__("os").environ},
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("http://"):
            return proc, line.strip().rstrip("/")
    raise SystemExit("spd-ray app printed no URL")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--threads", type=int, help="the server's torch threads (default: torch's)")
    ap.add_argument("--ci-threshold", type=float, default=0.0, help="graph nodes: CI above this")
    ap.add_argument("--json", help="write the results here too")
    args = ap.parse_args()
    proc, base = start(args.run, args.threads)
    try:
        rid = _call(f"{base}/api/runs")[1][0]["id"]
        api = f"{base}/api/runs/{rid}"
        comps = _call(f"{api}/components?limit={args.n + 1}")[1]["items"]
        keys = [urllib.parse.quote(c["key"], safe="") for c in comps]
        vocab = 500
        prompt64 = {"tokens": [20 + (7 * i) % vocab for i in range(64)]}
        prompt32 = {
            "tokens": [20 + (11 * i) % vocab for i in range(32)],
            "max_edges": 5000,
            "ci_threshold": args.ci_threshold,
        }
        fired = _call(f"{api}/prompt", prompt64)[1]
        last = len(fired["tokens"]) - 1
        nodes = [{"position": last, "key": f["key"]} for f in fired["firing"][last][:10]]
        cases = {
            "component page": lambda i: _call(f"{api}/components/{keys[i]}"),
            "example list": lambda i: _call(f"{api}/components/{keys[i]}/examples?limit=20"),
            "prompt CI (64 tokens)": lambda i: _call(f"{api}/prompt", prompt64),
            "attribution graph (32 tokens)": lambda i: _call(f"{api}/graph", prompt32),
            "intervention (64 tokens)": lambda i: _call(
                f"{api}/intervene", {**prompt64, "mode": "ablate", "nodes": nodes}
            ),
        }
        results: dict[str, dict[str, float]] = {}
        for name, call in cases.items():
            call(args.n)  # warm-up
            times = [call(i)[0] * 1000 for i in range(args.n)]
            results[name] = {"median_ms": statistics.median(times), "max_ms": max(times)}
            med = statistics.median(times)
            print(f"{name:32s} median {med:7.1f} ms   max {max(times):7.1f} ms")
        graph = _call(f"{api}/graph", prompt32)[1]
        n_nodes, n_edges = len(graph["nodes"]), graph["n_edges_total"]
        print(f"(graph: {n_nodes} nodes, {n_edges} edges before the cap)")
        if args.json:
            from spd_ray.io import write_json

            write_json(Path(args.json), results)  # atomic: a killed benchmark leaves no torn file
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    main()
