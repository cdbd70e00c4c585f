// The run list (#/) and the Run page (#/run/<rid>).
import { figureUrl, get, runInfo, runPath } from "./api.js";
import { barTable, lineChart } from "./chart.js";
import { commandBox, errorBox, fmt, h, loading, replace } from "./dom.js";

export async function runsPage(root) {
  const runs = await get("runs");
  replace(
    root,
    h("h1", {}, "Runs"),
    runs.length
      ? h(
          "table",
          { class: "grid", testid: "runs-table" },
          h("thead", {}, h("tr", {}, ["Run", "Kind", "Path"].map((c) => h("th", {}, c)))),
          h(
            "tbody",
            {},
            runs.map((r) =>
              h(
                "tr",
                { testid: "run-row", "data-rid": r.id },
                h("td", {}, h("a", { href: `#/run/${encodeURIComponent(r.id)}` }, r.name || r.id)),
                h("td", {}, r.kind),
                h("td", { class: "mono muted" }, r.path),
              ),
            ),
          ),
        )
      : h("p", { class: "muted" }, "No runs were given to the server."),
  );
}

function figureStep(rel) {
  const m = rel.match(/step[-_]?(\d+)\//) || rel.match(/_(\d+)\.[A-Za-z]+$/);
  return m ? Number(m[1]) : null;
}

function figuresSection(rid, figures) {
  const box = h("div", { class: "figures", testid: "figures" });
  if (!figures.length) return [h("p", { class: "muted" }, "No figures in this run."), box];
  const steps = [...new Set(figures.map(figureStep).filter((x) => x !== null))].sort((a, b) => a - b);
  const select = h(
    "select",
    { testid: "figure-step" },
    steps.map((st) => h("option", { value: String(st) }, `step ${st}`)),
    h("option", { value: "all" }, "all steps"),
  );
  if (steps.length) select.value = String(steps[steps.length - 1]);
  const show = () => {
    const want = select.value;
    const shown = figures.filter((f) => {
      const st = figureStep(f);
      return want === "all" || st === null || String(st) === want;
    });
    replace(
      box,
      shown.map((rel) =>
        h(
          "figure",
          { testid: "figure", "data-rel": rel },
          h(
            "a",
            { href: figureUrl(rid, rel), target: "_blank", rel: "noopener" },
            h("img", { src: figureUrl(rid, rel), loading: "lazy", alt: rel }),
          ),
          h("figcaption", { class: "mono" }, rel),
        ),
      ),
    );
  };
  select.addEventListener("change", show);
  show();
  return [steps.length ? h("div", { class: "controls" }, "Figures of ", select) : null, box];
}

function metricsSection(rid, allKeys) {
  const cache = new Map();
  const selected = new Set();
  const charts = h("div", { class: "charts", testid: "metric-charts" });
  const logBox = h("input", { type: "checkbox", testid: "metric-log" });
  const filter = h("input", { type: "search", placeholder: "filter metric keys", testid: "metric-filter" });
  const list = h("div", { class: "key-list", testid: "metric-keys" });

  const draw = async () => {
    const need = [...selected].filter((k) => !cache.has(k));
    if (need.length) {
      charts.append(loading("Loading metrics…"));
      try {
        const res = await get(`${runPath(rid)}/metrics`, { keys: need.join(",") });
        for (const k of need) cache.set(k, res.series[k] || []);
      } catch (err) {
        replace(charts, errorBox(err));
        return;
      }
    }
    replace(
      charts,
      selected.size
        ? [...selected].map((k) => lineChart(k, cache.get(k) || [], { logY: logBox.checked }))
        : h("p", { class: "muted" }, "Pick metrics on the left."),
    );
  };
  const drawList = () => {
    const f = filter.value.toLowerCase();
    replace(
      list,
      allKeys
        .filter((k) => !f || k.toLowerCase().includes(f))
        .map((k) => {
          const cb = h("input", { type: "checkbox", "data-key": k, checked: selected.has(k) });
          cb.addEventListener("change", () => {
            if (cb.checked) selected.add(k);
            else selected.delete(k);
            draw();
          });
          return h("label", { class: "key", testid: "metric-key" }, cb, " ", k);
        }),
    );
  };
  filter.addEventListener("input", drawList);
  logBox.addEventListener("change", draw);

  const section = h(
    "div",
    { class: "metrics" },
    h("div", { class: "metric-picker" }, filter, h("label", {}, logBox, " log scale"), list),
    charts,
  );
  const init = async () => {
    charts.append(loading("Loading metrics…"));
    const res = await get(`${runPath(rid)}/metrics`);
    for (const [k, pts] of Object.entries(res.series)) {
      cache.set(k, pts);
      selected.add(k);
    }
    if (!allKeys.length) allKeys.push(...res.keys);
    drawList();
    await draw();
  };
  init().catch((err) => replace(charts, errorBox(err)));
  return section;
}

function infoText(info) {
  if (!info || typeof info !== "object") return "";
  return Object.entries(info)
    .map(([k, v]) => `${k}: ${Array.isArray(v) ? v.join(", ") : typeof v === "object" && v !== null ? JSON.stringify(v) : v}`)
    .join(" · ");
}

function analysesTable(rid, analyses) {
  const pages = { harvest: "components", labels: "components" };
  return h(
    "table",
    { class: "grid", testid: "analyses" },
    h("thead", {}, h("tr", {}, ["Analysis", "Status", "Details / command"].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      Object.entries(analyses).map(([name, a]) =>
        h(
          "tr",
          { testid: "analysis-row", "data-analysis": name, "data-present": String(a.present) },
          h("td", {}, name),
          h("td", {}, h("span", { class: a.present ? "badge ok" : "badge missing" }, a.present ? "present" : "missing")),
          h(
            "td",
            {},
            a.present
              ? [
                  h("span", { class: "muted" }, infoText(a.info)),
                  pages[name] ? [" ", h("a", { href: `#/run/${encodeURIComponent(rid)}/${pages[name]}` }, "browse")] : null,
                ]
              : commandBox(a.command, "analysis-command"),
          ),
        ),
      ),
    ),
  );
}

export async function runPage(root, { rid }) {
  const run = await runInfo(rid);
  const base = `#/run/${encodeURIComponent(rid)}`;
  const ciRows = Object.entries(run.ci_l0 || {});
  replace(
    root,
    h(
      "div",
      { class: "run-head" },
      h("h1", { testid: "run-name" }, run.name || run.id),
      h(
        "p",
        { class: "muted" },
        h("span", { class: "badge" }, run.kind),
        " step ",
        h("span", { testid: "run-step" }, fmt(run.step)),
        run.steps ? ` of ${run.steps}` : "",
        run.finished ? " · finished" : " · not finished",
        " · ",
        h("span", { class: "mono" }, run.path),
      ),
      h(
        "p",
        {},
        h("a", { class: "button", href: `${base}/components`, testid: "goto-components" }, "Components"),
        " ",
        h("a", { class: "button", href: `${base}/prompt`, testid: "goto-prompt" }, "Prompt"),
      ),
    ),
    h("h2", {}, "Analyses"),
    analysesTable(rid, run.analyses || {}),
    h("h2", {}, "Metrics"),
    metricsSection(rid, [...(run.metric_keys || [])]),
    h("h2", {}, "CI-L0 per layer"),
    ciRows.length ? barTable(ciRows, { testid: "ci-l0" }) : h("p", { class: "muted", testid: "ci-l0" }, "No CI-L0 values logged."),
    h("h2", {}, "Modules"),
    h("p", { class: "mono", testid: "run-modules" }, (run.modules || []).map((m) => `${m.path} (C=${m.C})`).join(" · ")),
    h("h2", {}, "Figures"),
    figuresSection(rid, run.figures || []),
    h(
      "details",
      { testid: "run-config" },
      h("summary", {}, "Config"),
      h("pre", { class: "config" }, JSON.stringify(run.config, null, 2)),
    ),
  );
}
