"""`spd-ray autointerp` end to end: the CLI drives a Ray Data actor pool of async workers that
talk to a real OpenAI-compatible server on 127.0.0.1 (tests/llm_server.py) over HTTP.

Faults lose nothing (every subcomponent ends labelled or failed with a reason, none twice), the
server never sees more than actors x concurrency requests at once, a killed run resumes with
only the missing requests, an oracle scores 1.0 and a random answerer about 0.5, a zero budget
sends nothing, bad endpoints fail fast, a budget counts what earlier runs of the store spent, and
a second run on a store exits at once while the first one lives."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from harvest_fixtures import hold_lock, kill_9, spd_ray_cli
from llm_server import LLMServer
from ray_head import RayHead

from spd_ray.harvest.show import example_text
from spd_ray.harvest.store import Harvest

MODEL = "test-model"


@pytest.fixture(scope="module")
def harvested(
    lm_run: tuple[Path, dict[str, str]], ray_head: RayHead
) -> tuple[Path, dict[str, str]]:
    run, env = lm_run
    env = {**env, "RAY_ADDRESS": ray_head.address, "TEST_LLM_KEY": "sk-test"}
    res = spd_ray_cli(
        env, "harvest", str(run), "--batches", "4", "--batch-size", "8", "--no-progress"
    )
    assert res.returncode == 0, res.stderr[-3000:]
    return run, env


def _autointerp_args(run: Path, server: LLMServer, *args: str) -> list[str]:
    return [
        "autointerp",
        str(run),
        "--base-url",
        server.base_url,
        "--model",
        MODEL,
        "--api-key-env",
        "TEST_LLM_KEY",
        "--no-progress",
        *args,
    ]


def _autointerp(
    env: dict[str, str], run: Path, server: LLMServer, *args: str
) -> subprocess.CompletedProcess[str]:
    return spd_ray_cli(env, *_autointerp_args(run, server, *args))


def _clear_store(run: Path) -> Path:
    """The label store of MODEL, emptied (each test labels from scratch)."""
    store = _store(run)
    if store.exists():
        for f in store.iterdir():
            f.unlink()
    return store


def _lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _store(run: Path) -> Path:
    return run / "autointerp" / MODEL


def _prompt(request: dict[str, Any]) -> str:
    """The first user message: the task (a re-ask appends its complaint after it)."""
    return str(next(m["content"] for m in request["messages"] if m["role"] == "user"))


def _label_answer(request: dict[str, Any]) -> str:
    text = _prompt(request)
    key = re.search(r"Subcomponent (\S+):", text)
    label = f"detects {key.group(1)}" if key else "unclear"
    return json.dumps({"label": label, "confidence": "medium", "reasoning": "From the examples."})


@pytest.mark.slow
def test_faults_lose_nothing_and_in_flight_stays_bounded(
    harvested: tuple[Path, dict[str, str]],
) -> None:
    run, env = harvested
    h = Harvest(run)
    # Every kind of fault, deterministically by request number; one subcomponent's answers are
    # always malformed, so it must end up recorded as failed.
    cycle = ["429:0", None, "500", None, "timeout", "malformed", None, "truncated", "drop", None]
    doomed: list[str] = []

    def faults(n: int, body: dict[str, Any]) -> str | None:
        text = body["messages"][1]["content"] if len(body["messages"]) > 1 else ""
        if doomed and f"Subcomponent {doomed[0]}:" in text:
            return "malformed"
        return cycle[n % len(cycle)]

    limit = 14
    keys = _selected(h, limit)
    doomed.append(keys[3])
    with LLMServer(
        api_key="sk-test", answer=_label_answer, faults=faults, latency_s=0.05, timeout_sleep_s=3
    ) as server:
        res = _autointerp(
            env,
            run,
            server,
            "--limit",
            str(limit),
            "--actors",
            "2",
            "--concurrency",
            "3",
            "--timeout",
            "1",
            "--max-retries",
            "8",
        )
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.max_in_flight <= 2 * 3
        assert server.max_in_flight >= 2  # the pool really ran concurrently
        assert server.fault_counts["timeout"] >= 1 and server.fault_counts["truncated"] >= 1
    rows = _lines(_store(run) / "labels.jsonl")
    assert sorted(r["key"] for r in rows) == sorted(keys), "each key exactly once"
    by_key = {r["key"]: r for r in rows}
    assert by_key[doomed[0]]["status"] == "failed" and "malformed" in by_key[doomed[0]]["reason"]
    ok = [r for r in rows if r["status"] == "ok"]
    assert len(ok) == limit - 1
    assert all(r["label"] == f"detects {r['key']}" for r in ok)

    # A rerun retries only the failed one (plus the endpoint check), and labels it this time.
    doomed.clear()
    with LLMServer(api_key="sk-test", answer=_label_answer) as server:
        res = _autointerp(env, run, server, "--limit", str(limit))
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.chat_requests == 1 + 1
    table = spd_ray_cli(env, "labels", str(run))
    assert table.returncode == 0 and f"({limit} labelled, 0 failed" in table.stdout


def _selected(h: Harvest, limit: int) -> list[str]:
    fc = h.firing_counts()
    order = sorted(range(len(fc)), key=lambda i: (-fc[i], i))
    return [h.keys[i] for i in order if fc[i] > 0][:limit]


def test_killed_run_resends_only_what_is_missing(harvested: tuple[Path, dict[str, str]]) -> None:
    run, env = harvested
    store = _clear_store(run)
    limit = 24
    with LLMServer(api_key="sk-test", answer=_label_answer, latency_s=0.4) as server:
        cmd = [
            sys.executable,
            "-m",
            "spd_ray.cli",
            *_autointerp_args(
                run, server, "--limit", str(limit), "--actors", "1", "--concurrency", "2"
            ),
        ]
        proc = subprocess.Popen(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
        )
        labels = store / "labels.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and (not labels.exists() or len(_lines(labels)) < 6):
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    done = {r["key"] for r in _lines(labels)}
    assert 6 <= len(done) < limit
    with LLMServer(api_key="sk-test", answer=_label_answer) as server:
        res = _autointerp(env, run, server, "--limit", str(limit))
        assert res.returncode == 0, res.stderr[-3000:]
        asked = [
            re.search(r"Subcomponent (\S+):", b["messages"][-1]["content"]) for b in server.bodies
        ]
        asked_keys = [m.group(1) for m in asked if m]
        assert sorted(asked_keys) == sorted(set(_selected(Harvest(run), limit)) - done)
    rows = _lines(labels)
    assert sorted(r["key"] for r in rows if r["status"] == "ok") == sorted(
        _selected(Harvest(run), limit)
    )


# -- scores --------------------------------------------------------------------------------------

ITEM = re.compile(r"^(\d+)\. (.*)$")
MARKS = re.compile(r"<<|>>")


def _items(text: str) -> dict[int, str]:
    return {int(m.group(1)): m.group(2) for line in text.splitlines() if (m := ITEM.match(line))}


class Oracle:
    """Answers score trials from the truth: it knows every subcomponent's examples (rendered as
    the pipeline renders them) and reads the component out of the label `detects <key>`."""

    def __init__(self, h: Harvest):
        self.marked: dict[str, set[str]] = {}
        for key in h.keys:
            ex = h.examples(key)
            if ex:
                self.marked[key] = {example_text(h, e, ("<<", ">>")) for e in ex}
        self.plain = {k: {MARKS.sub("", t) for t in v} for k, v in self.marked.items()}
        self.ambiguous: set[str] = set()  # intruder prompts two subcomponents could explain

    def __call__(self, request: dict[str, Any]) -> str:
        text = _prompt(request)
        if "Subcomponent " in text:
            return _label_answer(request)
        items = _items(text)
        label = re.search(r"detects ([\w.:-]+)", text)
        if label is None:
            # Intruder: the one item outside a subcomponent that owns all the others, marks
            # included (the real items are that subcomponent's examples as rendered, marked where
            # it fires). Two subcomponents can each own all but a different item only where they
            # fire on the same tokens of the same windows: such a trial is recorded as ambiguous.
            answers = {
                outside[0]
                for examples in self.marked.values()
                if len(outside := [n for n, t in items.items() if t not in examples]) == 1
            }
            if len(answers) != 1:
                self.ambiguous.add(text)
            return json.dumps({"selected": sorted(answers)[:1], "reasoning": "odd one"})
        key = label.group(1)
        if "highlight" in text.lower() and "<<" in text:  # fuzzing: the correctly marked ones
            picks = [n for n, t in items.items() if t in self.marked[key]]
        else:  # detection
            picks = [n for n, t in items.items() if MARKS.sub("", t) in self.plain[key]]
        return json.dumps({"selected": picks, "reasoning": "known"})


def _random_answer(request: dict[str, Any]) -> str:
    text = _prompt(request)
    if "Subcomponent " in text or not _items(text):  # a label request or the endpoint check
        return _label_answer(request)
    rng = random.Random(text)
    items = sorted(_items(text))
    if re.search(r"detects [\w.:-]+", text) is None:
        return json.dumps({"selected": [rng.choice(items)], "reasoning": "guess"})
    return json.dumps({"selected": [n for n in items if rng.random() < 0.5], "reasoning": "guess"})


def _trials(run: Path) -> dict[str, list[dict[str, Any]]]:
    """Every trial of every score row, by kind."""
    out: dict[str, list[dict[str, Any]]] = {}
    for r in _lines(_store(run) / "scores.jsonl"):
        out.setdefault(r["kind"], []).extend(r["trials"])
    return out


def _scores(run: Path) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for r in _lines(_store(run) / "scores.jsonl"):
        assert r["status"] == "ok", r
        out.setdefault(r["kind"], []).append(r["score"])
    return out


@pytest.mark.slow
def test_scores_oracle_near_one_random_near_half(harvested: tuple[Path, dict[str, str]]) -> None:
    run, env = harvested
    h = Harvest(run)
    args = [
        "--limit",
        "8",
        "--score",
        "detection,fuzzing,intruder",
        "--actors",
        "2",
        "--concurrency",
        "4",
    ]
    oracle = Oracle(h)
    for answer, check in ((oracle, "oracle"), (_random_answer, "random")):
        _clear_store(run)
        with LLMServer(api_key="sk-test", answer=answer) as server:
            res = _autointerp(env, run, server, *args)
            assert res.returncode == 0, res.stderr[-3000:]
        scores = _scores(run)
        assert {k: len(v) for k, v in scores.items()} == {
            "detection": 8,
            "fuzzing": 8,
            "intruder": 8,
        }
        if check == "oracle":
            # Every trial the truth decides is answered right: detection and fuzzing all, the
            # intruder all but those where two subcomponents of this barely trained run fire on
            # the same tokens of the shown windows (few: at most a tenth of the 80 trials).
            trials = _trials(run)
            assert all(t["score"] == 1.0 for t in trials["detection"] + trials["fuzzing"])
            wrong = sum(t["score"] < 1.0 for t in trials["intruder"])
            assert len(trials["intruder"]) == 80
            assert wrong <= len(oracle.ambiguous) <= 8, (wrong, len(oracle.ambiguous))
        else:
            # 8 components x 5-10 trials each: the std of the mean is below 0.03, so 0.15 is a
            # > 5 sigma band around chance.
            for kind, values in scores.items():
                assert abs(sum(values) / len(values) - 0.5) < 0.15, (kind, values)
    table = spd_ray_cli(env, "labels", str(run))
    assert table.returncode == 0
    assert "detection" in table.stdout and "intruder" in table.stdout


@pytest.mark.slow
def test_zero_budget_sends_nothing_and_bad_endpoints_fail_fast(
    harvested: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    run, env = harvested
    store = _clear_store(run)
    with LLMServer(api_key="sk-test", answer=_label_answer) as server:
        res = _autointerp(env, run, server, "--limit", "5", "--budget-usd", "0")
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.chat_requests == 0
    rows = _lines(store / "labels.jsonl")
    assert len(rows) == 5 and all(r["status"] == "failed" and "budget" in r["reason"] for r in rows)

    with LLMServer(api_key="sk-test", models=[MODEL]) as server:
        for extra_env, model, expect in (
            ({"TEST_LLM_KEY": "wrong"}, MODEL, "401"),
            ({}, "no-such-model", "no-such-model"),
        ):
            t0 = time.monotonic()
            res = spd_ray_cli(
                {**env, **extra_env},
                "autointerp",
                str(run),
                "--base-url",
                server.base_url,
                "--model",
                model,
                "--api-key-env",
                "TEST_LLM_KEY",
                "--limit",
                "3",
            )
            assert res.returncode != 0 and expect in res.stderr.strip().splitlines()[-1]
            assert time.monotonic() - t0 < 30
        base = server.base_url
    # The server is gone: its port refuses connections.
    res = spd_ray_cli(
        env, "autointerp", str(run), "--base-url", base, "--model", MODEL, "--limit", "3"
    )
    assert res.returncode != 0 and "reach" in res.stderr.strip().splitlines()[-1]
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.yaml").write_text((run / "config.yaml").read_text())
    res = spd_ray_cli(env, "autointerp", str(bare), "--base-url", base, "--model", MODEL)
    assert res.returncode == 2 and "has no harvest" in res.stderr


# -- budget across runs, the store's lock ---------------------------------------------------------

# Every request costs the same: 1000 prompt tokens at $1/M + 100 completion tokens at $10/M.
PRICED = ("--price-in", "1", "--price-out", "10")
COST = 1000 * 1e-6 + 100 * 10e-6  # $0.002


def _spent(store: Path) -> tuple[float, int, int]:
    """(USD, requests, prompt tokens) on every line of the store's files."""
    rows = [
        r for name in ("labels", "scores", "checks") for r in _lines_if(store / f"{name}.jsonl")
    ]
    usage = [r.get("usage", {}) for r in rows]
    return (
        sum(u.get("cost_usd", 0.0) for u in usage),
        sum(u.get("requests", 0) for u in usage),
        sum(u.get("prompt_tokens", 0) for u in usage),
    )


