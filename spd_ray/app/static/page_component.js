// One component (#/run/<rid>/component/<key>): label, stats, examples coloured by CI or
// activation, token statistics, correlated components, attributions and cluster.
import { componentPath, get, runInfo } from "./api.js";
import { ciColor, errorBox, fmt, h, loading, replace, signedColor, tokText } from "./dom.js";
import { componentHref } from "./page_components.js";

const PAGE = 20;

const tipNum = (v) => (v === null || v === undefined ? "–" : Number(v).toFixed(3));

function componentLinks(rid, items, testid) {
  if (!items || !items.length) return h("p", { class: "muted" }, "none");
  return h(
    "table",
    { class: "grid", testid },
    h(
      "tbody",
      {},
      items.map((it) =>
        h(
          "tr",
          { "data-key": it.key },
          h("td", { class: "mono" }, h("a", { href: componentHref(rid, it.key), testid: `${testid}-link` }, it.key)),
          h("td", { class: "num", style: { color: it.value < 0 ? "#1f77b4" : null } }, fmt(it.value, 4)),
          h("td", {}, it.label || ""),
        ),
      ),
    ),
  );
}

function tokenTable(items, testid, what) {
  if (!items || !items.length) return h("p", { class: "muted", testid }, `no ${what}`);
  return h(
    "table",
    { class: "grid", testid },
    h("thead", {}, h("tr", {}, [what, "id", "value", "count"].map((c) => h("th", {}, c)))),
    h(
      "tbody",
      {},
      items.map((t) =>
        h(
          "tr",
          {},
          h("td", {}, h("span", { class: "tok-text" }, tokText(t.text))),
          h("td", { class: "num" }, t.id),
          h("td", { class: "num" }, fmt(t.value, 4)),
          h("td", { class: "num" }, fmt(t.count)),
        ),
      ),
    ),
  );
}

/** Colours token spans by the chosen quantity; the activation scale is shared by the page. */
class Painter {
  constructor() {
    this.by = "ci";
    this.actScale = 0;
    this.spans = [];
  }
  add(span, ci, act) {
    this.spans.push([span, ci, act]);
    if (Number.isFinite(act)) this.actScale = Math.max(this.actScale, Math.abs(act));
  }
  paint() {
    for (const [span, ci, act] of this.spans) {
      span.style.backgroundColor = this.by === "ci" ? ciColor(ci) : signedColor(act, this.actScale);
    }
  }
}

function lmExample(ex, painter) {
  const ci = Array.isArray(ex.ci) ? ex.ci : [];
  const act = Array.isArray(ex.act) ? ex.act : [];
  const spans = (ex.tokens || []).map((t, i) => {
    const span = h(
      "span",
      {
        class: i === ex.center ? "tok center" : "tok",
        testid: "token",
        "data-ci": ci[i],
        "data-act": act[i],
        title: `id ${t.id} ${JSON.stringify(t.text)}\nci ${tipNum(ci[i])}\nact ${tipNum(act[i])}`,
      },
      tokText(t.text),
    );
    painter.add(span, ci[i], act[i]);
    return span;
  });
  return h("div", { class: "tokens" }, spans);
}

function toyExample(ex, painter) {
  const x = ex.x || [];
  const scale = Math.max(1e-12, ...x.map(Math.abs));
  const feats = x
    .map((v, i) => [i, v])
    .filter(([, v]) => v !== 0)
    .map(([i, v]) =>
      h(
        "span",
        { class: "tok feat", testid: "feature", title: `x[${i}] = ${tipNum(v)}`, style: { backgroundColor: signedColor(v, scale) } },
        `x[${i}]=${fmt(v, 2)}`,
      ),
    );
  const ci = Array.isArray(ex.ci) ? ex.ci[ex.center] : ex.ci;
  const act = Array.isArray(ex.act) ? ex.act[ex.center] : ex.act;
  const badge = h(
    "span",
    { class: "tok center", testid: "token", "data-ci": ci, "data-act": act, title: `ci ${tipNum(ci)}\nact ${tipNum(act)}` },
    `ci ${fmt(ci, 3)} · act ${fmt(act, 3)}`,
  );
  painter.add(badge, ci, act);
  return h("div", { class: "tokens" }, badge, " ", feats.length ? feats : h("span", { class: "muted" }, "all inputs zero"));
}

