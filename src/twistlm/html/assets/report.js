/* twistlm evaluation page: bounds on log Z vs K per proposal, the KL table with intervals, and exact σ samples next
   to samples from each proposal (data contract: twistlm/html/report_page.py). Counts for tests: n-proposals,
   n-counts, n-exact, render-status. */
(function () {
  "use strict";
  const started = performance.now();
  const data = TW.readData();
  const app = document.getElementById("app");
  const b = data.bounds;
  const proposals = Array.from(new Set(b.entries.map(function (e) { return e.proposal; })));
  const counts = Array.from(new Set(b.entries.map(function (e) { return e.num_particles; }))).sort(function (x, y) { return x - y; });

  function interval(est) {
    if (!est) return "—";
    const m = TW.num(est.mean);
    if (!Number.isFinite(m)) return TW.fmt(m);
    const lo = TW.num(est.ci95[0]), hi = TW.num(est.ci95[1]);
    return TW.fmt(m) + "  [" + TW.fmt(lo) + ", " + TW.fmt(hi) + "]";
  }

  const sourceText = { exact: "exact, by enumeration", rejection: "from the rejection sampler's acceptance rate", bounds: "midpoint of the pooled bounds" };
  app.appendChild(TW.el("p", { className: "summary" }, [
    TW.el("span", { id: "n-proposals", text: proposals.length }), " proposals · K ∈ {", counts.join(", "), "} (",
    TW.el("span", { id: "n-counts", text: counts.length }), " values) · ", String(b.num_runs), " runs per point · log Ẑ_best = ",
    TW.el("span", { id: "log-z-best", text: TW.fmt(data.log_z_best) }), " (" + (sourceText[data.log_z_best_source] || data.log_z_best_source) + ")",
  ]));
  const settings = Object.assign({}, data.meta, { sampler: b.sampler, resampler: b.resampler, "κ": b.ess_threshold,
    "exact samples (upper bounds)": b.num_exact_samples });
  app.appendChild(TW.section("Settings", "settings", [TW.settingsTable(settings)]));

  // ---- bounds vs K
  const series = [];
  proposals.forEach(function (name, i) {
    const colour = TW.COLOURS[i % TW.COLOURS.length];
    for (const side of ["lower", "upper"]) {
      const entries = b.entries.filter(function (e) { return e.proposal === name && e[side]; });
      if (!entries.length) continue;
      series.push({ label: name + " (" + side + ")", colour: colour, dashed: side === "upper",
        points: entries.map(function (e) { return [e.num_particles, e[side].mean]; }),
        band: entries.map(function (e) { return [e.num_particles, e[side].ci95[0], e[side].ci95[1]]; }) });
    }
  });
  const hlines = Number.isFinite(TW.num(data.log_z_exact)) ? [{ y: data.log_z_exact, label: "log Z (exact)", colour: "#000" }] : [];
  const chart = TW.lineChart({ title: "Bounds on log Z (solid: lower, dashed: upper; bands: 95% CI)", xlabel: "particles K",
    ylabel: "log Ẑ", xlog2: true, xticks: counts, series: series, hlines: hlines, width: 760, height: 320 });
  const boundRows = [];
  for (const name of proposals) {
    for (const k of counts) {
      const e = b.entries.find(function (x) { return x.proposal === name && x.num_particles === k; });
      if (e) boundRows.push([name, String(k), interval(e.lower), interval(e.upper)]);
    }
  }
  app.appendChild(TW.section("Bounds on log Z", "bounds", [chart,
    TW.el("div", { className: "scroll" }, [TW.table(["proposal", "K", "lower log Ẑ [95% CI]", "upper log Ẑ [95% CI]"], boundRows, "bound-row")])]));

  // ---- KL table
  const klRows = proposals.filter(function (n) { return data.kl[n]; }).map(function (name) {
    const k = data.kl[name];
    return [name, interval(k.kl_q_sigma), interval(k.kl_sigma_q), interval(k.kl_sum)];
  });
  app.appendChild(TW.section("KL estimates", "kl", [
    TW.table(["proposal", "KL(q‖σ) [95% CI]", "KL(σ‖q) [95% CI]", "sum [95% CI]"], klRows, "kl-row"),
    TW.el("p", { className: "muted", text: "From K = 1 weights: KL(q‖σ) = log Ẑ_best − mean_q log w, KL(σ‖q) = mean_σ log w − log Ẑ_best; the sum needs no log Z." }),
  ]));

  // ---- samples
  const ex = data.examples;
  if (ex) {
    const columns = [];
    const exact = ex.exact || [];
    columns.push(TW.el("div", { className: "sample-col" }, [TW.el("h3", { text: "exact σ (" + (ex.exact_method || "none") + ")" }),
      exact.length ? TW.el("ol", {}, exact.map(function (t) { return TW.el("li", {}, [TW.textSpan(t)]); }))
        : TW.el("p", { className: "muted", text: "no exact samples (--exact none, or φ not bounded)" })]));
    for (const name of Object.keys(ex.proposals || {})) {
      const items = ex.proposals[name].map(function (s) {
        return TW.el("li", {}, [TW.textSpan(s.text),
          TW.el("span", { className: "muted", text: "  ŵ " + TW.fmt(s.weight, 3) + " · log φ " + TW.fmt(s.log_phi, 3) })]);
      });
      columns.push(TW.el("div", { className: "sample-col" }, [TW.el("h3", { text: name + " (draws from q)" }), TW.el("ol", {}, items)]));
    }
    app.appendChild(TW.section("Samples", "samples", [
      TW.el("p", { className: "muted" }, ["Exact target samples (", TW.el("span", { id: "n-exact", text: exact.length }),
        ") next to independent draws from each proposal with their self-normalised importance weights ŵ."]),
      TW.el("div", { className: "sample-grid" }, columns)]));
  }
  TW.finish(started);
})();