def _lines_if(path: Path) -> list[dict[str, Any]]:
    return _lines(path) if path.exists() else []


def _latest_ok(store: Path) -> int:
    latest = {r["key"]: r["status"] for r in _lines(store / "labels.jsonl")}
    return sum(s == "ok" for s in latest.values())


@pytest.mark.slow  # CI time: see the CI note in CONTRIBUTING.md
def test_budget_counts_what_earlier_runs_of_the_store_spent(
    harvested: tuple[Path, dict[str, str]],
) -> None:
    run, env = harvested
    store = _clear_store(run)
    one_by_one = ("--limit", "6", "--actors", "1", "--concurrency", "1", *PRICED)
    server = LLMServer(
        api_key="sk-test", answer=_label_answer, prompt_tokens=1000, completion_tokens=100
    )
    with server:
        # $0.007: the check and 3 labels ($0.008; the last one is granted at $0.006 < $0.007),
        # then the budget refuses the other 3 without sending them.
        res = _autointerp(env, run, server, *one_by_one, "--budget-usd", "0.007")
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.chat_requests == 4
        assert _spent(store) == (pytest.approx(4 * COST), 4, 4000)
        assert _latest_ok(store) == 3
        # The same budget again: spent already, so nothing is sent, not even the check.
        server.reset_counters()
        res = _autointerp(env, run, server, *one_by_one, "--budget-usd", "0.007")
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.chat_requests == 0
        assert "$0.0080 spent by earlier runs" in res.stderr
        assert _spent(store) == (pytest.approx(4 * COST), 4, 4000)
        assert _latest_ok(store) == 3
        # $0.011 in all: $0.003 left, so the check and one more label.
        server.reset_counters()
        res = _autointerp(env, run, server, *one_by_one, "--budget-usd", "0.011")
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.chat_requests == 2
        assert _spent(store) == (pytest.approx(6 * COST), 6, 6000)
        assert _latest_ok(store) == 4
        # Bad limits fail when parsed, before the endpoint check or any label request.
        server.reset_counters()
        for flag, value in (("--rpm", "0.5"), ("--budget-usd", "-1"), ("--price-out", "-2")):
            res = _autointerp(env, run, server, *one_by_one, flag, value)
            assert res.returncode == 2 and f"argument {flag}: {value} is not" in res.stderr
        assert server.chat_requests == 0
    # Through the API, the limits are checked before the first paid request too.
    from spd_ray.autointerp.client import LLMSettings
    from spd_ray.autointerp.pipeline import AutointerpOptions, run_autointerp

    with LLMServer(api_key="sk-test", answer=_label_answer) as server:
        llm = LLMSettings(base_url=server.base_url, model=MODEL, api_key="sk-test")
        with pytest.raises(ValueError, match="rpm must be >= 1"):
            run_autointerp(run, AutointerpOptions(llm=llm, rpm=0.5, limit=1))
        assert server.chat_requests == 0


