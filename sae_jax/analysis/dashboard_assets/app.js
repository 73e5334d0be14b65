/* sae_jax feature dashboard: vanilla JS over window.SAE_CATALOG (written to data.js). */
(function () {
  "use strict";
  var DATA = window.SAE_CATALOG;
  if (!DATA || !DATA.features) { throw new Error("data.js did not define window.SAE_CATALOG"); }
  var H = DATA.header, FEATURES = DATA.features, BY_ID = {};
  FEATURES.forEach(function (f, i) { BY_ID[f.id] = i; });
  /* window.SAE_AUDIT (audit.js): the run's `sae-jax audit` report, or null. */
  var AUDIT = window.SAE_AUDIT || null, AUD = {};
  if (AUDIT) AUDIT.features.forEach(function (r) { AUD[r.id] = r; });
  FEATURES.forEach(function (f) {
    var a = AUD[f.id];
    if (a) { f.causal = a.causal; f.explanatory = a.explanatory; }
  });
  var PAGE = 500;
  var state = { key: "frequency", dir: -1, query: "", limit: PAGE };
  var SVGNS = "http://www.w3.org/2000/svg";

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    for (var k in attrs || {}) {
      if (k === "text") e.textContent = attrs[k];
      else if (k === "cls") e.className = attrs[k];
      else e.setAttribute(k, attrs[k]);
    }
    (children || []).forEach(function (c) { if (c != null) e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }
  function svg(tag, attrs) {
    var e = document.createElementNS(SVGNS, tag);
    for (var k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }
  function fmt(x, digits) {
    if (x === 0) return "0";
    if (x == null) return "";
    var a = Math.abs(x);
    if (a < 1e-3 || a >= 1e5) return x.toExponential(2);
    var s = x.toPrecision(digits || 3);
    if (s.indexOf(".") >= 0 && s.indexOf("e") < 0) s = s.replace(/0+$/, "").replace(/\.$/, "");
    return s;
  }
  function pct(x) { return x === 0 ? "0" : (x * 100 < 0.01 ? (x * 100).toExponential(1) : fmt(x * 100, 3)) + "%"; }
  // WordPiece (MiniLM) continues a word with "##"; byte-level BPE (GPT-2, Llama 3, Qwen) and
  // SentencePiece (Llama 2, Gemma) mark a leading space in the token ("Ġ" / "▁", "Ċ" = newline).
  function spaceMarked(t) { return /[Ġ▁]/.test(t); }
  function showTok(t) {
    return t.indexOf("##") === 0 ? t.slice(2) : t.replace(/[Ġ▁]/g, " ").replace(/Ċ/g, "↵");
  }

  /* ---------- histograms ---------- */
  function barChart(counts, lo, hi, opts) {
    opts = opts || {};
    var W = opts.width || 320, Hh = opts.height || 110, pad = 18;
    var s = svg("svg", { width: W, height: Hh + pad, viewBox: "0 0 " + W + " " + (Hh + pad), role: "img" });
    var n = counts.length, max = Math.max.apply(null, counts.concat([1]));
    var bw = (W - 2) / Math.max(n, 1);
    counts.forEach(function (c, i) {
      if (!c) return;
      var h = Math.max(1, (opts.log ? Math.log(1 + c) / Math.log(1 + max) : c / max) * (Hh - 4));
      var r = svg("rect", { x: 1 + i * bw, y: Hh - h, width: Math.max(bw - 1, 1), height: h,
        "class": "bar" + (opts.mark != null && i === opts.mark ? " mark" : "") });
      var L = opts.label || fmt, t = svg("title", {});
      t.textContent = c + " in [" + L(lo + i * (hi - lo) / n) + ", " + L(lo + (i + 1) * (hi - lo) / n) + ")";
      r.appendChild(t); s.appendChild(r);
    });
    return axis(s, W, Hh, lo, hi, opts.label);
  }
  function axis(s, W, Hh, lo, hi, label) {
    s.appendChild(svg("line", { x1: 0, y1: Hh, x2: W, y2: Hh, "class": "axis" }));
    var labels = [[lo, "start"], [(lo + hi) / 2, "middle"], [hi, "end"]];
    labels.forEach(function (l, i) {
      var t = svg("text", { x: i === 0 ? 1 : (i === 1 ? W / 2 : W - 1), y: Hh + 13, "text-anchor": l[1] });
      t.textContent = label ? label(l[0]) : fmt(l[0]); s.appendChild(t);
    });
    return s;
  }
  /* Two histograms over the same bins, side by side in each bin: trained (orange), random (grey). */
  function pairChart(real, rand, lo, hi) {
    var W = 300, Hh = 90, pad = 18, n = real.length, bw = (W - 2) / Math.max(n, 1);
    var s = svg("svg", { width: W, height: Hh + pad, viewBox: "0 0 " + W + " " + (Hh + pad), role: "img" });
    var max = Math.max.apply(null, real.concat(rand, [1]));
    [[real, "bar", 0, "trained"], [rand, "bar random", 1, "random"]].forEach(function (spec) {
      spec[0].forEach(function (c, i) {
        if (!c) return;
        var h = Math.max(1, c / max * (Hh - 4));
        var r = svg("rect", { x: 1 + i * bw + spec[2] * bw / 2, y: Hh - h, width: Math.max(bw / 2 - 0.5, 0.5), height: h, "class": spec[1] });
        var t = svg("title", {});
        t.textContent = spec[3] + ": " + c + " in [" + fmt(lo + i * (hi - lo) / n) + ", " + fmt(lo + (i + 1) * (hi - lo) / n) + ")";
        r.appendChild(t); s.appendChild(r);
      });
    });
    return axis(s, W, Hh, lo, hi);
  }
  var DENSITY = (function () {
    var lo = 0, vals = [];
    FEATURES.forEach(function (f) { if (f.frequency > 0) { var v = Math.log10(f.frequency); vals.push(v); lo = Math.min(lo, v); } });
    lo = Math.floor(lo) - (lo === 0 ? 1 : 0);
    var bins = Math.max(8, Math.round(-lo * 8)), counts = new Array(bins).fill(0);
    vals.forEach(function (v) { counts[Math.min(bins - 1, Math.floor((v - lo) / -lo * bins))]++; });
    return { lo: lo, hi: 0, bins: bins, counts: counts, dead: FEATURES.length - vals.length };
  })();
  function densityChart(markFreq, width) {
    var mark = null;
    if (markFreq > 0) mark = Math.min(DENSITY.bins - 1, Math.floor((Math.log10(markFreq) - DENSITY.lo) / -DENSITY.lo * DENSITY.bins));
    var fig = el("div", {}, [barChart(DENSITY.counts, DENSITY.lo, DENSITY.hi, { width: width || 520, mark: mark, label: function (x) { return x === 0 ? "1" : "1e" + fmt(x); } })]);
    fig.appendChild(el("div", { cls: "muted", text: DENSITY.dead + " of " + FEATURES.length + " features never fired (not shown)" }));
    return fig;
  }
  function activationChart(f) {
    var hg = H.histogram, c = f.activation_histogram || [];
    var first = c.findIndex(function (x) { return x > 0; });
    if (first < 0) return el("div", { cls: "muted", text: "never fired" });
    var last = c.length - 1; while (c[last] === 0) last--;
    first = Math.max(0, first - 1); last = Math.min(c.length - 1, last + 1);
    var step = (hg.log10_hi - hg.log10_lo) / hg.bins;
    return barChart(c.slice(first, last + 1), hg.log10_lo + first * step, hg.log10_lo + (last + 1) * step,
      { width: 320, label: function (x) { return fmt(Math.pow(10, x)); } });
  }

  /* ---------- examples ---------- */
  function example(ex, scale) {
    var row = el("div", { cls: "example" });
    row.appendChild(el("span", { cls: "val", text: fmt(ex.value) + (ex.doc != null ? "  doc " + ex.doc + ":" + ex.pos : "") }));
    var marked = ex.tokens.some(spaceMarked);  // the tokens carry their own spaces
    ex.tokens.forEach(function (t, i) {
      var a = ex.activations[i] || 0, alpha = scale > 0 ? Math.min(1, a / scale) : 0;
      var sp = el("span", { cls: "tok" + (i === ex.highlight_index ? " hl" : ""), title: t + ": " + fmt(a) });
      if (i > 0 && !marked && t.indexOf("##") !== 0) row.appendChild(document.createTextNode(" "));
      sp.textContent = showTok(t);
      if (alpha > 0) sp.style.backgroundColor = "rgba(240, 140, 0, " + (0.12 + 0.88 * alpha).toFixed(3) + ")";
      row.appendChild(sp);
    });
    return row;
  }
  function tokenChips(f, n) {
    var d = el("div");
    (f.top_tokens || []).slice(0, n).forEach(function (tc) {
      d.appendChild(el("span", { cls: "tok-chip" }, [tc[0], el("small", { text: String(tc[1]) })]));
    });
    return d;
  }

  /* ---------- index view ---------- */
  function matches(f, q) {
    if (!q) return true;
    if (/^#?\d+$/.test(q)) return String(f.id) === q.replace("#", "");
    if (f.label && f.label.toLowerCase().indexOf(q) >= 0) return true;
    return (f.top_tokens || []).some(function (tc) { return tc[0].toLowerCase().indexOf(q) >= 0 || showTok(tc[0]).toLowerCase() === q; });
  }
  function renderTable() {
    var q = state.query.trim().toLowerCase();
    var rows = FEATURES.filter(function (f) { return matches(f, q); });
    var k = state.key, d = state.dir;
    rows.sort(function (a, b) {
      var x = a[k], y = b[k];
      if (x == null) x = ""; if (y == null) y = "";
      return (x < y ? -1 : x > y ? 1 : a.id - b.id) * d;
    });
    var tb = document.querySelector("#feature-table tbody");
    tb.textContent = "";
    rows.slice(0, state.limit).forEach(function (f) {
      var cells = [
        el("td", { cls: "num" }, [el("a", { href: "#feature-" + f.id, text: String(f.id) })]),
        el("td", { cls: "num", text: pct(f.frequency) }),
        el("td", { cls: "num", text: fmt(f.mean_activation) }),
        el("td", { cls: "num", text: fmt(f.max_activation) }),
        el("td", {}, [tokenChips(f, 6)])];
      if (AUDIT) cells.push(el("td", { cls: "num", text: fmt(f.causal) }), el("td", { cls: "num", text: fmt(f.explanatory) }));
      cells.push(el("td", { text: f.label || "" }));
      var tr = el("tr", { "data-id": f.id }, cells);
      tr.addEventListener("click", function (e) { if (e.target.tagName !== "A") location.hash = "feature-" + f.id; });
      tb.appendChild(tr);
    });
    document.getElementById("count").textContent = rows.length + " of " + FEATURES.length + " features";
    var more = document.getElementById("more");
    more.textContent = "";
    if (rows.length > state.limit) {
      var a = el("a", { href: "javascript:void 0", text: "show " + Math.min(PAGE, rows.length - state.limit) + " more" });
      a.addEventListener("click", function () { state.limit += PAGE; renderTable(); });
      more.appendChild(document.createTextNode((rows.length - state.limit) + " more not shown: "));
      more.appendChild(a);
    }
    document.querySelectorAll("#feature-table th").forEach(function (th) {
      th.classList.remove("sorted-asc", "sorted-desc");
      if (th.dataset.key === k) th.classList.add(d > 0 ? "sorted-asc" : "sorted-desc");
    });
  }

  /* ---------- feature view ---------- */
  function stat(value, name) { return el("div", {}, [el("b", { text: value }), el("span", { text: name })]); }
  function renderFeature(id) {
    var v = document.getElementById("feature-view"), f = FEATURES[BY_ID[id]];
    v.textContent = "";
    if (!f) { v.appendChild(el("p", { text: "No feature " + id + " in this catalog." })); return; }
    var i = BY_ID[id], prev = FEATURES[i - 1], next = FEATURES[i + 1];
    var nav = el("span", { cls: "nav" }, [el("a", { href: "#", text: "all features" }),
      prev ? el("a", { href: "#feature-" + prev.id, text: "\u2190 " + prev.id }) : null,
      next ? el("a", { href: "#feature-" + next.id, text: next.id + " \u2192" }) : null]);
    v.appendChild(el("div", { cls: "feature-head" }, [el("h2", { text: "Feature " + f.id }),
      el("span", { cls: "muted", text: f.label || "unlabelled" }), nav]));
    v.appendChild(el("div", { cls: "stats" }, [stat(pct(f.frequency), "frequency (" + f.count + " of " + H.n_rows + " tokens)"),
      stat(fmt(f.mean_activation), "mean activation when active"), stat(fmt(f.max_activation), "max activation")]));
    var scale = f.max_activation || 0, dl = DIFF && DIFF.latents[String(f.id)];
    var left = el("div", { id: "examples" });
    left.appendChild(el("h3", { text: "Top activations" }));
    if (dl) left.appendChild(el("p", { cls: "muted", text: "Under each example: the latent's pre-activation split into " + DIFF.source_a +
      "'s and " + DIFF.source_b + "'s encoder terms (+ bias), and the norm of its decoder write into each model." }));
    if (!f.top_examples.length) left.appendChild(el("p", { cls: "muted", text: "This feature never fired on these rows." }));
    f.top_examples.forEach(function (ex) { left.appendChild(example(ex, scale)); if (dl) left.appendChild(contribLine(dl, ex.row)); });
    if (f.quantile_examples && f.quantile_examples.length) {
      left.appendChild(el("h3", { text: "Examples across the activation distribution" }));
      f.quantile_examples.slice().reverse().forEach(function (g) {
        left.appendChild(el("div", { cls: "qgroup-title", text: "quantile " + Math.round(g.lo * 100) + "\u2013" + Math.round(g.hi * 100) +
          "% (activation " + fmt(g.value_lo) + "\u2013" + fmt(g.value_hi) + ")" }));
        g.examples.forEach(function (ex) { left.appendChild(example(ex, scale)); if (dl) left.appendChild(contribLine(dl, ex.row)); });
      });
    }
    var right = el("div", {}, [
      el("h3", { text: "Activation histogram (log10)" }), activationChart(f),
      el("h3", { text: "Feature density (this feature marked)" }), densityChart(f.frequency, 320),
      el("h3", { text: "Top tokens" }), tokenChips(f, 20)]);
    if (AUD[f.id]) right.appendChild(auditBox(AUD[f.id]));
    if (dl) right.insertBefore(diffBox(dl), right.firstChild);
    v.appendChild(el("div", { cls: "panels" }, [left, right]));
  }

  /* ---------- audit ---------- */
  var SCORE_NAMES = {
    causal: "causal: steering z-score vs random directions",
    ablation_r: "ablation: actual vs predicted effect (r)",
    explanatory: "explanatory: token explanation vs held-out activation (r)",
    f1: "explanatory: F1 of the token set" };
  function link(id) { return el("a", { href: "#feature-" + id, text: String(id) }); }
  function auditBox(a) {
    var rows = [["causal (steering z)", a.causal], ["win-rate vs random directions", a.steer_winrate],
      ["steering gain toward concept", a.steer_gain], ["ablation r (actual vs predicted)", a.ablation_r],
      ["ablation effect \u2016\u0394e\u2016", a.ablation_effect], ["explanatory r", a.explanatory],
      ["precision", a.precision], ["recall", a.recall], ["F1", a.f1]];
    var body = el("tbody");
    rows.forEach(function (r) { body.appendChild(el("tr", {}, [el("td", { text: r[0] }), el("td", { cls: "num", text: r[1] == null ? "n/a" : fmt(r[1]) })])); });
    var chips = el("div");
    (a.explanation || []).forEach(function (tr) { chips.appendChild(el("span", { cls: "tok-chip" }, [tr[0], el("small", { text: pct(tr[1]) })])); });
    return el("div", { id: "feature-audit" }, [el("h3", { text: "Audit" }), el("table", { cls: "audit-scores" }, [body]),
      el("h3", { text: "Explanation (firing rate per token)" }), chips]);
  }
  function renderAudit() {
    if (!AUDIT) return;
    var sec = document.getElementById("audit"), S = AUDIT.summary, st = AUDIT.settings;
    sec.hidden = false;
    document.querySelectorAll(".audit-col").forEach(function (th) { th.hidden = false; });
    sec.appendChild(el("h2", { text: "Audit" }));
    sec.appendChild(el("p", { cls: "muted", text: AUDIT.features.length + " features scored against " + AUDIT.random_features.length +
      " features of a random-direction SAE (the control); layer " + st.layer + ", " + st.n_windows + " held-out windows of " + st.window +
      " tokens. AUC = P(trained score > random score)." }));
    var tb = el("tbody");
    ["causal", "steer_winrate", "ablation_r", "explanatory", "f1", "precision", "recall"].forEach(function (k) {
      var r = S[k];
      if (r) tb.appendChild(el("tr", {}, [el("td", { text: k }), el("td", { cls: "num", text: fmt(r.median) }),
        el("td", { cls: "num", text: fmt(r.median_random) }), el("td", { cls: "num", text: fmt(r.auc) })]));
    });
    sec.appendChild(el("table", { cls: "audit-summary" }, [el("thead", {}, [el("tr", {}, ["score", "median (trained)", "median (random)", "AUC"].map(
      function (t) { return el("th", { cls: "nosort", text: t }); }))]), tb]));
    var grid = el("div", { cls: "audit-grid" });
    Object.keys(AUDIT.histograms).forEach(function (k) {
      var hg = AUDIT.histograms[k];
      grid.appendChild(el("figure", {}, [el("figcaption", { text: SCORE_NAMES[k] || k }), pairChart(hg.real.counts, hg.random.counts, hg.real.lo, hg.real.hi),
        el("div", { cls: "legend muted" }, [el("span", { cls: "key real" }), "trained", el("span", { cls: "key random" }), "random"])]));
    });
    sec.appendChild(grid);
    var lists = el("div", { cls: "audit-grid" });
    Object.keys(AUDIT.ranked).forEach(function (k) {
      ["best", "worst"].forEach(function (which) {
        var body = el("tbody");
        AUDIT.ranked[k][which].forEach(function (r) {
          body.appendChild(el("tr", {}, [el("td", { cls: "num" }, [link(r.id)]), el("td", { cls: "num", text: fmt(r[k]) }), el("td", { text: r.label || "" })]));
        });
        lists.appendChild(el("div", { cls: "ranked" }, [el("h3", { text: which + " by " + k }), el("table", {}, [body])]));
      });
    });
    sec.appendChild(lists);
    renderCoverage(sec, AUDIT.coverage);
  }
  function renderCoverage(sec, C) {
    var d = C.downstream, hg = C.per_token.histogram;
    sec.appendChild(el("h3", { text: "Coverage (" + C.n_tokens + " held-out tokens)" }));
    sec.appendChild(el("div", { cls: "stats" }, [stat(fmt(C.fvu), "FVU (pooled unexplained variance)"),
      stat(fmt(C.per_token.p50), "median per-token unexplained variance"),
      stat(fmt(C.per_document.p50), "median per-document unexplained variance"),
      stat(pct(C.no_active_fraction), "tokens with no active feature"),
      d ? stat(fmt(d.per_sequence.mean), "downstream 1 \u2212 cos(spliced, clean), mean of " + d.fidelity.n_sequences + " sequences") : null,
      d && d.fidelity.fidelity_recovered != null ? stat(pct(d.fidelity.fidelity_recovered), "fidelity recovered (vs mean ablation)") : null]));
    sec.appendChild(el("figure", {}, [el("figcaption", { text: "Per-token unexplained variance \u2016x \u2212 x\u0302\u2016\u00b2 / \u2016x \u2212 \u03bc\u2016\u00b2" }),
      barChart(hg.counts, hg.lo, hg.hi, { width: 420 })]));
    sec.appendChild(el("h3", { text: "Dark matter: held-out tokens with the largest unexplained error" }));
    var dm = el("div", { id: "dark-matter" });
    C.dark_matter.forEach(function (ex) { dm.appendChild(example(ex, Math.max.apply(null, ex.activations))); });
    sec.appendChild(dm);
    if (d && d.worst_sequences.length) {
      sec.appendChild(el("h3", { text: "Sequences the spliced SAE changes most downstream (1 \u2212 cos)" }));
      d.worst_sequences.forEach(function (w) {
        sec.appendChild(el("div", { cls: "example" }, [el("span", { cls: "val", text: fmt(w.loss) + "  doc " + w.doc }), w.text || ""]));
      });
    }
  }

  /* ---------- evals ---------- */
  /* window.SAE_EVALS (evals.js): the `sae-jax evals` report of the run (or its sweep), or null. */
  function ci(e) {
    if (!e || e.mean == null) return "n/a";
    return fmt(e.mean) + (e.half_width == null ? "" : " \u00b1 " + fmt(e.half_width));
  }
  function renderEvals() {
    var E = window.SAE_EVALS || null;
    if (!E) return;
    var sec = document.getElementById("evals"), names = Object.keys(E.metrics), bases = [];
    names.forEach(function (k) { Object.keys(E.metrics[k].baselines || {}).forEach(function (b) { if (bases.indexOf(b) < 0) bases.push(b); }); });
    sec.hidden = false;
    sec.appendChild(el("h2", { text: "Evals" }));
    sec.appendChild(el("p", { cls: "muted", text: E.n_runs + " runs (" + E.runs.map(function (r) { return r.name; }).join(", ") + "), suites " +
      E.suites.join(", ") + "; mean \u00b1 " + Math.round(E.ci_level * 100) + "% CI half-width across runs (Student t). Margin > 0: the trained SAE is better." }));
    var head = ["metric", "suite", "trained"];
    bases.forEach(function (b) { head.push(b, "margin vs " + b); });
    var tb = el("tbody");
    names.forEach(function (k) {
      var e = E.metrics[k], arrow = e.higher_is_better == null ? "" : (e.higher_is_better ? " \u2191" : " \u2193");
      var cells = [el("td", { text: k + arrow }), el("td", { text: e.suite || "" }), el("td", { cls: "num", text: ci(e) })];
      bases.forEach(function (b) {
        var m = (e.margins || {})[b];
        cells.push(el("td", { cls: "num", text: ci((e.baselines || {})[b]) }));
        cells.push(el("td", { cls: "num" + (m && m.mean > 0 ? " better" : (m && m.mean < 0 ? " worse" : "")), text: m ? ci(m) : "" }));
      });
      tb.appendChild(el("tr", { "data-metric": k }, cells));
    });
    tb.appendChild(el("tr", { "data-metric": "pw_mcc" }, [el("td", { text: "pw_mcc \u2191" }), el("td", { text: "runs" }), el("td", { cls: "num", text: ci(E.pw_mcc) })]));
    sec.appendChild(el("table", { cls: "evals-table" }, [el("thead", {}, [el("tr", {}, head.map(function (t) { return el("th", { cls: "nosort", text: t }); }))]), tb]));
  }

  /* ---------- crosscoder diff ---------- */
  /* window.SAE_DIFF (diff.js): `sae-jax diff RUN DATA`'s classes and per-example splits, or null. */
  var DIFF = window.SAE_DIFF || null;
  function sideName(cls) { return cls === "A-only" ? DIFF.source_a + "-only" : DIFF.source_b + "-only"; }
  function contribLine(dl, row) {
    var e = dl.examples.filter(function (x) { return x.row === row; })[0];
    if (!e) return el("div", { cls: "contrib", text: "no split recorded for row " + row });
    return el("div", { cls: "contrib", "data-row": String(row) }, [
      "pre-activation ", el("b", { text: fmt(e.pre_a + e.pre_b + e.bias) }), " = " + DIFF.source_a + " ", el("b", { text: fmt(e.pre_a) }),
      " + " + DIFF.source_b + " ", el("b", { text: fmt(e.pre_b) }), " + bias " + fmt(e.bias) + " \u00b7 writes ",
      el("b", { text: fmt(e.write_a) }), " into " + DIFF.source_a + ", ", el("b", { text: fmt(e.write_b) }), " into " + DIFF.source_b]);
  }
  function diffBox(dl) {
    var rows = [["class", sideName(dl["class"])], ["relative norm r = \u2016d_" + DIFF.source_b + "\u2016 / (\u2016d_" + DIFF.source_a + "\u2016 + \u2016d_" + DIFF.source_b + "\u2016)", fmt(dl.r)],
      ["decoder norm into " + DIFF.source_a, fmt(dl.norm_a)], ["decoder norm into " + DIFF.source_b, fmt(dl.norm_b)],
      ["cosine of its two decoders", dl.cosine == null ? "n/a" : fmt(dl.cosine)]];
    var body = el("tbody");
    rows.forEach(function (r) { body.appendChild(el("tr", {}, [el("td", { text: r[0] }), el("td", { cls: "num", text: r[1] })])); });
    return el("div", { id: "feature-diff" }, [el("h3", { text: "Model diff" }), el("table", { cls: "diff-latent" }, [body])]);
  }
  function renderDiff() {
    if (!DIFF) return;
    var sec = document.getElementById("diff"), c = DIFF.counts, th = DIFF.thresholds;
    sec.hidden = false;
    sec.appendChild(el("h2", { text: "Model diff: " + DIFF.source_a + " vs " + DIFF.source_b }));
    sec.appendChild(el("p", { cls: "muted", text: "Crosscoder latents classed by relative decoder norm r (" + DIFF.source_a + "-only r < " + th.exclusive +
      ", " + DIFF.source_b + "-only r > " + fmt(1 - th.exclusive) + ", shared " + th.shared[0] + "\u2013" + fmt(th.shared[1]) +
      "). The tables list the exclusive latents shown here (the most exclusive first); each page shows its examples with each model's share." }));
    sec.appendChild(el("div", { cls: "stats" }, [stat(String(c["A-only"]), DIFF.source_a + "-only"), stat(String(c.shared), "shared"),
      stat(String(c["B-only"]), DIFF.source_b + "-only"), stat(String(c.mixed), "mixed"), stat(String(c.empty), "empty"),
      stat(DIFF.median_shared_cosine == null ? "n/a" : fmt(DIFF.median_shared_cosine), "median decoder cosine, shared")]));
    sec.appendChild(el("img", { src: "diff.png", alt: "histogram of relative decoder norms" }));
    var grid = el("div", { cls: "diff-grid" });
    ["A-only", "B-only"].forEach(function (cls) {
      var body = el("tbody"), ids = DIFF.shown[cls];
      ids.forEach(function (id) {
        var f = FEATURES[BY_ID[id]], dl = DIFF.latents[String(id)];
        body.appendChild(el("tr", { "data-diff": cls }, [el("td", { cls: "num" }, [link(id)]), el("td", { cls: "num", text: fmt(dl.r) }),
          el("td", { cls: "num", text: f ? pct(f.frequency) : "" }), el("td", {}, [f ? tokenChips(f, 5) : null])]));
      });
      var head = el("thead", {}, [el("tr", {}, ["id", "r", "frequency", "top tokens"].map(function (t) { return el("th", { cls: "nosort", text: t }); }))]);
      grid.appendChild(el("div", { cls: "ranked" }, [el("h3", { text: sideName(cls) + ": " + ids.length + " of " + c[cls] + " shown" }),
        ids.length ? el("table", {}, [head, body]) : el("p", { cls: "muted", text: "none" })]));
    });
    sec.appendChild(grid);
  }

  /* ---------- routing ---------- */
  function route() {
    var m = /^#feature-(\d+)$/.exec(location.hash);
    document.getElementById("index-view").hidden = !!m;
    document.getElementById("feature-view").hidden = !m;
    if (m) { renderFeature(Number(m[1])); window.scrollTo(0, 0); }
    document.title = (m ? "Feature " + m[1] + " \u2013 " : "") + "SAE features";
  }

  document.getElementById("meta").textContent = [H.model, H.layer != null ? "layer " + H.layer : null,
    H.arch ? H.arch + " \u00d7" + H.width : null, H.n_rows + " tokens", FEATURES.length + " features shown",
    H.run ? "run " + H.run : null].filter(Boolean).join(" \u00b7 ");
  document.getElementById("density").appendChild(densityChart(null));
  renderDiff();
  renderAudit();
  renderEvals();
  document.getElementById("search").addEventListener("input", function (e) { state.query = e.target.value; state.limit = PAGE; renderTable(); });
  document.querySelectorAll("#feature-table th").forEach(function (th) {
    if (th.classList.contains("nosort")) return;
    th.addEventListener("click", function () {
      var k = th.dataset.key;
      state.dir = state.key === k ? -state.dir : (k === "id" || k === "label" ? 1 : -1);
      state.key = k; renderTable();
    });
  });
  window.addEventListener("hashchange", route);
  renderTable();
  route();
  document.body.setAttribute("data-ready", "1");
})();