function examplesSection(rid, key, kind, title, painter, isToy) {
  const list = h("div", { class: "examples", testid: `examples-${kind}` });
  const more = h("button", { type: "button", testid: `examples-${kind}-more` }, "Load more");
  const count = h("span", { class: "muted" });
  let offset = 0;
  const load = async () => {
    more.disabled = true;
    const spinner = loading("Loading examples…");
    list.append(spinner);
    let res;
    try {
      res = await get(`${componentPath(rid, key)}/examples`, { kind, offset, limit: PAGE });
    } catch (err) {
      spinner.remove();
      list.append(errorBox(err));
      return;
    }
    spinner.remove();
    for (const ex of res.items) {
      list.append(
        h(
          "div",
          { class: "example", testid: "example", "data-rank": ex.rank },
          h("span", { class: "ex-meta muted" }, `#${ex.rank} doc ${ex.doc} @${ex.offset}`),
          isToy || !ex.tokens ? toyExample(ex, painter) : lmExample(ex, painter),
        ),
      );
    }
    painter.paint();
    offset += res.items.length;
    count.textContent = `${offset} of ${res.total}`;
    if (!res.total) list.append(h("p", { class: "muted" }, "no examples"));
    more.disabled = offset >= res.total;
    more.hidden = offset >= res.total;
  };
  more.addEventListener("click", load);
  return { nodes: [h("h3", {}, title, " ", count), list, more], load };
}

export async function componentPage(root, { rid, key }) {
  const [run, c] = await Promise.all([runInfo(rid), get(componentPath(rid, key))]);
  const isToy = run.kind === "toy";
  const painter = new Painter();
  const colorBy = (by) => {
    painter.by = by;
    painter.paint();
  };
  const radio = (value, text) => {
    const r = h("input", { type: "radio", name: "color-by", value, checked: value === "ci", testid: `color-${value}` });
    r.addEventListener("change", () => colorBy(value));
    return h("label", {}, r, " ", text);
  };
  const top = examplesSection(rid, key, "top", "Top examples", painter, isToy);
  const random = examplesSection(rid, key, "reservoir", "Random examples", painter, isToy);
  const label = c.label;
  const scores = Object.entries(c.scores || {});

  replace(
    root,
    h("h1", { class: "mono", testid: "component-key" }, c.key),
    h(
      "div",
      { class: "label-box", testid: "component-label-box" },
      label
        ? [
            h("div", { class: "label", testid: "component-label" }, label.label),
            h(
              "div",
              { class: "muted" },
              "confidence ",
              h("span", { class: `badge conf-${label.confidence}`, testid: "component-confidence" }, label.confidence),
              label.model ? ` · ${label.model}` : "",
            ),
            label.reasoning ? h("p", { class: "reasoning", testid: "component-reasoning" }, label.reasoning) : null,
          ]
        : h("div", { class: "muted", testid: "component-label" }, "No label (run spd-ray autointerp to make labels)."),
    ),
    h(
      "dl",
      { class: "stats", testid: "component-stats" },
      h("dt", {}, "firing density"),
      h("dd", { testid: "stat-density" }, fmt(c.firing_density, 5)),
      h("dt", {}, "mean CI"),
      h("dd", { testid: "stat-mean-ci" }, fmt(c.mean_ci, 5)),
      h("dt", {}, "firing count"),
      h("dd", { testid: "stat-count" }, fmt(c.firing_count)),
      scores.map(([k, v]) => [h("dt", {}, `score: ${k}`), h("dd", { testid: "stat-score", "data-score": k }, fmt(v, 3))]),
    ),
    h("h2", {}, "Examples"),
    h("div", { class: "controls", testid: "color-toggle" }, "Colour tokens by ", radio("ci", "CI"), radio("act", "activation")),
    h("div", { class: "two-col" }, h("div", {}, top.nodes), h("div", {}, random.nodes)),
    h(
      "div",
      { class: "two-col" },
      h("div", {}, h("h2", {}, isToy ? "Input features" : "Input tokens"), tokenTable(c.input_tokens, "input-tokens", isToy ? "feature" : "token")),
      isToy ? null : h("div", {}, h("h2", {}, "Output tokens"), tokenTable(c.output_tokens, "output-tokens", "token")),
    ),
    h("h2", {}, "Correlated components"),
    componentLinks(rid, c.correlated, "correlated"),
    c.attributions
      ? h(
          "div",
          { testid: "attributions" },
          h("h2", {}, "Dataset attributions"),
          h(
            "div",
            { class: "two-col" },
            h("div", {}, h("h3", {}, "Sources"), componentLinks(rid, c.attributions.sources, "attr-sources")),
            h("div", {}, h("h3", {}, "Targets"), componentLinks(rid, c.attributions.targets, "attr-targets")),
          ),
        )
      : null,
    c.cluster
      ? h(
          "div",
          { testid: "cluster" },
          h("h2", {}, "Cluster"),
          h("p", {}, `clustering ${c.cluster.clustering}, cluster ${c.cluster.id}, ${c.cluster.members.length} members`),
          h(
            "div",
            { class: "chips" },
            c.cluster.members.map((m) =>
              h("a", { class: m === c.key ? "chip mono self" : "chip mono", href: componentHref(rid, m), testid: "cluster-member" }, m),
            ),
          ),
        )
      : null,
  );
  await Promise.all([top.load(), random.load()]);
}
