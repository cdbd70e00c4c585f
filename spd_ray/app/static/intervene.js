// The Prompt page's intervention panel: choose (position, subcomponent) nodes, keep or ablate
// them, and compare the target's output distribution with the intervened one.
import { post } from "./api.js";
import { errorBox, fmt, h, loading, replace, tokText } from "./dom.js";

const MAX_CHIPS = 24;

/** A top-k table of {id, text, p}; `valueName` is "p" (LM) or "value" (toy outputs). */
export function predTable(items, testid, title, valueName = "p") {
  return h(
    "div",
    { class: "pred" },
    h("h3", {}, title),
    h(
      "table",
      { class: "grid", testid },
      h("thead", {}, h("tr", {}, h("th", {}, valueName === "p" ? "token" : "output"), h("th", {}, valueName))),
      h(
        "tbody",
        {},
        (items || []).map((t) =>
          h(
            "tr",
            { "data-id": t.id },
            h("td", {}, h("span", { class: "tok-text" }, tokText(t.text))),
            h("td", { class: "num" }, fmt(t.p, 4), h("div", { class: "pbar", style: { width: `${Math.min(100, 100 * Math.abs(t.p))}%` } })),
          ),
        ),
      ),
    ),
  );
}

export function button(text, testid, fn) {
  const b = h("button", { type: "button", testid }, text);
  b.addEventListener("click", fn);
  return b;
}

/**
 * The panel. `checkboxRoot` holds the firing list's checkboxes (data-position, data-key), kept in
 * step with the choice. Returns {el, start(current), toggle(position, key, on), has(position, key)};
 * a position of null means "at every position".
 */
export function interventionPanel({ rp, allKeys, isToy, checkboxRoot }) {
  const valueName = isToy ? "value" : "p";
  const selection = new Map(); // "pos|key" -> {position: int | null, key}
  const id = (position, key) => `${position ?? "*"}|${key}`;
  let current = null; // {body, res} of the prompt shown

  const mode = h(
    "select",
    { testid: "intervene-mode" },
    h("option", { value: "ablate" }, "ablate the chosen (others kept)"),
    h("option", { value: "keep" }, "keep only the chosen (others ablated)"),
  );
  const posSel = h("select", { testid: "intervene-position" });
  const topN = h("input", { type: "number", min: "1", value: "3", class: "short", testid: "intervene-topn" });
  const chips = h("div", { class: "chips", testid: "intervene-selected" });
  const result = h("div", { testid: "intervene-result" });
  const runBtn = h("button", { type: "button", class: "primary", testid: "intervene-run" }, "Run intervention");
  const nPositions = () => (current ? current.res.firing.length : 0);

  const syncChecks = () => {
    for (const cb of checkboxRoot.querySelectorAll('input[data-testid="firing-select"]')) {
      cb.checked = selection.has(id(cb.dataset.position, cb.dataset.key));
    }
  };
  const changed = () => {
    const items = [...selection.values()];
    const shown = items.slice(0, MAX_CHIPS).map((it) => {
      const x = button("×", null, () => {
        selection.delete(id(it.position, it.key));
        changed();
      });
      x.className = "chip-x";
      x.title = "remove";
      return h("span", { class: "chip", testid: "intervene-chip", "data-key": it.key }, `${it.key} @ ${it.position ?? "all"}`, x);
    });
    replace(
      chips,
      items.length ? shown : h("span", { class: "muted" }, "nothing chosen"),
      items.length > MAX_CHIPS ? h("span", { class: "muted" }, ` … and ${items.length - MAX_CHIPS} more`) : null,
      h("span", { class: "muted", testid: "intervene-count" }, ` (${items.length} chosen)`),
    );
    syncChecks();
  };
  const toggle = (position, key, on) => {
    if (on) selection.set(id(position, key), { position, key });
    else selection.delete(id(position, key));
    changed();
  };

  const topCi = button("Top-CI at last position", "intervene-topci", () => {
    if (!current) return;
    const last = nPositions() - 1;
    for (const f of current.res.firing[last].slice(0, Math.max(1, Number(topN.value) || 1))) {
      selection.set(id(last, f.key), { position: last, key: f.key });
    }
    changed();
  });
  const all = button("All components", "intervene-all", () => {
    selection.clear();
    for (const key of allKeys) selection.set(id(null, key), { position: null, key });
    changed();
  });
  const clear = button("Clear", "intervene-clear", () => {
    selection.clear();
    changed();
  });

  runBtn.addEventListener("click", async () => {
    if (!current) return;
    const items = [...selection.values()];
    const body = { ...current.body, mode: mode.value, position: Number(posSel.value), delta: true, top_k: 10 };
    if (items.every((it) => it.position === null)) body.components = items.map((it) => it.key);
    else {
      const P = nPositions();
      body.nodes = items.flatMap((it) =>
        it.position === null
          ? Array.from({ length: P }, (_, p) => ({ position: p, key: it.key }))
          : [{ position: it.position, key: it.key }],
      );
    }
    runBtn.disabled = true;
    replace(result, loading("Running intervention…"));
    try {
      const r = await post(`${rp}/intervene`, body);
      replace(
        result,
        h(
          "div",
          { class: "iv-summary" },
          isToy ? "max |Δy| = " : "max |Δp| = ",
          h("strong", { testid: "intervene-maxdiff", "data-value": r.max_abs_diff }, fmt(r.max_abs_diff, 6)),
          " · KL = ",
          h("strong", { testid: "intervene-kl", "data-value": r.kl }, fmt(r.kl, 6)),
          " · top-1 ",
          h("strong", { testid: "intervene-top1" }, r.changed_top1 ? "changed" : "unchanged"),
          ` · position ${r.position}`,
        ),
        h(
          "div",
          { class: "two-col" },
          predTable(r.target, "intervene-target", "Target", valueName),
          predTable(r.intervened, "intervene-intervened", `Intervened (${body.mode})`, valueName),
        ),
      );
    } catch (err) {
      replace(result, errorBox(err));
    } finally {
      runBtn.disabled = false;
    }
  });

  const el = h(
    "section",
    { class: "panel", testid: "intervene-panel" },
    h("h2", {}, "Intervention"),
    h(
      "div",
      { class: "controls" },
      h("label", {}, "Mode ", mode),
      h("label", {}, "at position ", posSel),
      topCi,
      h("label", {}, "n ", topN),
      all,
      clear,
    ),
    h("p", { class: "muted" }, "Choose subcomponents with the checkboxes in the firing list or from a pinned graph node."),
    chips,
    h("div", { class: "controls" }, runBtn),
    result,
  );

  return {
    el,
    /** A new prompt result: forget the choice and the last result. */
    start(next) {
      current = next;
      selection.clear();
      replace(result);
      const P = nPositions();
      const tokens = next.res.tokens;
      replace(
        posSel,
        Array.from({ length: P }, (_, p) =>
          h("option", { value: String(p) }, isToy ? `${p}` : `${p}: ${tokText(tokens[p]?.text)}`),
        ),
      );
      posSel.value = String(P - 1);
      changed();
    },
    toggle,
    has: (position, key) => selection.has(id(position, key)),
  };
}
