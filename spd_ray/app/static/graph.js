// The prompt's attribution graph as hand-written SVG: layers are rows (inputs at the bottom,
// outputs at the top), positions are columns; edges coloured by sign, width by |value|.
import { fmt, h, s, tokText } from "./dom.js";

const SPACING = 11;
const MIN_COL = 72;
const ROW_H = 74;
const LEFT = 150;
const TOP = 64;

function shortLayer(name) {
  return name.replace(/^model\./, "").replace(/^layers\./, "");
}

function nodeWeight(n) {
  return Math.abs(n.p ?? n.ci ?? n.act ?? 0);
}

function layout(data) {
  const layers = data.layers;
  const rowOf = new Map(layers.map((l, i) => [l, i]));
  const nPos = 1 + Math.max(0, ...data.nodes.map((n) => n.position));
  const cells = new Map();
  for (const n of data.nodes) {
    const k = `${n.layer}|${n.position}`;
    if (!cells.has(k)) cells.set(k, []);
    cells.get(k).push(n);
  }
  // Few nodes per cell (toy models) get room; crowded cells pack tightly.
  const crowd = Math.max(1, ...[...cells.values()].map((l) => l.length));
  const spacing = crowd <= 8 ? 34 : crowd <= 20 ? 18 : SPACING;
  const widths = new Array(nPos).fill(MIN_COL);
  for (const [k, list] of cells) {
    const p = Number(k.slice(k.lastIndexOf("|") + 1));
    widths[p] = Math.max(widths[p], list.length * spacing + 16);
    list.sort((a, b) => nodeWeight(b) - nodeWeight(a) || a.index - b.index);
  }
  const starts = [];
  let x = LEFT;
  for (const w of widths) {
    starts.push(x);
    x += w;
  }
  const pos = new Map();
  for (const [k, list] of cells) {
    const [layer, p] = [k.slice(0, k.lastIndexOf("|")), Number(k.slice(k.lastIndexOf("|") + 1))];
    const cx = starts[p] + widths[p] / 2;
    const y = TOP + (layers.length - 1 - rowOf.get(layer)) * ROW_H;
    list.forEach((n, j) => pos.set(n.id, { x: cx + (j - (list.length - 1) / 2) * spacing, y }));
  }
  return { pos, starts, widths, width: x + 20, height: TOP + layers.length * ROW_H, nPos };
}

function nodeClass(n) {
  if (n.layer === "output") return "node out";
  if (n.key === null || n.key === undefined) return "node inp";
  return "node comp";
}

/**
 * Render the graph into `container`. `onPin(node | null)` is called when a node is pinned or
 * unpinned. Returns {setThreshold(fraction) -> number of visible edges}.
 */
