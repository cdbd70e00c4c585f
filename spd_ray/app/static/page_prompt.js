// The Prompt page (#/run/<rid>/prompt): firing subcomponents per token, target vs CI-masked
// predictions, the attribution graph (SSE progress) and an intervention panel.
import { get, post, postStream, runInfo, runPath } from "./api.js";
import { append, ciColor, errorBox, fmt, h, loading, replace, tokText } from "./dom.js";
import { graphLegend, renderGraph } from "./graph.js";
import { button, interventionPanel, predTable } from "./intervene.js";
import { componentHref } from "./page_components.js";

function toyInputCount(run) {
  const c = run.config || {};
  return run.n_inputs ?? c.target_model?.n_features ?? c.task_config?.n_features ?? null;
}

/** "feature 1 = 0.8, x[3]=1" -> [[1, 0.8], [3, 1]] */
export function parseShortcuts(text) {
  const out = [];
  const re = /(?:feature|f|x)\s*\[?\s*(\d+)\s*\]?\s*[=:]\s*(-?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?)/gi;
  for (const m of text.matchAll(re)) out.push([Number(m[1]), Number(m[2])]);
  return out;
}

export async function promptPage(root, { rid, params }) {
  const run = await runInfo(rid);
  const isToy = run.kind === "toy";
  const valueName = isToy ? "value" : "p";
  const rp = runPath(rid);
  const allKeys = (run.modules || []).flatMap((m) => Array.from({ length: m.C }, (_, i) => `${m.path}:${i}`));

  // ---- input -------------------------------------------------------------------------------
  let readInput;
  let inputBox;
  if (isToy) {
    const n = toyInputCount(run);
    const initial = (params.get("x") || "").split(",").filter(Boolean).map(Number);
    const fields = n
      ? Array.from({ length: n }, (_, i) =>
          h("input", { type: "number", step: "0.1", value: String(initial[i] ?? 0), testid: "feature-input", "data-index": i }),
        )
      : [];
    const free = n ? null : h("input", { type: "text", placeholder: "comma-separated input values", testid: "feature-vector" });
    const shortcut = h("input", {
      type: "text",
      placeholder: "feature 1 = 0.8, feature 3 = 1",
      testid: "feature-shortcut",
      class: "wide",
    });
    const apply = h("button", { type: "button", testid: "feature-shortcut-apply" }, "Set");
    apply.addEventListener("click", () => {
      for (const f of fields) f.value = "0";
      for (const [i, v] of parseShortcuts(shortcut.value)) if (fields[i]) fields[i].value = String(v);
    });
    readInput = () => {
      if (!n) return { x: free.value.split(",").map((v) => Number(v.trim())) };
      if (shortcut.value.trim()) apply.click();
      return { x: fields.map((f) => Number(f.value) || 0) };
    };
    inputBox = h(
      "div",
      {},
      n
        ? h(
            "div",
            { class: "feature-grid" },
            fields.map((f, i) => h("label", { class: "feature-field" }, h("span", { class: "mono" }, `x[${i}]`), f)),
          )
        : free,
      h("div", { class: "controls" }, "Shortcut: ", shortcut, apply),
    );
  } else {
    const text = h("textarea", { rows: 3, testid: "prompt-text", placeholder: "Type a prompt" });
    const pick = h("select", { testid: "prompt-select" }, h("option", { value: "" }, "— pick an example prompt —"));
    get(`${rp}/prompts`)
      .then((res) => {
        res.prompts.forEach((p, i) => pick.append(h("option", { value: String(i) }, p.length > 90 ? `${p.slice(0, 89)}…` : p)));
        pick.addEventListener("change", () => {
          if (pick.value !== "") text.value = res.prompts[Number(pick.value)];
        });
        if (!text.value && res.prompts.length) text.value = res.prompts[0];
      })
      .catch((err) => pick.after(errorBox(err)));
    text.value = params.get("text") || "";
    readInput = () => ({ text: text.value });
    inputBox = h("div", {}, pick, text);
  }
  const ciThr = h("input", { type: "number", step: "0.01", min: "0", value: "0", testid: "ci-threshold", class: "short" });
  const topK = h("input", { type: "number", step: "1", min: "1", value: "5", testid: "top-k", class: "short" });
  const runBtn = h("button", { type: "button", class: "primary", testid: "prompt-run" }, "Run");
  const result = h("div", { testid: "prompt-result" });

  let current = null; // {body, res}

  const intervention = interventionPanel({ rp, allKeys, isToy, checkboxRoot: result });

  // ---- graph -------------------------------------------------------------------------------
  const graphBtn = h("button", { type: "button", testid: "graph-run" }, "Graph");
  const progress = h("progress", { max: 1, value: 0, testid: "graph-progress", hidden: true });
  const progressText = h("span", { class: "muted", testid: "graph-progress-text" });
  const slider = h("input", { type: "range", min: "0", max: "1", step: "0.01", value: "0", testid: "edge-threshold" });
  const edgeCount = h("span", { class: "muted", testid: "graph-edge-count" });
  const hover = h("div", { class: "muted graph-hover", testid: "graph-hover" }, " ");
  const pinnedBox = h("div", { class: "pinned-box", testid: "graph-pinned" });
  const graphBox = h("div", { class: "graph-box", testid: "graph" });
  let graph = null;
  const nodeText = (n) =>
    [n.key ?? `${n.layer} ${JSON.stringify(n.text ?? "")}`, n.label, n.ci != null ? `ci ${fmt(n.ci)}` : null, n.act != null ? `act ${fmt(n.act)}` : null]
      .filter(Boolean)
      .join(" · ");
  const onPin = (n) => {
    if (!n) return replace(pinnedBox);
    const add = n.key
      ? button("Add to intervention", "graph-pin-add", () => {
          intervention.toggle(n.position, n.key, true);
        })
      : null;
    replace(
      pinnedBox,
      h("strong", {}, "Pinned: "),
      n.key ? h("a", { href: componentHref(rid, n.key), class: "mono", testid: "graph-pin-link" }, n.key) : h("span", { class: "mono" }, n.layer),
      ` · position ${n.position}`,
      !n.key && n.text ? [" · ", h("span", { class: "tok-text" }, tokText(n.text))] : null,
      n.label ? h("div", { testid: "graph-pin-label" }, n.label) : null,
      h("div", { class: "muted" }, nodeText(n)),
      add,
    );
  };
  const applyThreshold = () => {
    if (!graph) return;
    const { shown, threshold } = graph.setThreshold(Number(slider.value));
    edgeCount.textContent = `${shown} of ${graph.nEdges} edges shown (|value| ≥ ${fmt(threshold, 3)}; ${graph.total} in the graph before the cap)`;
  };
  slider.addEventListener("input", applyThreshold);
  graphBtn.addEventListener("click", async () => {
    if (!current) return;
    graphBtn.disabled = true;
    progress.hidden = false;
    progress.value = 0;
    progressText.textContent = "starting…";
    replace(graphBox);
    replace(pinnedBox);
    try {
      const data = await postStream(`${rp}/graph/stream`, { ...current.body, edge_threshold: 0, max_edges: 5000 }, (name, d) => {
        if (name === "progress") {
          progress.max = Math.max(1, d.total);
          progress.value = d.done;
          progressText.textContent = `${d.done} / ${d.total}`;
        }
      });
      progress.value = progress.max;
      progressText.textContent = `done: ${data.nodes.length} nodes, ${data.edges.length} edges`;
      graph = renderGraph(graphBox, data, { onPin, onHover: (n) => (hover.textContent = n ? nodeText(n) : " ") });
      graph.total = data.n_edges_total;
      graphBox.append(graphLegend());
      applyThreshold();
    } catch (err) {
      progressText.textContent = "failed";
      replace(graphBox, errorBox(err));
    } finally {
      graphBtn.disabled = false;
    }
  });
  const graphPanel = h(
    "section",
    { class: "panel", testid: "graph-panel" },
    h("h2", {}, "Attribution graph"),
    h(
      "div",
      { class: "controls" },
      graphBtn,
      progress,
      progressText,
      h("label", {}, "edge threshold ", slider),
      edgeCount,
      button("Reset view", "graph-reset", () => graph && graph.fit()),
    ),
    hover,
    graphBox,
    pinnedBox,
  );

  // ---- prompt result -----------------------------------------------------------------------
  const showResult = (res) => {
    const P = res.firing.length;
    let pos = P - 1;
    const strip = h("div", { class: "token-strip", testid: "token-strip" });
    const firingBox = h("div", { testid: "firing-list", class: "firing" });
    const predBox = h("div", { class: "two-col", testid: "predictions" });
    const byModule = (list) => {
      const groups = new Map((res.modules || []).map((m) => [m.path, []]));
      for (const f of list) {
        if (!groups.has(f.module)) groups.set(f.module, []);
        groups.get(f.module).push(f);
      }
      return [...groups.entries()];
    };
    const select = (p) => {
      pos = p;
      for (const b of strip.querySelectorAll("[data-pos]")) b.classList.toggle("selected", Number(b.dataset.pos) === p);
      const list = res.firing[p];
      const tok = isToy ? null : res.tokens[p];
      replace(
        firingBox,
        h("h3", {}, tok ? ["Position ", String(p), " ", h("span", { class: "tok-text" }, tokText(tok.text))] : "Firing subcomponents", ` — ${list.length} firing`),
        byModule(list).map(([module, items]) =>
          h(
            "div",
            { class: "firing-module", "data-module": module },
            h("div", { class: "mono module-name" }, `${module} (${items.length})`),
            h(
              "div",
              { class: "firing-items" },
              items.map((f) => {
                const cb = h("input", { type: "checkbox", testid: "firing-select", "data-key": f.key, "data-position": p });
                cb.checked = intervention.has(p, f.key);
                cb.addEventListener("change", () => intervention.toggle(p, f.key, cb.checked));
                return h(
                  "span",
                  {
                    class: "firing-item",
                    style: { backgroundColor: ciColor(f.ci) },
                    title: `${f.key}\nci ${fmt(f.ci, 3)}${f.label ? `\n${f.label}` : ""}`,
                  },
                  cb,
                  h(
                    "a",
                    { href: componentHref(rid, f.key), class: "mono", testid: "firing-component", "data-key": f.key, "data-ci": f.ci },
                    f.key.slice(f.key.lastIndexOf(":") + 1),
                  ),
                  f.label ? h("span", { class: "firing-label" }, f.label) : null,
                );
              }),
            ),
          ),
        ),
      );
      replace(
        predBox,
        predTable(res.predictions.target[p], "pred-target", isToy ? "Target outputs" : "Target next token", valueName),
        predTable(res.predictions.masked[p], "pred-masked", isToy ? "CI-masked outputs" : "CI-masked next token", valueName),
      );
    };
    if (isToy) {
      append(strip, [
        h("span", { class: "muted" }, "Input features: "),
        res.tokens.length
          ? res.tokens.map((t) => h("span", { class: "tok feat", testid: "prompt-token", "data-id": t.id }, t.text))
          : h("span", { class: "muted" }, "all zero"),
      ]);
    } else {
      res.tokens.forEach((t, p) => {
        const maxCi = Math.max(0, ...res.firing[p].map((f) => f.ci));
        const b = h(
          "button",
          {
            type: "button",
            class: "tok strip-tok",
            testid: "prompt-token",
            "data-pos": p,
            title: `position ${p} · id ${t.id} · ${res.firing[p].length} firing · max ci ${fmt(maxCi)}`,
            style: { backgroundColor: ciColor(maxCi) },
          },
          tokText(t.text),
          h("sup", {}, String(res.firing[p].length)),
        );
        b.addEventListener("click", () => select(p));
        strip.append(b);
      });
    }
    select(pos);
    replace(
      result,
      h("h2", {}, isToy ? "Input" : "Tokens"),
      strip,
      h("div", { class: "two-col wide-left" }, firingBox, h("div", {}, h("h3", {}, "Predictions"), predBox)),
      graphPanel,
      intervention.el,
    );
  };

  runBtn.addEventListener("click", async () => {
    const body = { ...readInput(), ci_threshold: Number(ciThr.value) || 0, top_k: Number(topK.value) || 5 };
    runBtn.disabled = true;
    replace(result, loading("Computing CI…"));
    try {
      const res = await post(`${rp}/prompt`, body);
      current = { body, res };
      intervention.start(current);
      graph = null;
      replace(graphBox);
      replace(pinnedBox);
      progress.hidden = true;
      progressText.textContent = "";
      edgeCount.textContent = "";
      const q = body.text !== undefined ? `text=${encodeURIComponent(body.text)}` : `x=${body.x.join(",")}`;
      history.replaceState(null, "", `#/run/${encodeURIComponent(rid)}/prompt?${q}`);
      showResult(res);
    } catch (err) {
      replace(result, errorBox(err));
    } finally {
      runBtn.disabled = false;
    }
  });

  replace(
    root,
    h("h1", {}, isToy ? "Input vector" : "Prompt"),
    inputBox,
    h("div", { class: "controls" }, h("label", {}, "CI threshold ", ciThr), h("label", {}, "top-k ", topK), runBtn),
    result,
  );
  if (params.get("text") || params.get("x")) runBtn.click();
}
