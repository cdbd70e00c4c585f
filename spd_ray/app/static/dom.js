// Small DOM helpers. Data is only ever inserted as text nodes or attributes (never innerHTML).

const SVG_NS = "http://www.w3.org/2000/svg";

function setAttrs(el, attrs) {
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on") && typeof v === "function") el.addEventListener(k.slice(2), v);
    else if (k === "style" && typeof v === "object") Object.assign(el.style, v);
    else if (k === "testid") el.setAttribute("data-testid", v);
    else if (k === "value" && "value" in el) el.value = v;
    else if (k === "checked" && "checked" in el) el.checked = Boolean(v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
}

export function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

/** h("div", {class: "x", testid: "y", onclick: f}, "text", child, [more]) */
export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  setAttrs(el, attrs);
  return append(el, children);
}

/** The same for SVG elements. */
export function s(tag, attrs, ...children) {
  const el = document.createElementNS(SVG_NS, tag);
  setAttrs(el, attrs);
  return append(el, children);
}

export function clear(el) {
  while (el.firstChild) el.removeChild(el.firstChild);
  return el;
}

export function replace(el, ...children) {
  return append(clear(el), children);
}

/** Format a number compactly for tables and tooltips. */
export function fmt(x, digits = 3) {
  if (x === null || x === undefined) return "–";
  if (typeof x !== "number") return String(x);
  if (Number.isInteger(x)) return String(x);
  const a = Math.abs(x);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) return x.toExponential(digits - 1);
  return x.toFixed(digits);
}

/** Make whitespace in token text visible. */
export function tokText(t) {
  if (t === null || t === undefined) return "";
  return String(t).replace(/\n/g, "↵").replace(/\t/g, "⇥");
}

export function loading(text = "Loading…") {
  return h("div", { class: "loading", testid: "loading" }, text);
}

/** A command with a copy button. */
export function commandBox(command, testid = "command") {
  const code = h("code", { testid }, command);
  const btn = h("button", { class: "copy", type: "button", title: "Copy to clipboard" }, "Copy");
  btn.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(command);
      btn.textContent = "Copied";
    } catch {
      // Clipboard needs a secure context; fall back to selecting the text.
      const range = document.createRange();
      range.selectNodeContents(code);
      const sel = window.getSelection();
      sel.removeAllRanges();
      sel.addRange(range);
      btn.textContent = "Selected";
    }
    setTimeout(() => (btn.textContent = "Copy"), 1500);
  });
  return h("span", { class: "command" }, code, btn);
}

/** An error box from an ApiError (or any Error); shows `missing` + the command when present. */
export function errorBox(err) {
  if (err && err.missing) {
    return h(
      "div",
      { class: "missing", testid: "missing", "data-missing": err.missing },
      h("strong", {}, `Missing analysis: ${err.missing}`),
      h("p", { testid: "missing-detail" }, err.detail || String(err.message)),
      err.command ? h("p", {}, "Make it with: ", commandBox(err.command, "missing-command")) : null,
    );
  }
  const detail = err && (err.detail || err.message) ? err.detail || err.message : String(err);
  const status = err && err.status ? ` (${err.status})` : "";
  return h("div", { class: "error", testid: "error" }, `Error${status}: ${detail}`);
}

/** Map a value in [0, 1] (CI) to a background colour. */
export function ciColor(v) {
  const a = Math.max(0, Math.min(1, v || 0));
  const alpha = a > 0 ? 0.08 + 0.82 * a : 0;
  return `rgba(230, 110, 20, ${alpha.toFixed(3)})`;
}

/** Map a signed value normalised by `scale` to blue (negative) / red (positive). */
export function signedColor(v, scale) {
  const a = scale > 0 ? Math.max(-1, Math.min(1, (v || 0) / scale)) : 0;
  const alpha = (0.85 * Math.abs(a)).toFixed(3);
  return a >= 0 ? `rgba(214, 39, 40, ${alpha})` : `rgba(31, 119, 180, ${alpha})`;
}

export function debounce(fn, ms) {
  let t = null;
  return (...args) => {
    clearTimeout(t);
    t = setTimeout(() => fn(...args), ms);
  };
}
