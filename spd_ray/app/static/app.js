// Hash router: #/ (runs), #/run/<rid>, #/run/<rid>/components, #/run/<rid>/component/<key>,
// #/run/<rid>/prompt. Each render gets a fresh root element, so a slow request that finishes
// after the user navigated away writes into a detached node.
import { errorBox, h, loading, replace } from "./dom.js";
import { componentPage } from "./page_component.js";
import { componentsPage } from "./page_components.js";
import { promptPage } from "./page_prompt.js";
import { runPage, runsPage } from "./page_run.js";

const routes = [
  [/^\/?$/, runsPage, "runs"],
  [/^\/run\/([^/]+)$/, runPage, "run"],
  [/^\/run\/([^/]+)\/components$/, componentsPage, "components"],
  [/^\/run\/([^/]+)\/component\/(.+)$/, componentPage, "component"],
  [/^\/run\/([^/]+)\/prompt$/, promptPage, "prompt"],
];

export function parseHash(hash) {
  const raw = hash.replace(/^#/, "");
  const q = raw.indexOf("?");
  const path = q < 0 ? raw : raw.slice(0, q);
  const params = new URLSearchParams(q < 0 ? "" : raw.slice(q + 1));
  return { path, params };
}

function navBar(name, rid, key) {
  const link = (href, text, active, testid) =>
    h("a", { href, class: active ? "active" : null, testid }, text);
  const items = [link("#/", "Runs", name === "runs", "nav-runs")];
  if (rid) {
    const base = `#/run/${encodeURIComponent(rid)}`;
    items.push(
      h("span", { class: "sep" }, "/"),
      link(base, rid, name === "run", "nav-run"),
      h("span", { class: "sep" }, "/"),
      link(`${base}/components`, "Components", name === "components", "nav-components"),
      h("span", { class: "sep" }, "·"),
      link(`${base}/prompt`, "Prompt", name === "prompt", "nav-prompt"),
    );
    if (key) items.push(h("span", { class: "sep" }, "/"), h("span", { class: "mono active" }, key));
  }
  return items;
}

async function render() {
  const { path, params } = parseHash(location.hash);
  const main = document.getElementById("main");
  const nav = document.getElementById("nav");
  const root = h("div", { class: "page" });
  replace(main, root);
  const match = routes.map(([re, fn, name]) => [path.match(re), fn, name]).find(([m]) => m);
  if (!match) {
    replace(nav, navBar("none"));
    root.append(errorBox({ status: 404, detail: `no page at #${path}` }));
    return;
  }
  const [m, page, name] = match;
  const rid = m[1] ? decodeURIComponent(m[1]) : null;
  const key = m[2] ? decodeURIComponent(m[2]) : null;
  replace(nav, navBar(name, rid, key));
  document.title = ["spd-ray", rid, key || (name !== "run" && name !== "runs" ? name : null)]
    .filter(Boolean)
    .join(" · ");
  root.append(loading());
  try {
    await page(root, { rid, key, params });
  } catch (err) {
    console.error(err);
    root.querySelectorAll('[data-testid="loading"]').forEach((el) => el.remove());
    root.append(errorBox(err));
  }
}

window.addEventListener("hashchange", render);
render();