HOLD_STORE_LOCK = (
    "from spd_ray.autointerp.store import LabelStore\n"
    "lock = LabelStore(Path(sys.argv[1]), sys.argv[2]).lock().acquire()"
)


@pytest.mark.slow  # CI keeps the same refusal for train and harvest
def test_a_second_autointerp_on_a_store_exits_at_once_until_the_holder_is_killed(
    harvested: tuple[Path, dict[str, str]],
) -> None:
    run, env = harvested
    store = _clear_store(run)
    with LLMServer(api_key="sk-test", answer=_label_answer) as server:
        holder = hold_lock(HOLD_STORE_LOCK, str(run), MODEL)
        try:
            t0 = time.monotonic()
            res = _autointerp(env, run, server, "--limit", "2")
            err = res.stderr.strip().splitlines()
            assert res.returncode == 2 and len(err) == 1, res.stderr[-2000:]
            assert f"the label store {store} is in use by pid {holder.pid} on host" in err[0]
            assert time.monotonic() - t0 < 30
            assert server.chat_requests == 0
            assert not (store / "labels.jsonl").exists()
        finally:
            kill_9(holder)
        res = _autointerp(env, run, server, "--limit", "2")
        assert res.returncode == 0, res.stderr[-3000:]
        assert server.chat_requests == 1 + 2
    assert _latest_ok(store) == 2
