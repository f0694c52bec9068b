/* twistlm pages: shared helpers (number formatting, safe DOM building) and a small SVG line chart.
   Every text reaches the page through textContent or esc(): data never becomes markup. */
const TW = (function () {
  "use strict";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  const CHART_WIDTH = 640;
  const CHART_HEIGHT = 240;
  const MARGIN = { left: 62, right: 16, top: 30, bottom: 42 };
  const TICKS = 5;
  const LEGEND_ROW = 15;
  const LEGEND_SWATCH = 18;
  const LEGEND_CHAR = 6.2;

  function num(v) {
    if (v === null || v === undefined) return NaN;
    if (v === "inf") return Infinity;
    if (v === "-inf") return -Infinity;
    if (v === "nan") return NaN;
    return Number(v);
  }

  function fmt(v, digits) {
    const x = num(v);
    const d = digits === undefined ? 4 : digits;
    if (Number.isNaN(x)) return "—";
    if (x === Infinity) return "∞";
    if (x === -Infinity) return "−∞";
    if (x !== 0 && (Math.abs(x) >= 1e5 || Math.abs(x) < 1e-3)) return x.toExponential(2).replace(/-/g, "−");
    return Number(x.toFixed(d)).toString().replace(/-/g, "−");
  }

  function esc(s) {
    return String(s).replace(/[&<>"']/g, function (c) {
      return { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" }[c];
    });
  }

  function el(tag, attrs, children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "text") node.textContent = String(value);
      else if (key === "className") node.className = value;
      else node.setAttribute(key, String(value));
    }
    for (const child of children || []) {
      if (child === null || child === undefined) continue;
      node.appendChild(typeof child === "string" ? document.createTextNode(child) : child);
    }
    return node;
  }

  function svg(tag, attrs, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [key, value] of Object.entries(attrs || {})) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function setText(id, text) {
    const node = document.getElementById(id);
    if (node) node.textContent = String(text);
  }

  function section(title, id, children) {
    return el("section", { id: id }, [el("h2", { text: title })].concat(children || []));
  }

  /* A table: headers (strings), rows (arrays of strings or nodes), rowClass for every body row. */
  function table(headers, rows, rowClass) {
    const head = el("thead", {}, [el("tr", {}, headers.map(function (h) { return el("th", { text: h }); }))]);
    const body = el("tbody", {}, rows.map(function (cells) {
      return el("tr", rowClass ? { className: rowClass } : {}, cells.map(function (c) {
        return typeof c === "string" ? el("td", { text: c }) : el("td", {}, [c]);
      }));
    }));
    return el("table", {}, [head, body]);
  }

  function settingsTable(settings) {
    const rows = Object.entries(settings || {}).map(function ([key, value]) {
      const text = value === null || value === undefined ? "—" :
        (typeof value === "object" ? JSON.stringify(value) : String(value));
      return [key, text];
    });
    return table(["setting", "value"], rows, "setting-row");
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) return [lo];
    const raw = (hi - lo) / count;
    const mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 5, 10].map(function (m) { return m * mag; }).find(function (s) { return s >= raw; });
    const ticks = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) ticks.push(Number(v.toPrecision(12)));
    return ticks;
  }

  /* spec: {title, xlabel, ylabel, xlog2, series: [{label, colour, dashed, points: [[x, y]], band: [[x, lo, hi]]}],
     hlines: [{y, label, colour}], vlines: [{x, colour}], xticks: [..], onPick: function (x)}. Non-finite values are
     skipped. Returns an <svg>. */
  function lineChart(spec) {
    const W = spec.width || CHART_WIDTH, H = spec.height || CHART_HEIGHT;
    const tx = spec.xlog2 ? function (x) { return Math.log2(x); } : function (x) { return x; };
    const xs = [], ys = [];
    for (const s of spec.series) {
      for (const p of s.points || []) if (Number.isFinite(num(p[1])) && Number.isFinite(num(p[0]))) { xs.push(tx(num(p[0]))); ys.push(num(p[1])); }
      for (const b of s.band || []) {
        for (const v of [num(b[1]), num(b[2])]) if (Number.isFinite(v)) ys.push(v);
      }
    }
    for (const h of spec.hlines || []) if (Number.isFinite(num(h.y))) ys.push(num(h.y));
    const root = svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, class: "chart", role: "img" });
    if (spec.title) root.appendChild(svg("text", { x: MARGIN.left, y: 16, class: "chart-title" }, spec.title));
    // Legend rows under the title, left to right, wrapping at the chart's width.
    let lx = MARGIN.left, ly = 16 + LEGEND_ROW;
    spec.series.forEach(function (s, i) {
      if (!s.label) return;
      const width = LEGEND_SWATCH + 6 + LEGEND_CHAR * s.label.length + 14;
      if (lx + width > W && lx > MARGIN.left) { lx = MARGIN.left; ly += LEGEND_ROW; }
      const colour = s.colour || COLOURS[i % COLOURS.length];
      root.appendChild(svg("line", { x1: lx, x2: lx + LEGEND_SWATCH, y1: ly - 4, y2: ly - 4, stroke: colour,
        class: s.dashed ? "series dashed" : "series" }));
      root.appendChild(svg("text", { x: lx + LEGEND_SWATCH + 6, y: ly, class: "legend" }, s.label));
      lx += width;
    });
    const top = spec.series.some(function (s) { return s.label; }) ? ly + 10 : MARGIN.top;
    if (!xs.length) {
      root.appendChild(svg("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "muted" }, "no finite values"));
      return root;
    }
    let x0 = xs.reduce(function (a, b) { return Math.min(a, b); }), x1 = xs.reduce(function (a, b) { return Math.max(a, b); });
    let y0 = ys.reduce(function (a, b) { return Math.min(a, b); }), y1 = ys.reduce(function (a, b) { return Math.max(a, b); });
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 1; y1 += 1; }
    const pad = (y1 - y0) * 0.05;
    y0 -= pad; y1 += pad;
    const pw = W - MARGIN.left - MARGIN.right, ph = H - top - MARGIN.bottom;
    const X = function (x) { return MARGIN.left + (tx(x) - x0) / (x1 - x0) * pw; };
    const Y = function (y) { return top + (1 - (y - y0) / (y1 - y0)) * ph; };
    const axes = svg("g", { class: "axes" });
    axes.appendChild(svg("rect", { x: MARGIN.left, y: top, width: pw, height: ph, class: "plot-area" }));
    for (const t of niceTicks(y0, y1, TICKS)) {
      axes.appendChild(svg("line", { x1: MARGIN.left, x2: MARGIN.left + pw, y1: Y(t), y2: Y(t), class: "grid" }));
      axes.appendChild(svg("text", { x: MARGIN.left - 6, y: Y(t) + 4, "text-anchor": "end" }, fmt(t, 3)));
    }
    const xticks = spec.xticks || (spec.xlog2 ? [] : niceTicks(x0, x1, TICKS));
    for (const t of xticks) {
      axes.appendChild(svg("text", { x: X(t), y: top + ph + 16, "text-anchor": "middle" }, fmt(t, 3)));
    }
    if (spec.xlabel) axes.appendChild(svg("text", { x: MARGIN.left + pw / 2, y: H - 6, "text-anchor": "middle" }, spec.xlabel));
    if (spec.ylabel) {
      axes.appendChild(svg("text", { x: 12, y: top + ph / 2, "text-anchor": "middle",
        transform: "rotate(-90 12 " + (top + ph / 2) + ")" }, spec.ylabel));
    }
    root.appendChild(axes);
    for (const v of spec.vlines || []) {
      root.appendChild(svg("line", { x1: X(v.x), x2: X(v.x), y1: top, y2: top + ph,
        stroke: v.colour || "#d62728", class: "vline" }));
    }
    for (const h of spec.hlines || []) {
      if (!Number.isFinite(num(h.y))) continue;
      root.appendChild(svg("line", { x1: MARGIN.left, x2: MARGIN.left + pw, y1: Y(num(h.y)), y2: Y(num(h.y)),
        stroke: h.colour || "#555", class: "hline" }));
      if (h.label) root.appendChild(svg("text", { x: MARGIN.left + 4, y: Y(num(h.y)) - 4, "text-anchor": "start",
        class: "muted" }, h.label));
    }
    spec.series.forEach(function (s, i) {
      const colour = s.colour || COLOURS[i % COLOURS.length];
      const band = (s.band || []).filter(function (b) {
        return Number.isFinite(num(b[0])) && Number.isFinite(num(b[1])) && Number.isFinite(num(b[2]));
      });
      if (band.length) {
        const upper = band.map(function (b) { return X(num(b[0])) + "," + Y(num(b[2])); });
        const lower = band.slice().reverse().map(function (b) { return X(num(b[0])) + "," + Y(num(b[1])); });
        root.appendChild(svg("polygon", { points: upper.concat(lower).join(" "), fill: colour, class: "band" }));
      }
      const pts = (s.points || []).filter(function (p) { return Number.isFinite(num(p[0])) && Number.isFinite(num(p[1])); });
      if (pts.length) {
        root.appendChild(svg("polyline", { points: pts.map(function (p) { return X(num(p[0])) + "," + Y(num(p[1])); }).join(" "),
          stroke: colour, class: s.dashed ? "series dashed" : "series" }));
        if (pts.length <= 64) {
          for (const p of pts) root.appendChild(svg("circle", { cx: X(num(p[0])), cy: Y(num(p[1])), r: 2.5, fill: colour }));
        }
      }
    });
    if (spec.onPick) {
      const hit = svg("rect", { x: MARGIN.left, y: top, width: pw, height: ph, class: "hit" });
      hit.addEventListener("click", function (event) {
        const box = root.getBoundingClientRect();
        const px = (event.clientX - box.left) * W / box.width;
        spec.onPick(x0 + (px - MARGIN.left) / pw * (x1 - x0));
      });
      root.appendChild(hit);
    }
    return root;
  }

  /* A completion's text in a span; an empty one as a muted "(empty)". */
  function textSpan(text) {
    return text ? el("span", { className: "text", text: text }) : el("span", { className: "muted", text: "(empty)" });
  }

  function readData() {
    return JSON.parse(document.getElementById("twistlm-data").textContent);
  }

  function finish(started) {
    setText("render-ms", Math.round(performance.now() - started));
    setText("render-status", window.twistlmErrors && window.twistlmErrors.length ? "errors" : "ok");
  }

  return { COLOURS, num, fmt, esc, el, svg, setText, section, table, settingsTable, lineChart, textSpan, readData, finish };
})();
