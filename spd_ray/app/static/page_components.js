// The component list (#/run/<rid>/components?module=&sort=&q=&offset=).
import { get, runPath } from "./api.js";
import { debounce, errorBox, fmt, h, loading, replace } from "./dom.js";

const LIMIT = 50;
const SORTS = [
  ["density", "firing density"],
  ["mean_ci", "mean CI"],
  ["score", "label score"],
  ["index", "index"],
];

export const componentHref = (rid, key) =>
  `#/run/${encodeURIComponent(rid)}/component/${encodeURIComponent(key)}`;

export function labelCell(label, confidence) {
  if (!label) return h("span", { class: "muted" }, "–");
  return [label, confidence ? [" ", h("span", { class: `badge conf-${confidence}` }, confidence)] : null];
}

export async function componentsPage(root, { rid, params }) {
  const state = {
    module: params.get("module") || "",
    sort: params.get("sort") || "density",
    q: params.get("q") || "",
    offset: Number(params.get("offset") || 0),
  };
  const moduleSel = h("select", { testid: "module-select" }, h("option", { value: "" }, "all modules"));
  const sortSel = h(
    "select",
    { testid: "sort-select" },
    SORTS.map(([v, t]) => h("option", { value: v }, t)),
  );
  sortSel.value = state.sort;
  const search = h("input", {
    type: "search",
    placeholder: "search label or key",
    value: state.q,
    testid: "search-input",
  });
  const prev = h("button", { type: "button", testid: "page-prev" }, "‹ prev");
  const next = h("button", { type: "button", testid: "page-next" }, "next ›");
  const info = h("span", { class: "muted", testid: "pager-info" });
  const body = h("div", { testid: "components-body" }, loading());
  let modulesFilled = false;
  let seq = 0;

  const syncHash = () => {
    const p = new URLSearchParams();
    for (const [k, v] of Object.entries(state)) if (v !== "" && !(k === "offset" && v === 0)) p.set(k, v);
    const qs = p.toString();
    history.replaceState(null, "", `#/run/${encodeURIComponent(rid)}/components${qs ? `?${qs}` : ""}`);
  };

  const load = async () => {
    const mine = ++seq;
    syncHash();
    let res;
    try {
      res = await get(`${runPath(rid)}/components`, {
        module: state.module,
        sort: state.sort,
        q: state.q,
        offset: state.offset,
        limit: LIMIT,
      });
    } catch (err) {
      if (mine !== seq) return;
      replace(body, errorBox(err));
      info.textContent = "";
      return;
    }
    if (mine !== seq) return;
    if (!modulesFilled) {
      for (const m of res.modules) moduleSel.append(h("option", { value: m.path }, `${m.path} (C=${m.C})`));
      moduleSel.value = state.module;
      modulesFilled = true;
    }
    const end = state.offset + res.items.length;
    info.textContent = res.total ? `${state.offset + 1}–${end} of ${res.total}` : "0 of 0";
    prev.disabled = state.offset === 0;
    next.disabled = end >= res.total;
    if (!res.items.length) {
      replace(body, h("p", { class: "muted", testid: "components-empty" }, "No components match."));
      return;
    }
    replace(
      body,
      h(
        "table",
        { class: "grid clickable", testid: "components-table" },
        h(
          "thead",
          {},
          h("tr", {}, ["Component", "Label", "Density", "Mean CI", "Count", "Score", "Cluster"].map((c) => h("th", {}, c))),
        ),
        h(
          "tbody",
          {},
          res.items.map((it) => {
            const row = h(
              "tr",
              { testid: "component-row", "data-key": it.key },
              h("td", { class: "mono" }, h("a", { href: componentHref(rid, it.key) }, it.key)),
              h("td", { class: "label-cell" }, labelCell(it.label, it.confidence)),
              h("td", { class: "num" }, fmt(it.firing_density, 4)),
              h("td", { class: "num" }, fmt(it.mean_ci, 4)),
              h("td", { class: "num" }, fmt(it.firing_count)),
              h("td", { class: "num" }, fmt(it.score)),
              h("td", { class: "num" }, fmt(it.cluster)),
            );
            row.addEventListener("click", (ev) => {
              if (ev.target.closest("a")) return;
              location.hash = componentHref(rid, it.key);
            });
            return row;
          }),
        ),
      ),
    );
  };

  moduleSel.addEventListener("change", () => {
    state.module = moduleSel.value;
    state.offset = 0;
    load();
  });
  sortSel.addEventListener("change", () => {
    state.sort = sortSel.value;
    state.offset = 0;
    load();
  });
  search.addEventListener(
    "input",
    debounce(() => {
      state.q = search.value.trim();
      state.offset = 0;
      load();
    }, 250),
  );
  prev.addEventListener("click", () => {
    state.offset = Math.max(0, state.offset - LIMIT);
    load();
  });
  next.addEventListener("click", () => {
    state.offset += LIMIT;
    load();
  });

  replace(
    root,
    h("h1", {}, "Components"),
    h(
      "div",
      { class: "controls" },
      h("label", {}, "Module ", moduleSel),
      h("label", {}, "Sort by ", sortSel),
      search,
      prev,
      info,
      next,
    ),
    body,
  );
  await load();
}
