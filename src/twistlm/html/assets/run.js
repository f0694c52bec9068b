/* twistlm run page: final particles, ancestry, step view, ESS and log ψ traces of one SMC run (data contract:
   twistlm/html/run_page.py). Counts the tests read are written into elements with ids (n-particles, n-steps,
   final-count, step-count, step-label, check-ancestry, render-status). */
(function () {
  "use strict";
  const started = performance.now();
  const data = TW.readData();
  const app = document.getElementById("app");
  const ANCESTRY_WIDTH = 900;
  const ANCESTRY_HEIGHT = 560;
  const ANCESTRY_MARGIN = 36;
  const ROW_PX_MAX = 16;
  const NEWLINE_MARK = "↵";
  const INACTIVE = -1;
  const state = { run: 0, step: 1, selected: -1, sortByWeight: false };

  for (const part of location.hash.replace(/^#/, "").split("&")) {
    const [key, value] = part.split("=");
    if (key === "run" && Number.isInteger(+value)) state.run = Math.max(0, Math.min(data.runs.length - 1, +value));
    if (key === "step" && Number.isInteger(+value)) state.step = +value;
  }

  function softmax(row) {
    const v = row.map(function (x) { return x === null ? -Infinity : TW.num(x); });
    const m = Math.max.apply(null, v);
    if (!Number.isFinite(m)) return v.map(function () { return 0; });
    const e = v.map(function (x) { return Math.exp(x - m); });
    const s = e.reduce(function (a, b) { return a + b; }, 0);
    return e.map(function (x) { return x / s; });
  }

  /* parents[t-1][k]: the slot of step t-1 that slot k of step t continues (identity unless resampled after t-1). */
  function parentsOf(run) {
    const identity = Array.from({ length: run.K }, function (_, k) { return k; });
    const byStep = new Map(run.resampled_at.map(function (t, i) { return [t, run.ancestors[i]]; }));
    const out = [];
    for (let t = 1; t <= run.n; t++) out.push(byStep.get(t - 1) || identity);
    return out;
  }

  /* [1, 2, 3, 7, 9, 10] → "1–3, 7, 9–10". */
  function ranges(steps) {
    const parts = [];
    let start = null, prev = null;
    for (const s of steps.concat([null])) {
      if (start !== null && (s === null || s !== prev + 1)) { parts.push(start === prev ? String(start) : start + "–" + prev); start = null; }
      if (s !== null && start === null) start = s;
      prev = s;
    }
    return parts.join(", ");
  }

  function lineageSlots(parents, k, n) {
    const slots = new Array(n);
    let slot = k;
    for (let t = n; t >= 1; t--) { slots[t - 1] = slot; slot = parents[t - 1][slot]; }
    return slots;
  }

  function render() {
    const run = data.runs[state.run];
    const parents = parentsOf(run);
    state.step = Math.max(1, Math.min(run.n, state.step));
    app.textContent = "";
    const forced = run.trace ? run.trace.forced.map(function (slots) { return new Set(slots); }) : [];
    /* For every slot at step t: its tokens [vocab index, step, forced] from step 1 to t, following the parents back
       (forced flags belong to the slot a token was chosen in). */
    function withSlots(t) {
      const tok = run.trace.tok;
      const out = [];
      for (let k = 0; k < run.K; k++) {
        const pieces = [];
        let slot = k;
        for (let s = t; s >= 1; s--) {
          const v = tok[s - 1][slot];
          if (v !== INACTIVE) pieces.push([v, s, forced[s - 1].has(slot)]);
          slot = parents[s - 1][slot];
        }
        out.push(pieces.reverse());
      }
      return out;
    }
    function piecesHtml(pieces, current) {
      let html = "";
      for (const [v, s, isForced] of pieces) {
        const cls = "tok" + (isForced ? " tool" : "") + (s === current ? " now" : "");
        const text = data.vocab[v].split("\n").join(NEWLINE_MARK + "\n");
        html += '<span class="' + cls + '"' + (isForced ? ' title="spliced in by the tool"' : "") + ">" + TW.esc(text) + "</span>";
      }
      return html;
    }

    // ---- summary
    const summary = TW.el("p", { className: "summary" }, [
      TW.el("span", { id: "n-particles", text: run.K }), " particles · ",
      TW.el("span", { id: "n-steps", text: run.n }), " steps · resampled ",
      TW.el("span", { id: "n-resampled", text: run.resampled_at.length }), " times · log Ẑ = ",
      TW.el("span", { id: "log-z", text: TW.fmt(run.log_z) }),
      data.runs.length > 1 ? " · prompt " + (state.run + 1) + " of " : "",
      data.runs.length > 1 ? TW.el("span", { id: "n-runs", text: data.runs.length }) : null,
    ]);
    app.appendChild(summary);
    app.appendChild(TW.el("p", { className: "prompt" }, [TW.el("strong", { text: "prompt " }), TW.el("span", { className: "text", text: run.prompt })]));
    if (data.runs.length > 1) {
      const select = TW.el("select", { id: "run-select" }, data.runs.map(function (r, i) {
        const option = TW.el("option", { value: i, text: "prompt " + (i + 1) + ": " + r.prompt.slice(0, 60) });
        if (i === state.run) option.selected = true;
        return option;
      }));
      select.addEventListener("change", function () { state.run = +select.value; state.selected = -1; render(); });
      app.appendChild(TW.el("p", {}, ["show ", select]));
    }
    app.appendChild(TW.section("Settings", "settings", [TW.settingsTable(data.settings)]));

    // ---- final particles
    const finalPieces = run.trace ? withSlots(run.n) : null;
    const hasTool = run.trace !== null && run.trace.forced.some(function (slots) { return slots.length > 0; });
    const order = Array.from({ length: run.K }, function (_, k) { return k; }).sort(function (a, b) { return run.w[b] - run.w[a] || a - b; });
    const finalTable = TW.table(["#", "particle", "weight", "log w", "log φ", "end", "origin", "text"], []);
    let rows = "";
    order.forEach(function (k, rank) {
      const text = finalPieces ? piecesHtml(finalPieces[k], -1) : TW.esc(run.texts[k]);
      const bar = '<span class="bar" style="width:' + (100 * run.w[k]).toFixed(1) + '%"></span>';
      rows += '<tr class="final-row" data-slot="' + k + '"><td>' + (rank + 1) + "</td><td>" + k + '</td><td class="w">' +
        bar + TW.esc(TW.fmt(run.w[k])) + "</td><td>" + TW.esc(TW.fmt(run.log_w[k] === null ? -Infinity : run.log_w[k])) + "</td><td>" + TW.esc(TW.fmt(run.log_phi[k])) +
        "</td><td>" + (run.eos[k] ? "EOS" : "at T") + "</td><td>" + run.lineage[k] + '</td><td class="text">' + text + "</td></tr>";
    });
    finalTable.tBodies[0].innerHTML = rows;
    finalTable.tBodies[0].addEventListener("click", function (event) {
      const tr = event.target.closest("tr");
      if (tr) select(+tr.getAttribute("data-slot"));
    });
    const finalNote = TW.el("p", { className: "muted" }, [
      "Sorted by normalised weight; ", TW.el("span", { id: "final-count", text: order.length }),
      " particles. End: EOS, or cut at the horizon T. Origin: the initial particle each descends from. ",
      hasTool ? TW.el("span", { className: "tok tool", text: "Marked" }) : null,
      hasTool ? " tokens were spliced in by the tool. " : null, "Click a row to trace its ancestry.",
    ]);
    app.appendChild(TW.section("Final particles", "final", [finalNote, TW.el("div", { className: "scroll" }, [finalTable])]));

    // ---- ESS and log Ẑ
    const kappa = TW.num(data.settings && data.settings.ess_threshold);
    const ess = TW.lineChart({
      title: "ESS per step (before resampling); red: resampled after t",
      xlabel: "step t", ylabel: "ESS",
      series: [{ points: run.ess.map(function (v, i) { return [i + 1, v]; }) }],
      hlines: Number.isFinite(kappa) && kappa > 0 && kappa < 1 ? [{ y: kappa * run.K, label: "κ·K" }] : [{ y: run.K, label: "K" }],
      vlines: run.resampled_at.map(function (t) { return { x: t }; }),
      onPick: function (x) { setStep(Math.round(x)); },
    });
    const resampledText = run.resampled_at.length ? "resampled after t = " + ranges(run.resampled_at) : "never resampled";
    app.appendChild(TW.section("ESS and resampling", "ess", [ess, TW.el("p", { className: "muted", text: resampledText +
      " · log Ẑ = " + TW.fmt(run.log_z) + " · click the chart to open that step" })]));

    // ---- ancestry
    const rowPx = Math.min(ROW_PX_MAX, (ANCESTRY_HEIGHT - 2 * ANCESTRY_MARGIN) / Math.max(1, run.K));
    const H = rowPx * run.K + 2 * ANCESTRY_MARGIN;
    const W = ANCESTRY_WIDTH;
    const X = function (t) { return ANCESTRY_MARGIN + (run.n > 1 ? (t - 1) / (run.n - 1) : 0.5) * (W - 2 * ANCESTRY_MARGIN); };
    const Y = function (k) { return ANCESTRY_MARGIN + (k + 0.5) * rowPx; };
    const alive = [];
    alive[run.n - 1] = new Array(run.K).fill(true);
    for (let t = run.n; t >= 2; t--) {
      const prev = new Array(run.K).fill(false);
      for (let k = 0; k < run.K; k++) if (alive[t - 1][k]) prev[parents[t - 1][k]] = true;
      alive[t - 2] = prev;
    }
    let dead = "", live = "";
    for (let t = 2; t <= run.n; t++) {
      for (let k = 0; k < run.K; k++) {
        const seg = "M" + X(t - 1).toFixed(1) + " " + Y(parents[t - 1][k]).toFixed(1) + "L" + X(t).toFixed(1) + " " + Y(k).toFixed(1);
        if (alive[t - 1][k]) live += seg; else dead += seg;
      }
    }
    const anc = TW.svg("svg", { viewBox: "0 0 " + W + " " + H, width: W, height: H, class: "ancestry", id: "ancestry-plot" });
    anc.appendChild(TW.svg("path", { d: dead, class: "link dead" }));
    anc.appendChild(TW.svg("path", { d: live, class: "link live" }));
    for (const t of run.resampled_at) {
      anc.appendChild(TW.svg("line", { x1: (X(t) + X(t + 1)) / 2, x2: (X(t) + X(t + 1)) / 2, y1: ANCESTRY_MARGIN - 8, y2: ANCESTRY_MARGIN - 2, class: "resample-tick" }));
    }
    anc.appendChild(TW.svg("text", { x: ANCESTRY_MARGIN, y: 14 }, "step 1"));
    anc.appendChild(TW.svg("text", { x: W - ANCESTRY_MARGIN, y: 14, "text-anchor": "end" }, "step " + run.n));
    anc.appendChild(TW.svg("text", { x: W / 2, y: H - 10, "text-anchor": "middle", class: "muted" },
      "particle slots (rows) over steps; blue: lineages of the final particles, grey: died out at resampling"));
    const stepLine = TW.svg("line", { y1: ANCESTRY_MARGIN - 4, y2: H - ANCESTRY_MARGIN + 4, class: "step-line" });
    anc.appendChild(stepLine);
    const selectedPath = TW.svg("path", { d: "", class: "link selected" });
    anc.appendChild(selectedPath);
    anc.addEventListener("click", function (event) {
      const box = anc.getBoundingClientRect();
      const px = (event.clientX - box.left) * W / box.width, py = (event.clientY - box.top) * H / box.height;
      const t = Math.round((px - ANCESTRY_MARGIN) / (W - 2 * ANCESTRY_MARGIN) * (run.n - 1)) + 1;
      setStep(t);
      const k = Math.floor((py - ANCESTRY_MARGIN) / rowPx);
      if (k >= 0 && k < run.K && state.step === run.n) select(k);
    });
    app.appendChild(TW.section("Ancestry", "ancestry", [TW.el("div", { className: "scroll" }, [anc])]));

    // ---- step view
    const stepSection = TW.section("Step view", "steps", []);
    app.appendChild(stepSection);
    let stepTable = null, stepInfo = null, slider = null;
    if (run.trace) {
      slider = TW.el("input", { type: "range", min: 1, max: run.n, value: state.step, id: "step-slider" });
      slider.addEventListener("input", function () { setStep(+slider.value); });
      const prev = TW.el("button", { type: "button", text: "◀" }), next = TW.el("button", { type: "button", text: "▶" });
      prev.addEventListener("click", function () { setStep(state.step - 1); });
      next.addEventListener("click", function () { setStep(state.step + 1); });
      const sort = TW.el("input", { type: "checkbox", id: "sort-weight" });
      sort.checked = state.sortByWeight;
      sort.addEventListener("change", function () { state.sortByWeight = sort.checked; drawStep(); });
      stepSection.appendChild(TW.el("div", { className: "controls" }, [
        prev, slider, next, " step ", TW.el("strong", { id: "step-label" }), " of " + run.n + " ",
        TW.el("label", {}, [sort, " sort by weight"]),
      ]));
      stepInfo = TW.el("p", { className: "muted", id: "step-info" });
      stepSection.appendChild(stepInfo);
      const headers = ["particle", "from", "weight", "log w"].concat(run.trace.psi ? ["log ψ"] : []).concat(["text s₁:t (this step's token outlined)"]);
      stepTable = TW.table(headers, []);
      stepSection.appendChild(TW.el("div", { className: "scroll" }, [stepTable]));
      stepTable.tBodies[0].addEventListener("click", function (event) {
        const tr = event.target.closest("tr");
        if (tr && state.step === run.n) select(+tr.getAttribute("data-slot"));
      });
    } else {
      stepSection.appendChild(TW.el("p", { className: "muted", id: "step-label",
        text: "No per-step record: sample with callback=twistlm.SMCTrace(lm) and pass trace= to to_html (the CLI's --html does)." }));
    }

    // ---- log ψ
    if (run.trace && run.trace.psi) {
      const mean = [], band = [];
      run.trace.psi.forEach(function (row, i) {
        const v = row.map(TW.num).filter(Number.isFinite);
        if (!v.length) return;
        mean.push([i + 1, v.reduce(function (a, b) { return a + b; }, 0) / v.length]);
        band.push([i + 1, Math.min.apply(null, v), Math.max.apply(null, v)]);
      });
      const chart = TW.lineChart({ title: "log ψ_t of the chosen tokens (mean, band: min–max over unfinished particles)",
        xlabel: "step t", ylabel: "log ψ", series: [{ label: "mean log ψ", points: mean, band: band }],
        onPick: function (x) { setStep(Math.round(x)); } });
      app.appendChild(TW.section("Twist values", "psi", [chart]));
    }

    function drawStep() {
      const t = state.step;
      stepLine.setAttribute("x1", X(t));
      stepLine.setAttribute("x2", X(t));
      if (!run.trace) return;
      slider.value = t;
      TW.setText("step-label", t);
      const w = softmax(run.trace.logw[t - 1]);
      const pieces = withSlots(t);
      const resampled = run.resampled_at.indexOf(t) >= 0;
      stepInfo.textContent = "weights W after step " + t + (resampled ? "; resampled after this step" : "") +
        (run.resampled_at.indexOf(t - 1) >= 0 ? "; 'from': the particle of step " + (t - 1) + " each was resampled from" : "");
      const slots = Array.from({ length: run.K }, function (_, k) { return k; });
      if (state.sortByWeight) slots.sort(function (a, b) { return w[b] - w[a] || a - b; });
      let html = "";
      for (const k of slots) {
        const active = run.trace.tok[t - 1][k] !== INACTIVE;
        const lw = run.trace.logw[t - 1][k];
        html += '<tr class="step-row' + (active ? "" : " finished") + (k === state.selected ? " selected" : "") + '" data-slot="' + k + '"><td>' + k +
          "</td><td>" + (t > 1 ? parents[t - 1][k] : "") + '</td><td class="w"><span class="bar" style="width:' + (100 * w[k]).toFixed(1) + '%"></span>' +
          TW.esc(TW.fmt(w[k])) + "</td><td>" + TW.esc(TW.fmt(lw === null ? -Infinity : lw)) + "</td>" +
          (run.trace.psi ? "<td>" + TW.esc(TW.fmt(run.trace.psi[t - 1][k])) + "</td>" : "") +
          '<td class="text">' + piecesHtml(pieces[k], t) + (active ? "" : ' <span class="muted">(finished)</span>') + "</td></tr>";
      }
      stepTable.tBodies[0].innerHTML = html;
      TW.setText("step-count", slots.length);
    }

    function drawSelection() {
      if (state.selected < 0) { selectedPath.setAttribute("d", ""); return; }
      const slots = lineageSlots(parents, state.selected, run.n);
      let d = "M" + X(1) + " " + Y(slots[0]);
      for (let t = 2; t <= run.n; t++) d += "L" + X(t) + " " + Y(slots[t - 1]);
      selectedPath.setAttribute("d", d);
      for (const tr of finalTable.tBodies[0].rows) tr.classList.toggle("selected", +tr.getAttribute("data-slot") === state.selected);
    }

    function setStep(t) {
      state.step = Math.max(1, Math.min(run.n, t));
      drawStep();
    }

    function select(k) {
      state.selected = state.selected === k ? -1 : k;
      drawSelection();
      drawStep();
    }

    // ---- self-check: the ancestry and the per-step tokens reproduce the final particles
    let check = "ok";
    let origin = Array.from({ length: run.K }, function (_, k) { return k; });
    for (let t = run.n; t >= 1; t--) origin = origin.map(function (k) { return parents[t - 1][k]; });
    if (origin.some(function (o, k) { return o !== run.lineage[k]; })) check = "lineage mismatch";
    if (run.trace && run.ids) {
      const last = withSlots(run.n);
      for (let k = 0; k < run.K && check === "ok"; k++) {
        const got = last[k].map(function (p) { return p[0]; });
        if (got.length !== run.ids[k].length || got.some(function (v, i) { return v !== run.ids[k][i]; })) check = "tokens of particle " + k + " differ";
      }
    }
    app.appendChild(TW.el("p", { className: "muted" }, ["ancestry check: ", TW.el("span", { id: "check-ancestry", text: check })]));
    app.appendChild(TW.el("p", { className: "muted" }, ["rows in the step view: ", TW.el("span", { id: "step-count", text: 0 })]));
    drawStep();
    drawSelection();
  }

  render();
  TW.finish(started);
})();
