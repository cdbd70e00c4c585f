"""The viewer in a real browser: Playwright (sync API) driving Debian's Chromium against
`spd-ray app` on the fixture runs (`viewer_url`: a tiny Llama with a harvest and fake-LLM labels,
and a toy tms run without a harvest). Every assertion compares what the page renders with what
the JSON API answers for the same request. A screenshot of each page goes to
$SPD_RAY_SCREENSHOTS (default: artifacts/screenshots/ in the repository) for a person to look at.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

REPO = Path(__file__).resolve().parents[2]
PROMPT = "Once upon a time there was a little girl named Lily."
TIMEOUT_MS = 20_000
GRAPH_TIMEOUT_MS = 90_000


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).is_file():
        pytest.fail(
            f"Chromium not found (looked for `chromium` on PATH and {path}); the browser tests "
            "need Debian's Chromium: `apt-get install chromium` (Playwright's own download is "
            "not used)."
        )
    return path


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    exe = chromium_path()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    pg.on("pageerror", lambda err: errors.append(str(err)))
    yield pg
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"


@pytest.fixture(scope="module")
def shots() -> Path:
    folder = Path(os.environ.get("SPD_RAY_SCREENSHOTS") or REPO / "artifacts" / "screenshots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def api(url: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
        f"{url}/api/{path}", data=data, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def comp_href(rid: str, key: str) -> str:
    return f"#/run/{rid}/component/{urllib.parse.quote(key, safe='')}"


def shoot(page: Page, shots: Path, name: str) -> None:
    page.screenshot(path=str(shots / f"{name}.png"), full_page=True)


def value_of(page: Page, testid: str) -> float:
    return float(page.get_by_test_id(testid).get_attribute("data-value") or "nan")


# -- run list and run page -----------------------------------------------------------------------


def test_run_list_and_run_page(page: Page, viewer_url: str, shots: Path) -> None:
    runs = api(viewer_url, "runs")
    page.goto(f"{viewer_url}/")
    rows = page.get_by_test_id("run-row")
    expect(rows).to_have_count(len(runs))
    assert [rows.nth(i).get_attribute("data-rid") for i in range(len(runs))] == [
        r["id"] for r in runs
    ]
    shoot(page, shots, "01_runs")

    run = api(viewer_url, "runs/lm")
    metrics = api(viewer_url, "runs/lm/metrics")
    rows.filter(has_text="lm").first.get_by_role("link").click()
    expect(page.get_by_test_id("run-name")).to_have_text(run["name"])
    for name, a in run["analyses"].items():
        row = page.locator(f'[data-testid="analysis-row"][data-analysis="{name}"]')
        expect(row).to_have_attribute("data-present", str(a["present"]).lower())
        if not a["present"]:
            expect(row.get_by_test_id("analysis-command")).to_have_text(a["command"])
    # the default charts are the API's default series; hovering one reads out a step and value
    charts = page.get_by_test_id("metric-chart")
    expect(charts).to_have_count(len(metrics["series"]))
    key, points = next(iter(metrics["series"].items()))
    chart = page.locator(f'[data-testid="metric-chart"][data-key="{key}"]')
    box = chart.locator("rect.overlay").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + box["width"] - 2, box["y"] + box["height"] / 2)
    last_step = max(p[0] for p in points)
    expect(chart.get_by_test_id("chart-tooltip")).to_contain_text(f"step {last_step}:")
    # picking another key adds its chart
    other = next(k for k in run["metric_keys"] if k not in metrics["series"])
    page.locator(f'[data-testid="metric-keys"] input[data-key="{other}"]').check()
    expect(charts).to_have_count(len(metrics["series"]) + 1)
    expect(
        page.locator(f'[data-testid="metric-chart"][data-key="{other}"] path.series')
    ).to_have_count(1)
    # CI-L0: one bar per module with the API's value
    ci_rows = page.locator('[data-testid="ci-l0"] tr')
    expect(ci_rows).to_have_count(len(run["ci_l0"]))
    module, l0 = next(iter(run["ci_l0"].items()))
    expect(page.locator(f'[data-testid="ci-l0"] tr[data-label="{module}"]')).to_contain_text(
        f"{l0:.3f}"
    )
    page.get_by_test_id("run-config").locator("summary").click()
    expect(page.get_by_test_id("run-config")).to_contain_text(f'"steps": {run["config"]["steps"]}')
    shoot(page, shots, "02_run_lm")


# -- components ----------------------------------------------------------------------------------


def test_component_list_then_component_page(page: Page, viewer_url: str, shots: Path) -> None:
    listing = api(viewer_url, "runs/lm/components?limit=50")
    page.goto(f"{viewer_url}/#/run/lm/components")
    rows = page.get_by_test_id("component-row")
    expect(rows).to_have_count(min(50, listing["total"]))
    expect(rows.first).to_have_attribute("data-key", listing["items"][0]["key"])
    expect(page.get_by_test_id("pager-info")).to_have_text(
        f"1–{min(50, listing['total'])} of {listing['total']}"
    )
    # one module, sorted by label score, searched by label text: the API's order and filter
    module = listing["modules"][-1]["path"]
    in_module = api(viewer_url, f"runs/lm/components?module={module}&limit=50")
    page.get_by_test_id("module-select").select_option(module)
    expect(page.get_by_test_id("pager-info")).to_contain_text(f"of {in_module['total']}")
    expect(rows.first).to_have_attribute("data-key", in_module["items"][0]["key"])
    page.get_by_test_id("module-select").select_option("")
    by_score = api(viewer_url, "runs/lm/components?sort=score&limit=50")
    page.get_by_test_id("sort-select").select_option("score")
    expect(rows.first).to_have_attribute("data-key", by_score["items"][0]["key"])
    found = api(viewer_url, "runs/lm/components?sort=score&q=detects&limit=50")
    assert found["items"], "the fixture run has labels"
    page.get_by_test_id("search-input").fill("detects")
    expect(rows).to_have_count(len(found["items"]))
    expect(rows.first.locator(".label-cell")).to_contain_text(found["items"][0]["label"])
    shoot(page, shots, "03_components_lm")

    key = found["items"][0]["key"]
    comp = api(viewer_url, f"runs/lm/components/{urllib.parse.quote(key, safe='')}")
    top = api(
        viewer_url, f"runs/lm/components/{urllib.parse.quote(key, safe='')}/examples?kind=top"
    )
    rows.first.locator("td.num").first.click()  # the row, not its link
    expect(page).to_have_url(re.compile(re.escape(comp_href("lm", key)) + "$"))
    expect(page.get_by_test_id("component-key")).to_have_text(key)
    expect(page.get_by_test_id("component-label")).to_have_text(comp["label"]["label"])
    expect(page.get_by_test_id("component-confidence")).to_have_text(comp["label"]["confidence"])
    expect(page.get_by_test_id("stat-count")).to_have_text(str(comp["firing_count"]))
    expect(page.get_by_test_id("stat-score")).to_have_count(len(comp["scores"]))
    # examples: the API's windows, each token's tooltip carries its CI and activation
    examples = page.locator('[data-testid="examples-top"] [data-testid="example"]')
    expect(examples).to_have_count(min(20, top["total"]))
    ex = top["items"][0]
    tokens = examples.first.get_by_test_id("token")
    expect(tokens).to_have_count(len(ex["tokens"]))
    for i in (0, ex["center"], len(ex["tokens"]) - 1):
        title = tokens.nth(i).get_attribute("title") or ""
        assert f"ci {ex['ci'][i]:.3f}" in title and f"act {ex['act'][i]:.3f}" in title, title
    center = tokens.nth(ex["center"])
    assert ex["ci"][ex["center"]] > 0
    by_ci = center.evaluate("el => el.style.backgroundColor")
    assert by_ci.startswith("rgba(230, 110, 20"), by_ci
    page.get_by_test_id("color-act").check()
    by_act = center.evaluate("el => el.style.backgroundColor")
    sign = "214, 39, 40" if ex["act"][ex["center"]] >= 0 else "31, 119, 180"
    assert sign in by_act, by_act
    expect(page.locator('[data-testid="input-tokens"] tbody tr')).to_have_count(
        len(comp["input_tokens"])
    )
    expect(page.get_by_test_id("correlated-link")).to_have_count(len(comp["correlated"]))
    shoot(page, shots, "04_component_lm")
    if comp["correlated"]:
        other = comp["correlated"][0]["key"]
        page.get_by_test_id("correlated-link").first.click()
        expect(page.get_by_test_id("component-key")).to_have_text(other)


def test_unknown_component_and_missing_harvest_are_explained(
    page: Page, viewer_url: str, shots: Path
) -> None:
    page.goto(f"{viewer_url}/{comp_href('lm', 'model.layers.0.mlp.up_proj:99999')}")
    expect(page.get_by_test_id("error")).to_contain_text("404")
    tms = api(viewer_url, "runs/tms")
    page.goto(f"{viewer_url}/{comp_href('tms', 'linear1:0')}")
    expect(page.get_by_test_id("missing-command")).to_have_text(
        tms["analyses"]["harvest"]["command"]
    )
    page.goto(f"{viewer_url}/#/run/tms/components")
    expect(page.get_by_test_id("missing")).to_have_attribute("data-missing", "harvest")
    expect(page.get_by_test_id("missing-command")).to_have_text(
        tms["analyses"]["harvest"]["command"]
    )
    assert tms["analyses"]["harvest"]["command"].startswith("spd-ray harvest ")
    shoot(page, shots, "05_components_tms_missing_harvest")
    page.goto(f"{viewer_url}/#/run/tms")
    row = page.locator('[data-testid="analysis-row"][data-analysis="harvest"]')
    expect(row.get_by_test_id("analysis-command")).to_have_text(
        tms["analyses"]["harvest"]["command"]
    )
    shoot(page, shots, "06_run_tms")


# -- prompt --------------------------------------------------------------------------------------


def run_prompt(page: Page, viewer_url: str) -> None:
    page.goto(f"{viewer_url}/#/run/lm/prompt")
    page.get_by_test_id("prompt-text").fill(PROMPT)
    page.get_by_test_id("prompt-run").click()


def test_prompt_firing_tokens_link_to_components(page: Page, viewer_url: str, shots: Path) -> None:
    res = api(viewer_url, "runs/lm/prompt", {"text": PROMPT})
    examples = api(viewer_url, "runs/lm/prompts")["prompts"]
    assert examples, "the LM run offers example prompts"
    page.goto(f"{viewer_url}/#/run/lm/prompt")
    expect(page.locator('[data-testid="prompt-select"] option')).to_have_count(1 + len(examples))
    page.get_by_test_id("prompt-select").select_option(str(len(examples) - 1))
    expect(page.get_by_test_id("prompt-text")).to_have_value(examples[-1])
    page.get_by_test_id("prompt-text").fill(PROMPT)
    page.get_by_test_id("prompt-run").click()
    strip = page.get_by_test_id("prompt-token")
    expect(strip).to_have_count(len(res["tokens"]))
    firing = page.locator('[data-testid="firing-list"] [data-testid="firing-component"]')
    # the last position is selected first; then click another token
    expect(firing).to_have_count(len(res["firing"][-1]))
    target = page.locator('[data-testid="pred-target"] tbody tr')
    expect(target).to_have_count(len(res["predictions"]["target"][-1]))
    expect(target.first).to_have_attribute(
        "data-id", str(res["predictions"]["target"][-1][0]["id"])
    )
    expect(page.locator('[data-testid="pred-masked"] tbody tr').first).to_have_attribute(
        "data-id", str(res["predictions"]["masked"][-1][0]["id"])
    )
    pos = 2
    strip.nth(pos).click()
    expect(firing).to_have_count(len(res["firing"][pos]))
    shown = {firing.nth(i).get_attribute("data-key") for i in range(firing.count())}
    assert shown == {f["key"] for f in res["firing"][pos]}
    expect(page.locator('[data-testid="pred-target"] tbody tr').first).to_have_attribute(
        "data-id", str(res["predictions"]["target"][pos][0]["id"])
    )
    shoot(page, shots, "07_prompt_lm")
    key = res["firing"][pos][0]["key"]
    page.locator(f'[data-testid="firing-component"][data-key="{key}"]').click()
    expect(page).to_have_url(re.compile(re.escape(comp_href("lm", key)) + "$"))
    expect(page.get_by_test_id("component-key")).to_have_text(key)


def test_graph_and_interventions(page: Page, viewer_url: str, shots: Path) -> None:
    res = api(viewer_url, "runs/lm/prompt", {"text": PROMPT})
    last = len(res["tokens"]) - 1
    run_prompt(page, viewer_url)
    expect(page.get_by_test_id("prompt-token")).to_have_count(len(res["tokens"]))

    # keep every subcomponent (with the weight delta) = the target: no change
    page.get_by_test_id("intervene-mode").select_option("keep")
    page.get_by_test_id("intervene-all").click()
    page.get_by_test_id("intervene-run").click()
    expect(page.get_by_test_id("intervene-maxdiff")).to_be_visible()
    assert value_of(page, "intervene-maxdiff") < 1e-5
    assert abs(value_of(page, "intervene-kl")) < 1e-5
    expect(page.get_by_test_id("intervene-top1")).to_have_text("unchanged")

    # ablate the top-CI subcomponents at the last position: a change, the API's number
    page.get_by_test_id("intervene-clear").click()
    page.get_by_test_id("intervene-mode").select_option("ablate")
    page.get_by_test_id("intervene-topci").click()
    top3 = [f["key"] for f in res["firing"][last][:3]]
    chips = page.get_by_test_id("intervene-chip")
    expect(chips).to_have_count(len(top3))
    assert [chips.nth(i).get_attribute("data-key") for i in range(len(top3))] == top3
    page.get_by_test_id("intervene-run").click()
    expect(page.locator('[data-testid="intervene-intervened"]')).to_be_visible()
    want = api(
        viewer_url,
        "runs/lm/intervene",
        {
            "text": PROMPT,
            "mode": "ablate",
            "position": last,
            "nodes": [{"position": last, "key": k} for k in top3],
            "top_k": 10,
        },
    )
    got = value_of(page, "intervene-maxdiff")
    assert got > 1e-6
    assert got == pytest.approx(want["max_abs_diff"], rel=1e-4, abs=1e-7)
    expect(page.locator('[data-testid="intervene-intervened"] tbody tr').first).to_have_attribute(
        "data-id", str(want["intervened"][0]["id"])
    )

    # the attribution graph streams progress, then draws its edges as SVG paths
    page.get_by_test_id("graph-run").click()
    edges = page.locator('[data-testid="graph-svg"] path.edge')
    expect(page.get_by_test_id("graph-progress-text")).to_contain_text(
        "done", timeout=GRAPH_TIMEOUT_MS
    )
    n = edges.count()
    assert n > 0
    progress = page.get_by_test_id("graph-progress")
    assert progress.evaluate("el => el.value === el.max && el.max >= 1")
    graph = api(viewer_url, "runs/lm/graph", {"text": PROMPT, "max_edges": 5000})
    assert n == len(graph["edges"])
    expect(page.get_by_test_id("graph-edge-count")).to_contain_text(f"{n} of {n} edges shown")
    # the threshold slider hides edges below fraction**2 of the largest |value|
    page.get_by_test_id("edge-threshold").fill("0.5")
    biggest = max(abs(e["value"]) for e in graph["edges"])
    kept = sum(abs(e["value"]) >= biggest * 0.25 for e in graph["edges"])
    expect(page.locator('[data-testid="graph-svg"] path.edge[display="inline"]')).to_have_count(
        kept
    )
    page.get_by_test_id("edge-threshold").fill("0")
    # hover highlights a node's edges; click pins it and offers its component page
    degrees = {n["id"]: 0 for n in graph["nodes"]}
    for e in graph["edges"]:
        degrees[e["source"]] += 1
        degrees[e["target"]] += 1
    node = next(n for n in graph["nodes"] if n["key"] is not None and degrees[n["id"]] > 0)
    degree = degrees[node["id"]]
    circle = page.locator(f'[data-testid="graph-node"][data-id="{node["id"]}"]')
    circle.dispatch_event("mouseenter")
    expect(page.locator('[data-testid="graph-svg"] path.edge.hl')).to_have_count(degree)
    expect(page.get_by_test_id("graph-hover")).to_contain_text(node["key"])
    circle.dispatch_event("click")
    expect(page.get_by_test_id("graph-pin-link")).to_have_text(node["key"])
    # wheel zooms, drag pans
    view = page.locator('[data-testid="graph-svg"] g.viewport')
    before = view.get_attribute("transform")
    box = page.get_by_test_id("graph-svg").bounding_box()
    assert box is not None
    page.mouse.move(box["x"] + 40, box["y"] + 40)
    page.mouse.wheel(0, -300)
    expect(view).not_to_have_attribute("transform", before or "")
    zoomed = view.get_attribute("transform") or ""
    page.mouse.down()
    page.mouse.move(box["x"] + 140, box["y"] + 90, steps=4)
    page.mouse.up()
    assert view.get_attribute("transform") != zoomed
    shoot(page, shots, "08_prompt_graph_intervention_lm")


def test_toy_prompt_is_a_feature_vector(page: Page, viewer_url: str, shots: Path) -> None:
    run = api(viewer_url, "runs/tms")
    n = run["config"]["target_model"]["n_features"]
    x = [0.0] * n
    x[1], x[3] = 0.8, 1.0
    res = api(viewer_url, "runs/tms/prompt", {"x": x})
    page.goto(f"{viewer_url}/#/run/tms/prompt")
    expect(page.get_by_test_id("feature-input")).to_have_count(n)
    page.get_by_test_id("feature-shortcut").fill("feature 1 = 0.8, feature 3 = 1")
    page.get_by_test_id("prompt-run").click()
    feats = page.get_by_test_id("prompt-token")
    expect(feats).to_have_count(len(res["tokens"]))
    assert [feats.nth(i).inner_text() for i in range(feats.count())] == [
        t["text"] for t in res["tokens"]
    ]
    expect(page.get_by_test_id("feature-input").nth(1)).to_have_value("0.8")
    expect(
        page.locator('[data-testid="firing-list"] [data-testid="firing-component"]')
    ).to_have_count(len(res["firing"][0]))
    outputs = page.locator('[data-testid="pred-target"] tbody tr')
    expect(outputs).to_have_count(len(res["predictions"]["target"][0]))
    expect(outputs.first).to_contain_text(res["predictions"]["target"][0][0]["text"])
    page.get_by_test_id("intervene-topci").click()
    page.get_by_test_id("intervene-run").click()
    expect(page.get_by_test_id("intervene-maxdiff")).to_be_visible()
    want = api(
        viewer_url,
        "runs/tms/intervene",
        {
            "x": x,
            "mode": "ablate",
            "nodes": [{"position": 0, "key": f["key"]} for f in res["firing"][0][:3]],
        },
    )
    assert value_of(page, "intervene-maxdiff") == pytest.approx(want["max_abs_diff"], rel=1e-4)
    assert want["max_abs_diff"] > 0
    page.get_by_test_id("graph-run").click()
    expect(page.get_by_test_id("graph-progress-text")).to_contain_text(
        "done", timeout=GRAPH_TIMEOUT_MS
    )
    assert page.locator('[data-testid="graph-svg"] path.edge').count() > 0
    shoot(page, shots, "09_prompt_tms")
