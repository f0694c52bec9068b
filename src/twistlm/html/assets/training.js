/* twistlm training page: every logged metric over the steps, and samples at a few logging steps (data contract:
   twistlm/html/training_page.py). Counts for tests: n-log-entries, n-charts, n-snapshots, render-status. */
(function () {
  "use strict";
  const started = performance.now();
  const data = TW.readData();
  const app = document.getElementById("app");
  const history = data.history || [];
  const titles = new Map((data.panels || []).map(function (p) { return [p[0], p[1]]; }));
  const keys = [];
  for (const [key] of data.panels || []) keys.push(key);
  for (const entry of history) {
    for (const [key, value] of Object.entries(entry)) {
      if (key !== "step" && keys.indexOf(key) < 0 && (typeof value === "number" || typeof value === "string")) keys.push(key);
    }
  }
  const charts = [];
  for (const key of keys) {
    const points = history.filter(function (e) { return key in e; }).map(function (e) { return [e.step, TW.num(e[key])]; })
      .filter(function (p) { return Number.isFinite(p[0]) && Number.isFinite(p[1]); });
    if (!points.length) continue;
    charts.push(TW.lineChart({ title: titles.get(key) || key, xlabel: "step", series: [{ points: points }], width: 460, height: 220 }));
  }
  const last = history.length ? history[history.length - 1].step : 0;
  app.appendChild(TW.el("p", { className: "summary" }, [
    TW.el("span", { id: "n-log-entries", text: history.length }), " logged steps (last: step " + last + ") · ",
    TW.el("span", { id: "n-charts", text: charts.length }), " metrics · ",
    TW.el("span", { id: "n-snapshots", text: (data.samples || []).length }), " sample snapshots",
  ]));
  app.appendChild(TW.section("Metrics", "metrics", [TW.el("div", { className: "chart-grid" }, charts)]));
  if ((data.samples || []).length) {
    const blocks = data.samples.map(function (snap) {
      const items = snap.samples.map(function (s) {
        const extra = Object.entries(s).filter(function (kv) { return kv[0] !== "text"; })
          .map(function (kv) { return kv[0] + " " + (typeof kv[1] === "string" && !/^-?inf$|^nan$/.test(kv[1]) ? kv[1] : TW.fmt(kv[1], 3)); }).join(" · ");
        return TW.el("li", {}, [TW.textSpan(s.text), TW.el("span", { className: "muted", text: extra ? "  " + extra : "" })]);
      });
      return TW.el("div", { className: "snapshot" }, [TW.el("h3", { text: "step " + snap.step }), TW.el("ol", {}, items)]);
    });
    app.appendChild(TW.section("Samples during training", "samples", [TW.el("div", { className: "sample-grid" }, blocks)]));
  }
  app.appendChild(TW.section("Settings", "settings", [TW.el("details", {}, [
    TW.el("summary", { text: Object.keys(data.config || {}).length + " settings" }), TW.settingsTable(data.config)])]));
  TW.finish(started);
})();
