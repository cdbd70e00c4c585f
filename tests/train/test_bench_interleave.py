"""The pieces of `spd-ray bench --ray-overhead --interleave` that decide what is measured: which
processes get frozen, and which step a run's log says it reached."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from spd_ray.bench import _descendants, _LoggedSteps, _signal_all


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2 :].split()[0]


def test_a_process_tree_is_found_whole_and_frozen_and_thawed_together() -> None:
    # A parent with two children and a grandchild, like a driver with its Ray under it.
    script = (
        "import subprocess, sys, time\n"
        "kids = [subprocess.Popen([sys.executable, '-c', "
        "'import subprocess, sys, time; "
        'subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]); '
        "time.sleep(60)']) for _ in range(2)]\n"
        "time.sleep(60)\n"
    )
    root = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while len(_descendants(root.pid)) < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
        tree = _descendants(root.pid)
        assert len(tree) == 5 and tree[0] == root.pid
        assert os.getpid() not in tree
        _signal_all(tree, signal.SIGSTOP)
        time.sleep(0.2)
        assert {_state(p) for p in tree} == {"T"}
        _signal_all(tree, signal.SIGCONT)
        time.sleep(0.2)
        assert "T" not in {_state(p) for p in tree}
    finally:
        _signal_all(_descendants(root.pid), signal.SIGKILL)
        root.wait()


def test_logged_steps_reads_the_last_train_row_past_eval_rows_and_a_cut_line(
    tmp_path: Path,
) -> None:
    path = tmp_path / "metrics.jsonl"
    logged = _LoggedSteps(path)
    assert logged.latest() == 0  # no file yet: not started
    rows = [{"step": s, "train/loss/total": 1.0, "train/steps_per_s": 90.0} for s in (100, 200)]
    rows.append({"step": 200, "eval/loss": 0.5, "pad": "x" * 20000})  # longer than the tail read
    rows.append({"step": 300, "train/loss/total": 1.0, "train/steps_per_s": 90.0})
    rows.append({"step": 300, "eval/loss": 0.5})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert logged.latest() == 300


def test_logged_steps_rate_times_rows_as_they_arrive(tmp_path: Path) -> None:
    """Rows written every 0.1 s, 100 steps apart: ~1000 steps/s, whatever the window's edges."""
    path = tmp_path / "metrics.jsonl"
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import json, sys, time\n"
            "with open(sys.argv[1], 'a') as f:\n"
            "    for s in range(100, 10000, 100):\n"
            "        f.write(json.dumps({'step': s, 'train/steps_per_s': 1.0}) + '\\n')\n"
            "        f.flush(); time.sleep(0.1)\n",
            str(path),
        ]
    )
    try:
        rate = _LoggedSteps(path).rate(1.5)
    finally:
        writer.kill()
        writer.wait()
    assert 800 < rate < 1100, rate
