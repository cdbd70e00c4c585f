"""Every viewer endpoint through FastAPI's test client on the fixture runs (a tiny Llama with a
harvest and labels, a toy run with neither), checked against the stores and the model directly;
404s and bad parameters; the access token; the real `spd-ray app` on a non-loopback address."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from viewer_fixtures import LABEL_MODEL, N_LABELLED, sse_events, start_app, stop_app

from spd_ray.app.server import create_app
from spd_ray.harvest.store import Harvest
from spd_ray.io import read_jsonl

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside."


@pytest.fixture(scope="module")
def client(viewer_runs: tuple[dict[str, Path], dict[str, str]]) -> TestClient:
    torch.set_num_threads(1)
    runs, _ = viewer_runs
    return TestClient(create_app([runs["lm"], runs["tms"]]))


@pytest.fixture(scope="module")
def lm(viewer_runs: tuple[dict[str, Path], dict[str, str]]) -> Path:
    return viewer_runs[0]["lm"]


def ok(resp: Any) -> Any:
    assert resp.status_code == 200, resp.text
    return resp.json()


# -- runs ----------------------------------------------------------------------------------------


def test_runs_and_overview(client: TestClient, lm: Path) -> None:
    assert ok(client.get("/api/health")) == {"ok": True}
    runs = ok(client.get("/api/runs"))
    assert [(r["id"], r["kind"]) for r in runs] == [("lm", "lm"), ("tms", "toy")]
    assert runs[0]["step"] == read_jsonl(lm / "metrics.jsonl")[-1]["step"]
    assert ok(client.get("/api/runs/tms"))["n_inputs"] == 5
    view = ok(client.get("/api/runs/lm"))
    assert view["analyses"]["harvest"]["present"] is True
    assert view["analyses"]["labels"]["info"]["model"] == LABEL_MODEL
    assert view["analyses"]["labels"]["info"]["n_labels"] == N_LABELLED
    assert view["analyses"]["attributions"] == {
        "present": False,
        "command": f"spd-ray attributions {lm}",
        "info": {},
    }
    h = Harvest(lm)
    assert [(m["path"], m["C"]) for m in view["modules"]] == [
        (m["path"], m["C"]) for m in h.meta["modules"]
    ]
    # CI-L0 per module: the latest logged value of each module's l0 metric.
    rows = read_jsonl(lm / "metrics.jsonl")
    for path, value in view["ci_l0"].items():
        logged = [(r["step"], r[k]) for r in rows for k in r if k.endswith(f"/l0/{path}")]
        assert value == max(logged)[1]
    assert len(view["ci_l0"]) == len(view["modules"])
    assert view["step"] == rows[-1]["step"] and view["config"]["steps"] == view["steps"]


def test_a_run_without_analyses_says_what_is_missing_and_how_to_make_it(
    client: TestClient, viewer_runs: tuple[dict[str, Path], dict[str, str]]
) -> None:
    tms = viewer_runs[0]["tms"]
    view = ok(client.get("/api/runs/tms"))
    for what, command in [
        ("harvest", f"spd-ray harvest {tms}"),
        ("attributions", f"spd-ray attributions {tms}"),
    ]:
        assert view["analyses"][what]["present"] is False
        assert view["analyses"][what]["command"] == command
    assert view["analyses"]["labels"]["present"] is False
    assert "spd-ray autointerp" in view["analyses"]["labels"]["command"]
    for url in ("/api/runs/tms/components", "/api/runs/tms/components/linear1:0"):
        resp = client.get(url)
        assert resp.status_code == 404
        assert resp.json()["missing"] == "harvest"
        assert resp.json()["command"] == f"spd-ray harvest {tms}"
    # The toy prompt still works: it needs the model only.
    out = ok(client.post("/api/runs/tms/prompt", json={"x": [0, 0.8, 0, 0, 0]}))
    assert out["tokens"] == [{"id": 1, "text": "x[1]=0.8"}]
    assert len(out["predictions"]["target"]) == 1


def test_metrics_are_the_logged_series(client: TestClient, lm: Path) -> None:
    rows = read_jsonl(lm / "metrics.jsonl")
    out = ok(client.get("/api/runs/lm/metrics"))
    assert out["series"], "default series"
    key = out["keys"][0]
    got = ok(client.get(f"/api/runs/lm/metrics?keys={key}"))["series"][key]
    assert got == [[r["step"], r[key]] for r in rows if key in r]
    assert client.get("/api/runs/lm/metrics?keys=nope").status_code == 404
    assert client.get("/api/runs/nope/metrics").status_code == 404


def test_figures_only_from_inside_the_run(
    client: TestClient, viewer_runs: tuple[dict[str, Path], dict[str, str]]
) -> None:
    tms = viewer_runs[0]["tms"]
    figures = ok(client.get("/api/runs/tms"))["figures"]
    on_disk = sorted(str(p.relative_to(tms)) for p in (tms / "figures").rglob("*.png"))
    assert figures == on_disk and figures, "the short tms run saves figures"
    resp = client.get(f"/api/runs/tms/{figures[0]}")
    assert resp.status_code == 200
    assert resp.content == (tms / figures[0]).read_bytes()
    secret = tms.parent / "secret.png"
    secret.write_bytes(b"not yours")
    for bad in (
        "figures/..%2F..%2Fsecret.png",
        "figures/%2E%2E/%2E%2E/secret.png",
        "figures/..%2Fconfig.yaml",
        "figures/%2Fetc%2Fpasswd",
        "figures/..%2Fmetrics.jsonl",
    ):
        resp = client.get(f"/api/runs/tms/{bad}")
        assert resp.status_code == 404, bad
        assert b"not yours" not in resp.content
    assert client.get("/static/..%2Fserver.py").status_code == 404
    assert client.get("/static/..%2F..%2Fapp%2Fserver.py").status_code == 404


# -- components ----------------------------------------------------------------------------------


def test_component_list_sorts_filters_and_pages(client: TestClient, lm: Path) -> None:
    h = Harvest(lm)
    out = ok(client.get("/api/runs/lm/components?limit=1000"))
    assert out["total"] == len(h.keys)
    dens = [r["firing_density"] for r in out["items"]]
    assert dens == sorted(dens, reverse=True)
    top = out["items"][0]
    assert top["firing_count"] == int(h.summary(top["key"])["firing_count"])
    module = h.meta["modules"][1]
    out = ok(client.get(f"/api/runs/lm/components?module={module['path']}&sort=index&limit=7"))
    assert out["total"] == module["C"]
    assert [r["index"] for r in out["items"]] == list(range(7))
    page = ok(client.get(f"/api/runs/lm/components?module={module['path']}&sort=index&offset=5"))
    assert page["items"][0]["index"] == 5
    labelled = ok(client.get("/api/runs/lm/components?q=DETECTS&limit=1000"))
    assert labelled["total"] == N_LABELLED
    assert all(r["label"] == f"detects {r['key']}" for r in labelled["items"])
    by_score = ok(client.get("/api/runs/lm/components?sort=score&limit=1000"))["items"]
    scored = [r["score"] for r in by_score if r["score"] is not None]
    assert len(scored) == N_LABELLED and scored == sorted(scored, reverse=True)
    assert all(r["score"] is None for r in by_score[N_LABELLED:])
    assert client.get("/api/runs/lm/components?sort=bogus").status_code == 422
    assert client.get("/api/runs/lm/components?limit=0").status_code == 422
    assert client.get("/api/runs/lm/components?module=nope").status_code == 404


def test_component_page_matches_the_stores(client: TestClient, lm: Path) -> None:
    h = Harvest(lm)
    key = ok(client.get("/api/runs/lm/components?q=detects&limit=1"))["items"][0]["key"]
    out = ok(client.get(f"/api/runs/lm/components/{key}"))
    assert out["label"]["label"] == f"detects {key}" and out["label"]["model"] == LABEL_MODEL
    assert set(out["scores"]) == {"detection"}
    s = h.summary(key)
    assert out["firing_count"] == s["firing_count"] and out["mean_ci"] == pytest.approx(
        s["mean_ci"]
    )
    ranked = h.tokens(key, "input", "precision", 10)
    assert [t["id"] for t in out["input_tokens"]] == ranked.index.tolist()
    assert [t["value"] for t in out["input_tokens"]] == pytest.approx(ranked.value.tolist())
    corr = h.correlated(key, "pmi", 10)
    assert [c["key"] for c in out["correlated"]] == [h.keys[i] for i in corr.index]
    assert out["attributions"] is None and out["cluster"] is None
    assert client.get("/api/runs/lm/components/model.layers.0.mlp.up_proj:99999").status_code == 404
    assert client.get("/api/runs/lm/components/nomodule:1").status_code == 404


def test_examples_are_the_harvests(client: TestClient, lm: Path) -> None:
    h = Harvest(lm)
    key = h.keys[int(np.argmax(h.firing_counts()))]
    found = h.examples(key)
    out = ok(client.get(f"/api/runs/lm/components/{key}/examples?limit=500"))
    assert out["total"] == len(found)
    for item, e in zip(out["items"], found, strict=True):
        assert (item["kind"], item["rank"], item["doc"]) == (e.kind, e.rank, e.doc)
        assert e.tokens is not None
        kept = [t for t in e.tokens if t >= 0]
        assert [t["id"] for t in item["tokens"]] == kept
        assert item["tokens"][item["center"]]["id"] == e.tokens[e.center]
        assert item["ci"][item["center"]] == pytest.approx(e.ci[e.center])
    top = ok(client.get(f"/api/runs/lm/components/{key}/examples?kind=top&limit=3"))
    assert top["total"] == sum(e.kind == "top" for e in found) and len(top["items"]) == 3
    assert client.get(f"/api/runs/lm/components/{key}/examples?kind=bogus").status_code == 422


# -- prompts -------------------------------------------------------------------------------------


def test_prompt_firing_and_predictions_match_the_model(client: TestClient) -> None:
    from spd_ray.app import compute

    app_run = client.app.state.runs["lm"]  # type: ignore[attr-defined]
    prompts = ok(client.get("/api/runs/lm/prompts"))["prompts"]
    assert prompts and all(isinstance(p, str) and p for p in prompts)
    out = ok(client.post("/api/runs/lm/prompt", json={"text": PROMPT, "top_k": 3}))
    ids = app_run.tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    assert [t["id"] for t in out["tokens"]] == ids
    model = app_run.loaded.model
    batch = torch.tensor([ids])
    ci = compute.prompt_ci(model, batch)
    for s, firing in enumerate(out["firing"]):
        expect = {f"{p}:{c}": float(v[s, c]) for p, v in ci.items() for c in range(v.shape[1])}
        expect = {k: v for k, v in expect.items() if v > 0}
        assert len(expect) < 1000  # under the cap: every firing subcomponent is listed
        assert {f["key"]: f["ci"] for f in firing} == pytest.approx(expect)
        assert [f["ci"] for f in firing] == sorted((f["ci"] for f in firing), reverse=True)
    with torch.no_grad():
        probs = torch.softmax(model(batch)[0].double(), -1)
    for s, top in enumerate(out["predictions"]["target"]):
        p, i = probs[s].topk(3)
        assert [t["id"] for t in top] == i.tolist()
        assert [t["p"] for t in top] == pytest.approx(p.tolist(), abs=1e-6)
    assert out["predictions"]["masked"] != out["predictions"]["target"]


def test_bad_prompts_are_422_naming_the_field(client: TestClient) -> None:
    for body, word in [
        ({}, "exactly one"),
        ({"text": "a", "tokens": [1]}, "exactly one"),
        ({"text": ""}, "empty"),
        ({"tokens": [10**7]}, "tokens"),
        ({"tokens": [1], "nonsense": 1}, "nonsense"),
        ({"x": [1.0, 2.0]}, "x"),
    ]:
        resp = client.post("/api/runs/lm/prompt", json=body)
        assert resp.status_code == 422, body
        assert word in json.dumps(resp.json()), (body, resp.json())
    assert client.post("/api/runs/tms/prompt", json={"x": [1.0]}).status_code == 422
    assert client.post("/api/runs/tms/prompt", json={"text": "hi"}).status_code == 422
    assert client.post("/api/runs/nope/prompt", json={"text": "hi"}).status_code == 404


def test_interventions_reproduce_and_change_the_output(client: TestClient) -> None:
    body = {"text": PROMPT}
    prompt = ok(client.post("/api/runs/lm/prompt", json=body))
    last = len(prompt["tokens"]) - 1
    keys = [f"{m['path']}:{c}" for m in prompt["modules"] for c in range(m["C"])]
    nothing = ok(client.post("/api/runs/lm/intervene", json={**body, "mode": "ablate"}))
    assert nothing["max_abs_diff"] < 1e-5 and nothing["position"] == last
    assert [t["id"] for t in nothing["intervened"]] == [t["id"] for t in nothing["target"]]
    keep_all = ok(
        client.post("/api/runs/lm/intervene", json={**body, "mode": "keep", "components": keys})
    )
    assert keep_all["max_abs_diff"] < 1e-5 and keep_all["kl"] < 1e-8
    top = [{"position": last, "key": f["key"]} for f in prompt["firing"][last][:10]]
    ablated = ok(
        client.post("/api/runs/lm/intervene", json={**body, "mode": "ablate", "nodes": top})
    )
    # A 4-step decomposition: its components are small next to the weight delta, so the change is
    # small in absolute terms (here KL ~2e-5, probabilities moved by ~8e-6 with the packages of
    # 2026-12-07; a 50-step run moves them by ~0.05), yet far above the float noise of keeping
    # everything (0 or ~1e-9).
    noise = max(keep_all["max_abs_diff"], 1e-9)
    assert ablated["kl"] > 1e-7 and ablated["max_abs_diff"] > 100 * noise
    assert ablated["target"] == keep_all["target"]
    for bad in (
        {"mode": "ablate", "nodes": [{"position": 999, "key": keys[0]}]},
        {"mode": "ablate", "nodes": [{"position": 0, "key": "nomodule:1"}]},
        {"mode": "ablate", "components": [keys[0].rpartition(":")[0] + ":9999"]},
        {"mode": "sideways"},
    ):
        assert client.post("/api/runs/lm/intervene", json={**body, **bad}).status_code == 422


def test_graph_and_its_stream_agree(client: TestClient) -> None:
    body = {"tokens": list(range(20, 52)), "max_edges": 300}
    graph = ok(client.post("/api/runs/lm/graph", json=body))
    assert 0 < len(graph["edges"]) <= 300 <= graph["n_edges_total"]
    ids = {n["id"] for n in graph["nodes"]}
    assert all(e["source"] in ids and e["target"] in ids for e in graph["edges"])
    mags = [abs(e["value"]) for e in graph["edges"]]
    assert mags == sorted(mags, reverse=True)
    comp = next(n for n in graph["nodes"] if n["key"])
    assert comp["text"] == comp["key"]
    with client.stream("POST", "/api/runs/lm/graph/stream", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events("".join(resp.iter_text()))
    names = [name for name, _ in events]
    assert names[-1] == "result" and names.count("progress") >= 1
    done = [d for name, d in events if name == "progress"]
    assert done[-1]["done"] == done[-1]["total"]
    assert events[-1][1]["edges"] == graph["edges"]
    assert client.post("/api/runs/lm/graph", json={**body, "max_edges": 5001}).status_code == 422
    resp = client.post("/api/runs/lm/graph/stream", json={**body, "tokens": []})
    assert resp.status_code == 422


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = ok(client.get("/openapi.json"))["paths"]
    for p in (
        "/api/runs",
        "/api/runs/{rid}",
        "/api/runs/{rid}/metrics",
        "/api/runs/{rid}/components",
        "/api/runs/{rid}/components/{key}",
        "/api/runs/{rid}/components/{key}/examples",
        "/api/runs/{rid}/prompt",
        "/api/runs/{rid}/graph",
        "/api/runs/{rid}/graph/stream",
        "/api/runs/{rid}/intervene",
    ):
        assert p in paths, p


# -- access ----------------------------------------------------------------------------------------


def test_a_token_guards_every_request(viewer_runs: tuple[dict[str, Path], dict[str, str]]) -> None:
    c = TestClient(create_app([viewer_runs[0]["tms"]], token="s3cret"))
    for url in ("/", "/api/runs", "/api/runs/tms", "/static/app.js", "/openapi.json"):
        assert c.get(url).status_code == 403, url
    assert c.get("/api/runs?token=wrong").status_code == 403
    assert c.get("/api/runs", headers={"X-SPD-Ray-Token": "s3cret"}).status_code == 200
    assert c.get("/?token=s3cret").status_code == 200  # sets the cookie
    assert c.get("/api/runs").status_code == 200  # the cookie rides along


def test_app_on_a_non_loopback_address_needs_its_token(
    viewer_runs: tuple[dict[str, Path], dict[str, str]],
) -> None:
    runs, env = viewer_runs
    proc, url = start_app(env, str(runs["tms"]), "--host", "0.0.0.0")
    try:
        assert "?token=" in url
        port = url.split(":")[2].split("/")[0]
        token = url.split("?token=")[1]
        base = f"http://127.0.0.1:{port}"
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/api/runs", timeout=10)
        assert err.value.code == 403
        with urllib.request.urlopen(f"{base}/api/runs?token={token}", timeout=10) as resp:
            assert json.loads(resp.read())[0]["id"] == "tms"
    finally:
        stop_app(proc)


def test_app_binds_to_loopback_by_default(viewer_url: str) -> None:
    assert viewer_url.startswith("http://127.0.0.1:") and "token" not in viewer_url
    with urllib.request.urlopen(f"{viewer_url}/api/runs", timeout=10) as resp:
        assert [r["id"] for r in json.loads(resp.read())] == ["lm", "tms"]
