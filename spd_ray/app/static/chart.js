// Hand-written SVG line chart with a hover read-out.
import { fmt, h, s } from "./dom.js";

function niceStep(span, n) {
  const raw = span / Math.max(1, n);
  const mag = 10 ** Math.floor(Math.log10(raw));
  const r = raw / mag;
  return (r >= 5 ? 10 : r >= 2 ? 5 : r >= 1 ? 2 : 1) * mag;
}

function linearTicks(lo, hi, n = 5) {
  if (!(hi > lo)) return { ticks: [lo], step: 1 };
  const step = niceStep(hi - lo, n);
  const ticks = [];
  for (let i = Math.ceil(lo / step); i * step <= hi + step * 1e-9; i++) ticks.push(i * step);
  return { ticks, step };
}

function logLabel(e) {
  if (!Number.isInteger(e)) return (10 ** e).toPrecision(2);
  return e >= -2 && e <= 3 ? String(10 ** e) : `1e${e}`;
}

/** A tick label with as many decimals as the tick spacing needs. */
function tickLabel(v, step) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e5 || a < 1e-3) return v.toExponential(1);
  return v.toFixed(Math.max(0, Math.min(6, -Math.floor(Math.log10(step)))));
}

function nearest(points, x) {
  let lo = 0;
  let hi = points.length - 1;
  while (hi - lo > 1) {
    const mid = (lo + hi) >> 1;
    if (points[mid][0] < x) lo = mid;
    else hi = mid;
  }
  return Math.abs(points[lo][0] - x) <= Math.abs(points[hi][0] - x) ? points[lo] : points[hi];
}

/**
 * A line chart of one metric. `points` = [[step, value], ...]. Hovering shows the nearest
 * step and value in a tooltip (data-testid="chart-tooltip").
 */
export function lineChart(key, points, { width = 440, height = 210, logY = false } = {}) {
  const m = { l: 58, r: 22, t: 10, b: 28 };
  const pts = points
    .filter(([x, y]) => Number.isFinite(x) && Number.isFinite(y) && (!logY || y > 0))
    .sort((a, b) => a[0] - b[0]);
  const wrap = h("div", { class: "chart", testid: "metric-chart", "data-key": key });
  wrap.append(h("div", { class: "chart-title" }, key));
  if (!pts.length) {
    wrap.append(h("div", { class: "muted" }, logY ? "no positive values (log scale)" : "no data"));
    return wrap;
  }
  const ty = (v) => (logY ? Math.log10(v) : v);
  const xs = pts.map((p) => p[0]);
  const ys = pts.map((p) => ty(p[1]));
  let [x0, x1] = [Math.min(...xs), Math.max(...xs)];
  let [y0, y1] = [Math.min(...ys), Math.max(...ys)];
  if (x1 === x0) [x0, x1] = [x0 - 1, x1 + 1];
  if (y1 === y0) [y0, y1] = [y0 - 0.5, y1 + 0.5];
  const pad = (y1 - y0) * 0.05;
  [y0, y1] = [y0 - pad, y1 + pad];
  const W = width - m.l - m.r;
  const H = height - m.t - m.b;
  const sx = (x) => m.l + ((x - x0) / (x1 - x0)) * W;
  const sy = (y) => m.t + H - ((ty(y) - y0) / (y1 - y0)) * H;

  const svg = s("svg", { width, height, viewBox: `0 0 ${width} ${height}`, class: "chart-svg" });
  const axes = s("g", { class: "axes" });
  const xt = linearTicks(x0, x1, 5);
  for (const t of xt.ticks) {
    axes.append(
      s("line", { x1: sx(t), x2: sx(t), y1: m.t, y2: m.t + H, class: "grid" }),
      s("text", { x: sx(t), y: height - 8, "text-anchor": "middle" }, tickLabel(t, xt.step)),
    );
  }
  const yt = linearTicks(y0, y1, 4);
  // On a log axis the ticks are exponents; keep whole decades when there are any.
  const decades = yt.ticks.filter((t) => Number.isInteger(t));
  const yTicks = logY && decades.length ? decades : yt.ticks;
  for (const t of yTicks) {
    const y = m.t + H - ((t - y0) / (y1 - y0)) * H;
    const label = logY ? logLabel(t) : tickLabel(t, yt.step);
    axes.append(
      s("line", { x1: m.l, x2: m.l + W, y1: y, y2: y, class: "grid" }),
      s("text", { x: m.l - 6, y: y + 4, "text-anchor": "end" }, label),
    );
  }
  axes.append(s("rect", { x: m.l, y: m.t, width: W, height: H, class: "frame" }));
  svg.append(axes);
  const d = pts.map(([x, y], i) => `${i ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`).join("");
  svg.append(s("path", { d, class: "series" }));
  if (pts.length === 1) svg.append(s("circle", { cx: sx(pts[0][0]), cy: sy(pts[0][1]), r: 3, class: "dot" }));

  const cursor = s("line", { y1: m.t, y2: m.t + H, class: "cursor", visibility: "hidden" });
  const dot = s("circle", { r: 4, class: "hover-dot", visibility: "hidden" });
  const overlay = s("rect", { x: m.l, y: m.t, width: W, height: H, class: "overlay" });
  svg.append(cursor, dot, overlay);
  const tip = h("div", { class: "tooltip", testid: "chart-tooltip", hidden: true });
  const show = (ev) => {
    const box = svg.getBoundingClientRect();
    const px = ((ev.clientX - box.left) / box.width) * width;
    const [x, y] = nearest(pts, x0 + ((px - m.l) / W) * (x1 - x0));
    for (const el of [cursor, dot]) el.setAttribute("visibility", "visible");
    cursor.setAttribute("x1", sx(x));
    cursor.setAttribute("x2", sx(x));
    dot.setAttribute("cx", sx(x));
    dot.setAttribute("cy", sy(y));
    tip.textContent = `step ${x}: ${fmt(y, 4)}`;
    tip.hidden = false;
    tip.style.left = `${(sx(x) / width) * box.width + 8}px`;
    tip.style.top = `${(sy(y) / height) * box.height - 28}px`;
  };
  overlay.addEventListener("mousemove", show);
  overlay.addEventListener("mouseleave", () => {
    for (const el of [cursor, dot]) el.setAttribute("visibility", "hidden");
    tip.hidden = true;
  });
  wrap.append(h("div", { class: "chart-body" }, svg, tip));
  return wrap;
}

/** Horizontal bars, one per row: rows = [[label, value], ...]. */
export function barTable(rows, { testid = "bars", digits = 3 } = {}) {
  const max = Math.max(1e-12, ...rows.map(([, v]) => Math.abs(v)));
  return h(
    "table",
    { class: "bars", testid },
    rows.map(([label, v]) =>
      h(
        "tr",
        { "data-label": label },
        h("td", { class: "mono" }, label),
        h("td", { class: "num" }, fmt(v, digits)),
        h("td", { class: "bar-cell" }, h("div", { class: "bar", style: { width: `${(100 * Math.abs(v)) / max}%` } })),
      ),
    ),
  );
}