export function renderGraph(container, data, { onPin, onHover } = {}) {
  // Only nodes that an edge (after the server's cap) touches, plus the input row, are drawn.
  const touched = new Set(data.edges.flatMap((e) => [e.source, e.target]));
  const isInput = (n) => n.layer === data.layers[0];
  const nodes = data.nodes.filter((n) => touched.has(n.id) || isInput(n));
  const L = layout({ ...data, nodes });
  const svg = s("svg", { class: "graph-svg", testid: "graph-svg", width: "100%", height: 540 });
  const view = s("g", { class: "viewport" });
  svg.append(view);

  const labels = s("g", { class: "labels" });
  data.layers.forEach((layer, i) => {
    const y = TOP + (data.layers.length - 1 - i) * ROW_H;
    labels.append(
      s("line", { x1: LEFT - 6, x2: L.width, y1: y, y2: y, class: "row-line" }),
      s("text", { x: LEFT - 10, y: y + 4, "text-anchor": "end", class: "row-label" }, shortLayer(layer)),
    );
  });
  // Toy inputs are one vector: its features label the single column.
  const colText = (p) =>
    data.tokens.length === L.nPos ? tokText(data.tokens[p].text) : L.nPos === 1 ? data.tokens.map((t) => t.text).join(" ") : `pos ${p}`;
  for (let p = 0; p < L.nPos; p++) {
    const text = colText(p);
    const room = Math.max(6, Math.floor(L.widths[p] / 7));
    labels.append(
      s(
        "text",
        { x: L.starts[p] + L.widths[p] / 2, y: L.height - 14, "text-anchor": "middle", class: "col-label" },
        text.length > room ? `${text.slice(0, room - 1)}…` : text,
      ),
    );
  }
  view.append(labels);

  const maxAbs = Math.max(1e-30, ...data.edges.map((e) => Math.abs(e.value)));
  const edgeLayer = s("g", { class: "edges" });
  const edgesOf = new Map(nodes.map((n) => [n.id, []]));
  const edgeEls = [];
  // Draw weak edges first so strong ones sit on top.
  const order = [...data.edges].sort((a, b) => Math.abs(a.value) - Math.abs(b.value));
  for (const e of order) {
    const a = L.pos.get(e.source);
    const b = L.pos.get(e.target);
    if (!a || !b) continue;
    const r = Math.abs(e.value) / maxAbs;
    const my = (a.y + b.y) / 2;
    const el = s("path", {
      d: `M${a.x.toFixed(1)},${a.y}C${a.x.toFixed(1)},${my} ${b.x.toFixed(1)},${my} ${b.x.toFixed(1)},${b.y}`,
      class: `edge ${e.value >= 0 ? "pos" : "neg"}`,
      "stroke-width": (0.4 + 3.6 * r).toFixed(2),
      "stroke-opacity": (0.2 + 0.7 * r).toFixed(2),
      "data-value": e.value,
    });
    el.append(s("title", {}, `${e.source} → ${e.target}: ${fmt(e.value, 4)}`));
    edgeLayer.append(el);
    edgeEls.push([el, Math.abs(e.value), e.source, e.target]);
    edgesOf.get(e.source)?.push(el);
    edgesOf.get(e.target)?.push(el);
  }
  view.append(edgeLayer);

  const nodeLayer = s("g", { class: "nodes" });
  let pinned = null;
  const nodeEls = [];
  const highlight = (node, on) => {
    svg.classList.toggle("focus", on);
    for (const el of edgesOf.get(node.id) || []) el.classList.toggle("hl", on);
  };
  for (const n of nodes) {
    const p = L.pos.get(n.id);
    const r = n.key ? 2.5 + 3.5 * Math.min(1, Math.abs(n.ci ?? 0)) : 4.5;
    const c = s("circle", {
      cx: p.x.toFixed(1),
      cy: p.y,
      r: r.toFixed(1),
      class: nodeClass(n),
      "data-id": n.id,
      "data-key": n.key ?? null,
      testid: "graph-node",
    });
    if (n.layer === "output") {
      nodeLayer.append(
        s("text", { x: p.x.toFixed(1), y: p.y - 8, class: "out-label", transform: `rotate(-40 ${p.x.toFixed(1)} ${p.y - 8})` }, `${tokText(n.text ?? "")} ${fmt(n.p ?? n.act, 2)}`),
      );
    }
    const desc = [n.key ?? `${n.layer} ${tokText(n.text ?? "")}`];
    if (n.label) desc.push(n.label);
    if (n.ci !== null && n.ci !== undefined) desc.push(`ci ${fmt(n.ci)}`);
    if (n.act !== null && n.act !== undefined) desc.push(`act ${fmt(n.act)}`);
    if (n.p !== null && n.p !== undefined) desc.push(`p ${fmt(n.p)}`);
    c.append(s("title", {}, desc.join("\n")));
    c.addEventListener("mouseenter", () => {
      if (!pinned) highlight(n, true);
      if (onHover) onHover(n);
    });
    c.addEventListener("mouseleave", () => {
      if (!pinned) highlight(n, false);
      if (onHover) onHover(null);
    });
    c.addEventListener("click", (ev) => {
      ev.stopPropagation();
      if (moved) return;
      if (pinned) {
        highlight(pinned.node, false);
        pinned.el.classList.remove("pinned");
      }
      if (pinned && pinned.node === n) {
        pinned = null;
      } else {
        pinned = { node: n, el: c };
        c.classList.add("pinned");
        highlight(n, true);
      }
      if (onPin) onPin(pinned ? n : null);
    });
    nodeLayer.append(c);
    if (!isInput(n)) nodeEls.push([n.id, c]);
  }
  view.append(nodeLayer);

  // Zoom (wheel, around the cursor) and pan (drag on the background).
  let k = 1;
  let tx = 0;
  let ty = 0;
  let moved = false;
  const apply = () => view.setAttribute("transform", `translate(${tx.toFixed(1)},${ty.toFixed(1)}) scale(${k.toFixed(4)})`);
  const toLocal = (ev) => {
    const box = svg.getBoundingClientRect();
    return [ev.clientX - box.left, ev.clientY - box.top];
  };
  svg.addEventListener(
    "wheel",
    (ev) => {
      ev.preventDefault();
      const [mx, my] = toLocal(ev);
      const f = Math.exp(-ev.deltaY * 0.0015);
      const nk = Math.max(0.05, Math.min(20, k * f));
      tx = mx - ((mx - tx) * nk) / k;
      ty = my - ((my - ty) * nk) / k;
      k = nk;
      apply();
    },
    { passive: false },
  );
  let drag = null;
  svg.addEventListener("pointerdown", (ev) => {
    drag = { x: ev.clientX, y: ev.clientY, tx, ty, id: ev.pointerId };
    moved = false;
  });
  svg.addEventListener("pointermove", (ev) => {
    if (!drag) return;
    const dx = ev.clientX - drag.x;
    const dy = ev.clientY - drag.y;
    if (!moved && Math.abs(dx) + Math.abs(dy) > 3) {
      moved = true;
      // Capture only once it is a drag, so plain clicks still reach the nodes.
      svg.setPointerCapture(drag.id);
      svg.classList.add("dragging");
    }
    if (!moved) return;
    tx = drag.tx + dx;
    ty = drag.ty + dy;
    apply();
  });
  const stop = () => {
    if (drag && svg.hasPointerCapture(drag.id)) svg.releasePointerCapture(drag.id);
    drag = null;
    svg.classList.remove("dragging");
  };
  svg.addEventListener("pointerup", stop);
  svg.addEventListener("pointercancel", stop);
  svg.addEventListener("click", () => {
    if (moved || !pinned) return;
    highlight(pinned.node, false);
    pinned.el.classList.remove("pinned");
    pinned = null;
    if (onPin) onPin(null);
  });

  container.append(svg);
  const fit = () => {
    const w = svg.getBoundingClientRect().width || 900;
    k = Math.min(2.5, w / L.width, 540 / L.height);
    tx = 0;
    ty = 0;
    apply();
  };
  fit();

  return {
    fit,
    /** Hide edges below fraction**2 of the largest |value|; returns the number shown. */
    setThreshold(fraction) {
      const thr = maxAbs * fraction * fraction;
      let shown = 0;
      const live = new Set();
      for (const [el, v, a, b] of edgeEls) {
        const vis = v >= thr;
        el.setAttribute("display", vis ? "inline" : "none");
        if (vis) {
          shown += 1;
          live.add(a);
          live.add(b);
        }
      }
      for (const [id, c] of nodeEls) c.classList.toggle("faint", !live.has(id));
      return { shown, threshold: thr };
    },
    nEdges: edgeEls.length,
  };
}

/** A small legend under the graph. */
export function graphLegend() {
  return h(
    "div",
    { class: "legend" },
    h("span", { class: "swatch pos" }),
    " positive  ",
    h("span", { class: "swatch neg" }),
    " negative  · wheel: zoom · drag: pan · hover: edges · click: pin",
  );
}
