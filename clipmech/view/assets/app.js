// clipmech view: renders a study's pages from per-page data scripts (data/*.js), offline from file://.
// Each data script calls CLIPMECH.data(path, value); `load` adds the <script> tag for a page's data
// on demand (fetch and ES modules are blocked on file://). The URL fragment is the page's state:
// #model=ID&class=C&domain=D&vs=D2&node=POINT/INDEX, so any view can be linked from a paper.
"use strict";
(function () {
  const store = {};
  const pending = {};
  window.CLIPMECH = { data(path, value) { store[path] = value; } };

  function load(path) {
    if (path in store) return Promise.resolve(store[path]);
    if (!pending[path]) {
      pending[path] = new Promise((resolve, reject) => {
        const s = document.createElement("script");
        s.src = path;
        s.onload = () => (path in store ? resolve(store[path]) : reject(new Error(path + " holds no page data")));
        s.onerror = () => reject(new Error("cannot read " + path + "; rerun `clipmech view`"));
        document.head.appendChild(s);
      });
    }
    return pending[path];
  }

  // ---------------------------------------------------------------------------- DOM helpers
  const SVG = "http://www.w3.org/2000/svg";
  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    return fill(el, attrs, children);
  }
  function s(tag, attrs, ...children) {
    const el = document.createElementNS(SVG, tag);
    return fill(el, attrs, children);
  }
  function fill(el, attrs, children) {
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
      else el.setAttribute(k, v === true ? "" : String(v));
    }
    for (const c of children.flat()) {
      if (c === null || c === undefined || c === false) continue;
      el.appendChild(c instanceof Node ? c : document.createTextNode(String(c)));
    }
    return el;
  }
  const NM = "not measured";
  function num(v, digits = 3, scale = 1) { return v === null || v === undefined ? NM : (v * scale).toFixed(digits); }
  function pct(v) { return num(v, 1, 100); }
  function verdictClass(v) {
    v = String(v || "");
    if (v.startsWith("reproduced")) return "v-yes";
    if (v.startsWith("partly")) return "v-part";
    if (v.startsWith("contradicted")) return "v-no";
    return "v-open";
  }
  function verdict(v) { return h("span", { class: "verdict " + verdictClass(v) }, v || NM); }
  function shortPoint(p) { return p.replace(/^visual\./, "").replace(/hook_/g, "").replace(/\.0\.out$/, ".out"); }

  // ---------------------------------------------------------------------------- state in the fragment
  const KEYS = ["model", "class", "domain", "vs", "node"];
  function state() {
    const p = new URLSearchParams(location.hash.slice(1));
    const st = {};
    for (const k of KEYS) if (p.get(k)) st[k] = p.get(k);
    return st;
  }
  function href(st) {
    const p = new URLSearchParams();
    for (const k of KEYS) if (st[k]) p.set(k, st[k]);
    return "#" + p.toString();
  }
  function go(st) { location.hash = href(st); }

  // ---------------------------------------------------------------------------- study page
  function table(columns, rows) {
    return h("table", {}, h("thead", {}, h("tr", {}, columns.map((c) => h("th", {}, c)))),
      h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
  }

  function findingsSection(study) {
    if (study.kind === "analysis") return h("section", { id: "findings" }, h("h2", {}, "Findings"), h("p", {}, "One run's analysis folder: findings, verdicts and accuracies come from a study (`clipmech quickstart` or `clipmech experiment analyse`). Open the run below for its CKA, circuits and node explanations."));
    if (!study.findings.length) return h("section", { id: "findings" }, h("h2", {}, "Findings"), h("p", {}, "No findings in results.json (" + NM + ")."));
    return h("section", { id: "findings" }, h("h2", {}, "Findings"),
      study.findings.map((f) => h("div", { class: "finding", "data-finding": f.finding },
        h("h3", {}, f.finding + ": ", verdict(f.verdict)),
        f.rule ? h("p", { class: "rule" }, "Rule: " + f.rule) : null,
        table(["evidence", "estimate", "95% CI", "p* ± MC error", "models", "verdict"],
          f.evidence.map((e) => [(e.beside ? "reported beside: " : "") + e.label, e.estimate, e.ci || "—",
            e.p, e.n_models ?? NM, e.reason ? [verdict(e.verdict), " (" + e.reason + ")"] : verdict(e.verdict)])))));
  }

  function measureCell(m) {
    if (!m || m.score === null) return h("span", { class: "muted" }, NM);
    const lo = Math.min(0, m.floor ?? 0, m.score), hi = Math.max(1, m.ceiling ?? 0, m.score);
    const x = (v) => 4 + 72 * (v - lo) / (hi - lo || 1);
    const band = m.floor !== null && m.ceiling !== null
      ? s("rect", { x: x(Math.min(m.floor, m.ceiling)), y: 4, width: Math.max(1, Math.abs(x(m.ceiling) - x(m.floor))), height: 6, class: "band" }) : null;
    const title = `score ${num(m.score)}` + (m.ci[0] !== null ? ` [${num(m.ci[0])}, ${num(m.ci[1])}] over classes` : "") +
      `; floor ${num(m.floor)}; ceiling ${num(m.ceiling)}; normalised ${num(m.norm)}` +
      (m.untrained !== null ? `; untrained ${num(m.untrained)}` : "") + (m.norm_reason ? ` (${m.norm_reason})` : "");
    return h("span", { class: "measure", title },
      s("svg", { width: 80, height: 14, class: "spark" }, band, s("circle", { cx: x(m.score), cy: 7, r: 3, class: "dot" })),
      h("span", {}, num(m.score, 2)),
      h("small", {}, (m.floor !== null && m.ceiling !== null ? `${num(m.floor, 2)}–${num(m.ceiling, 2)}` : "no floor/ceiling") +
        (m.norm !== null ? ` n=${num(m.norm, 2)}` : "")));
  }

  function modelsSection(study) {
    const cols = [["model_id", "model"], ["setup", "setup"], ["seed", "seed"], ["test_domain", "test domain"],
      ["c1", "C1 %"], ["c2", "C2 %"]].concat(study.measures.map((m) => ["m:" + m, m]), [["causal_verdict", "causal"]]);
    const value = (r, key) => key.startsWith("m:") ? r.measures[key.slice(2)]?.score ?? null : r[key];
    let sortKey = null, dir = 1;
    const tbody = h("tbody");
    function draw() {
      const rows = study.models.slice();
      if (sortKey) rows.sort((a, b) => {
        const va = value(a, sortKey), vb = value(b, sortKey);
        if (va === vb) return 0;
        if (va === null) return 1;
        if (vb === null) return -1;
        return (va < vb ? -1 : 1) * dir;
      });
      tbody.replaceChildren(...rows.map((r) => h("tr", {},
        h("td", {}, h("a", { href: href({ model: r.model_id }), class: "model-link", "data-model": r.model_id }, r.model_id)),
        h("td", {}, r.setup ?? NM), h("td", {}, r.seed ?? NM), h("td", {}, r.test_domain ?? NM),
        h("td", { class: "num" }, pct(r.c1)), h("td", { class: "num" }, pct(r.c2)),
        study.measures.map((m) => h("td", {}, measureCell(r.measures[m]))), h("td", {}, verdict(r.causal_verdict)))));
    }
    const head = h("tr", {}, cols.map(([key, label]) => h("th", {
      class: "sortable", "data-key": key, title: "sort",
      onclick: (ev) => {
        dir = sortKey === key ? -dir : 1;
        sortKey = key;
        for (const th of ev.currentTarget.parentNode.children) th.removeAttribute("aria-sort");
        ev.currentTarget.setAttribute("aria-sort", dir > 0 ? "ascending" : "descending");
        draw();
      },
    }, label)));
    draw();
    return h("section", { id: "models" }, h("h2", {}, "Models"),
      h("p", { class: "note" }, "One row per trained model and test domain. Each sharedness score: the dot is the score, the band spans its floor (class-permuted) to its ceiling (disjoint drawings: the reliability bound); n = normalised score. Hover for the score's CI over classes and the untrained model's score. Click a column to sort, a model to open its circuits."),
      study.unnamed_rows ? h("p", { class: "error" }, `${study.unnamed_rows} row(s) of results.json name no model (model_id or run_id) and are not shown.`) : null,
      h("div", { class: "scroll" }, h("table", { class: "models" }, h("thead", {}, head), tbody)));
  }

  function figuresSection(figs, id) {
    if (!figs.length) return null;
    return h("section", { id }, h("h2", {}, "Figures"), h("div", { class: "figures" },
      figs.map((f) => h("figure", {}, h("a", { href: f.src, target: "_blank" }, h("img", { src: f.src, alt: f.name, loading: "lazy" })),
        h("figcaption", {}, f.caption || f.name)))));
  }

  function studyPage(study) {
    const cfg = Object.entries(study.config).map(([k, v]) => `${k} = ${v}`).join(", ");
    return [h("h1", {}, study.title + " — " + study.folder),
      h("p", { class: "note" }, (study.schema_version ? `results schema ${study.schema_version}. ` : "") + cfg),
      findingsSection(study),
      h("section", { id: "accuracy" }, h("h2", {}, "Accuracy per setup"),
        study.accuracy ? table(study.accuracy.columns, study.accuracy.rows) : h("p", {}, NM)),
      modelsSection(study), figuresSection(study.figures, "figures")];
  }

  // ---------------------------------------------------------------------------- model page
  const PALETTE = ["#d1495b", "#00798c", "#edae49", "#30638e", "#66a182", "#8d6a9f", "#e07a5f", "#3d405b"];

  function ckaChart(cka, testDomains) {
    if (!cka) return h("p", {}, "CKA per layer: " + NM + " (no CKA entry for this model in the study folder).");
    const W = 680, H = 260, L = 40, R = 50, B = 70, n = cka.points.length;
    const vals = cka.pairs.flatMap((p) => p.cka).filter((v) => v !== null);
    const lo = Math.min(0, ...vals), hi = Math.max(1, ...vals);
    const x = (i) => L + (n > 1 ? i * (W - L - R) / (n - 1) : 0), y = (v) => 10 + (H - B - 10) * (hi - v) / (hi - lo);
    const readout = h("div", { class: "readout" }, "hover a point for its value");
    const svg = s("svg", { width: W, height: H, class: "cka" });
    for (const t of [...new Set([lo, 0, 0.5, 1, hi])]) {
      svg.append(s("line", { x1: L, x2: W - R, y1: y(t), y2: y(t), class: "grid" }), s("text", { x: L - 4, y: y(t) + 4, class: "tick", "text-anchor": "end" }, t.toFixed(t === 0.5 ? 1 : 2)));
    }
    cka.points.forEach((p, i) => svg.append(s("text", { x: x(i), y: H - B + 12, class: "tick", transform: `rotate(35 ${x(i)} ${H - B + 12})` }, shortPoint(p))));
    const legend = h("div", { class: "legend" });
    let colour = 0;
    const isHot = (p) => !testDomains.length || testDomains.includes(p.a) || testDomains.includes(p.b);  // no test domain: all
    const ordered = cka.pairs.slice().sort((a, b) => isHot(a) - isHot(b));
    for (const pair of ordered) {
      const hot = isHot(pair);
      const c = hot ? PALETTE[colour++ % PALETTE.length] : "#bbb";
      const pts = pair.cka.map((v, i) => (v === null ? null : [x(i), y(v)])).filter(Boolean);
      svg.append(s("polyline", { points: pts.map((q) => q.join(",")).join(" "), fill: "none", stroke: c, "stroke-width": hot ? 2 : 1 }));
      pair.cka.forEach((v, i) => {
        if (v === null) return;
        const text = `${pair.a} – ${pair.b} at ${cka.points[i]}: ${v.toFixed(3)}` + (pair.ci_low[i] != null && pair.ci_high[i] != null ? ` [${pair.ci_low[i].toFixed(3)}, ${pair.ci_high[i].toFixed(3)}]` : "");
        svg.append(s("circle", { cx: x(i), cy: y(v), r: hot ? 3.5 : 2.5, fill: c, class: "pt", onmouseenter: () => { readout.textContent = text; } }, s("title", {}, text)));
      });
      if (hot) legend.append(h("span", {}, h("i", { style: `background:${c}` }), `${pair.a} – ${pair.b}`));
    }
    if (ordered.some((p) => !isHot(p))) legend.append(h("span", {}, h("i", { style: "background:#bbb" }), "other pairs"));
    return h("div", {}, h("p", { class: "note" }, `Linear CKA of class centroids (${cka.subset} classes) per analysis point for every domain pair; pairs with the test domain coloured.`), svg, readout, legend);
  }

  function circuitSvg(circ, domain, compare, st) {
    // compare: node names to highlight as shared (the side-by-side domain's circuit, or any other domain's)
    // sized so that two graphs of a 10-point ResNet fit side by side and the tallest column stays ~400 px
    const maxN = Math.max(1, ...circ.points.map((p) => circ.nodes[p].length));
    const colW = circ.points.length > 6 ? 56 : 96, rowH = Math.max(5, Math.min(10, 400 / maxN)), top = 52;
    const W = 30 + colW * circ.points.length, H = top + rowH * maxN + 10;
    const pos = {};
    circ.points.forEach((p, c) => circ.nodes[p].forEach((i, r) => { pos[p + "/" + i] = [24 + c * colW, top + r * rowH, r + 1]; }));
    const svg = s("svg", { width: W, height: H, class: "circuit", "data-domain": domain });
    circ.points.forEach((p, c) => svg.append(s("text", { x: 20 + c * colW, y: 12, class: "tick", "text-anchor": "start", transform: `rotate(25 ${20 + c * colW} 12)` }, shortPoint(p))));
    const maxW = Math.max(1e-12, ...circ.edges.map((e) => Math.abs(e[4] || 0)));
    const edges = s("g", { class: "edges" });
    for (const [u, i, d, j, w] of circ.edges) {
      const a = pos[u + "/" + i], b = pos[d + "/" + j];
      if (!a || !b || w === null) continue;
      const t = Math.abs(w) / maxW;
      edges.append(s("line", { x1: a[0], y1: a[1], x2: b[0], y2: b[1], stroke: w >= 0 ? "#c0392b" : "#2e6fba", "stroke-opacity": 0.15 + 0.75 * t, "stroke-width": 0.5 + 2 * t },
        s("title", {}, `${u}/${i} → ${d}/${j}: ${w.toFixed(4)}`)));
    }
    svg.append(edges);
    for (const [name, [cx, cy, rank]] of Object.entries(pos)) {
      const cls = "node" + (compare.has(name) ? " shared" : "") + (st.node === name ? " selected" : "");
      svg.append(s("circle", { cx, cy, r: Math.min(4, rowH / 2 + 0.5), class: cls, "data-node": name, onclick: () => go({ ...st, node: name }) },
        s("title", {}, `${name} (rank ${rank} in its point)` + (compare.has(name) ? ", shared" : ""))));
    }
    return svg;
  }

  function nodeSet(circ) {
    const out = new Set();
    if (circ) for (const p of circ.points) for (const i of circ.nodes[p]) out.add(p + "/" + i);
    return out;
  }

  function circuitSection(model, st, byClass, panel) {
    const c = model.circuits;
    if (!c.classes.length) return h("section", { id: "circuit" }, h("h2", {}, "Circuit"), h("p", {}, "Circuits: " + NM + " (no circuit files of this model in the study folder; the quickstart stores them under registry/circuit_files)."));
    const cls = c.classes.includes(st.class) ? st.class : c.classes[0];
    const domains = Object.keys(byClass.domains);
    const testDomain = model.rows.map((r) => r.test_domain).find((d) => domains.includes(d));
    const domain = domains.includes(st.domain) ? st.domain : testDomain || domains[0];
    const vs = st.vs === "none" ? null : (domains.includes(st.vs) && st.vs !== domain ? st.vs : domains.find((d) => d !== domain) || null);
    const select = (label, key, options, current) => h("label", {}, label + " ",
      h("select", { "data-key": key, onchange: (ev) => go({ ...st, class: cls, domain, vs: vs || "none", [key]: ev.target.value, node: st.node }) },
        options.map(([v, text]) => h("option", { value: v, selected: v === current }, text))));
    const others = (d) => {
      if (vs) return nodeSet(byClass.domains[d === domain ? vs : domain]);
      const u = new Set();
      for (const o of domains) if (o !== d) nodeSet(byClass.domains[o]).forEach((n) => u.add(n));
      return u;
    };
    const stAll = { ...st, model: model.model_id, class: cls, domain, vs: vs || "none" };
    const graph = (d) => {
      const circ = byClass.domains[d];
      const n = Object.values(circ.nodes).reduce((a, v) => a + v.length, 0);
      return h("div", { class: "graph" }, h("h3", {}, `${cls} in ${d}`, h("small", {}, ` ${n} nodes, ${circ.edges.length} edges` + (circ.n_images ? `, ${circ.n_images} image${circ.n_images === 1 ? "" : "s"}` : ""))),
        circuitSvg(circ, d, others(d), stAll));
    };
    return h("section", { id: "circuit" }, h("h2", {}, "Circuit"),
      h("div", { class: "controls" }, select("class", "class", c.classes.map((x) => [x, x]), cls),
        select("domain", "domain", domains.map((x) => [x, x]), domain),
        select("beside it", "vs", [["none", "none"]].concat(domains.filter((x) => x !== domain).map((x) => [x, x])), vs || "none")),
      h("p", { class: "note" }, "Columns are analysis points (input left), nodes ordered by score within each point (best on top); edges red for positive, blue for negative scores, darker = larger |score|. " +
        (vs ? "Orange nodes are shared with the other graph's domain." : "Orange nodes are shared with at least one other domain.") + " Click a node for its panel."),
      h("div", { class: "graphs" }, graph(domain), vs ? graph(vs) : null), panel);
  }

  function edgeList(circ, node, dir) {
    const rows = circ.edges.filter((e) => (dir === "in" ? e[2] + "/" + e[3] : e[0] + "/" + e[1]) === node)
      .sort((a, b) => Math.abs(b[4]) - Math.abs(a[4])).slice(0, 10);
    if (!rows.length) return h("p", { class: "muted" }, dir === "in" ? "no incoming edges" : "no outgoing edges");
    return h("ul", { class: "edges" }, rows.map((e) => {
      const other = dir === "in" ? e[0] + "/" + e[1] : e[2] + "/" + e[3];
      return h("li", {}, h("a", { href: href({ ...state(), node: other }) }, other), ` ${e[4].toPrecision(3)}`);
    }));
  }

  function explanationBlock(rec) {
    const summary = rec.explained !== null
      ? `Labels explain ${pct(rec.explained)} % of the node's effect energy (chance ${pct(rec.chance)} %, ceiling ${pct(rec.ceiling)} %)`
      : "Labels: " + (rec.skipped ? `none (${rec.skipped})` : NM);
    const labels = rec.labels.length ? table(["label", "explained %", "logit effect"],
      rec.labels.map((l) => [l.word, pct(l.fraction), num(l.logit_effect)])) : null;
    const domains = Object.entries(rec.domains);
    const perDomain = domains.length ? table(["domain", "mean activation", "ablation effect (true-class logit)", "images"],
      domains.map(([d, v]) => [d, num(v.mean_activation), num(v.ablation_effect, 4), v.n_images ?? NM])) : h("p", {}, "per-domain means and ablation effects: " + NM);
    const ex = Object.entries(rec.examples).map(([d, xs]) => h("div", { class: "examples" }, h("h5", {}, d),
      xs.map((x) => h("figure", {}, x.image ? h("img", { src: x.image, alt: `${d} ${x.class || ""}` }) : h("span", { class: "muted" }, "image missing"),
        h("figcaption", {}, (x.class ? x.class + " " : "") + num(x.activation, 2))))));
    return h("div", { class: "explanation" }, h("h4", {}, "Explanation" + (rec.method ? ` (${rec.method} effect)` : "")),
      h("p", {}, summary + (rec.norm !== null ? `; mean |effect| ${num(rec.norm)}` : "") + "."),
      rec.ig_score !== null ? h("p", {}, `IG node score (mean over the test domain's circuits): ${num(rec.ig_score, 4)}`) : null,
      labels, perDomain,
      ex.length ? h("h4", {}, "Top examples (activation map on the input)") : null, ex);
  }

  function nodePanel(model, st, byClass, explanations) {
    const node = st.node;
    const [point, index] = [node.slice(0, node.lastIndexOf("/")), node.slice(node.lastIndexOf("/") + 1)];
    const domains = Object.keys(byClass.domains);
    const rows = domains.map((d) => {
      const circ = byClass.domains[d];
      const r = (circ.nodes[point] || []).indexOf(Number(index));
      return [d, r >= 0 ? "yes" : "no", r >= 0 ? `${r + 1} of ${circ.nodes[point].length}` : "—",
        circ.edges.filter((e) => e[2] + "/" + e[3] === node).length, circ.edges.filter((e) => e[0] + "/" + e[1] === node).length];
    });
    const here = byClass.domains[st.domain] || byClass.domains[domains[0]];
    const rec = explanations && explanations.nodes[node];
    return h("aside", { id: "node-panel", "data-node": node },
      h("a", { class: "close", href: href({ ...st, node: null }), title: "close" }, "×"),
      h("h3", {}, node), h("p", {}, `point ${point}, channel ${index}; class ${byClass.class}`),
      h("h4", {}, "In the circuits of this class"), table(["domain", "in circuit", "rank in point", "edges in", "edges out"], rows),
      h("h4", {}, `Strongest edges in ${st.domain}`), h("div", { class: "two" }, h("div", {}, h("h5", {}, "from"), edgeList(here, node, "in")), h("div", {}, h("h5", {}, "to"), edgeList(here, node, "out"))),
      rec ? explanationBlock(rec) : h("p", { class: "note" }, "No explanation recorded for this node, so only its circuit scores are shown. " +
        "Its explanation (labels with explained fractions, mean activation and ablation effect per domain, top examples with activation maps) appears here once the folder holds an explanations.json for this model: run `clipmech analyze explain RUN_DIR` (docs/explain.md), then `clipmech view` again."));
  }

  function rowsSection(model) {
    const cols = ["test domain", "setup", "seed", "C1 %", "C2 %", "causal logit effect", "causal accuracy effect", "p*", "causal verdict", "faithfulness AUC"];
    return h("section", { id: "rows" }, h("h2", {}, "Results"),
      table(cols, model.rows.map((r) => [r.test_domain ?? NM, r.setup ?? NM, r.seed ?? NM, pct(r.c1), pct(r.c2),
        `${r.causal.logit} ${r.causal.logit_ci}`, `${r.causal.accuracy} ${r.causal.accuracy_ci}`, r.causal.p, verdict(r.causal.verdict), num(r.faithfulness_auc)])),
      h("h3", {}, "Sharedness"), table(["test domain"].concat(Object.keys(model.rows[0]?.measures || {})),
        model.rows.map((r) => [r.test_domain ?? NM].concat(Object.values(r.measures).map(measureCell)))));
  }

  function faithfulnessTable(r) {
    const f = r.faithfulness;
    if (!f) return h("p", {}, `Faithfulness on ${r.test_domain}: ${NM}.`);
    const ablations = [...new Set(Object.values(f.domains).flatMap((per) => Object.keys(per)))];
    const cell = (e) => (e ? `${num(e.auc)} ` + (e.auc_ci[0] !== null ? `[${num(e.auc_ci[0])}, ${num(e.auc_ci[1])}]` : "") : NM);
    return h("div", {}, h("h4", {}, `Faithfulness of the training-drawing circuits (${r.test_domain} model row)`),
      h("p", { class: "note" }, `Area under f(x) over kept node fractions ${f.sizes.join(", ")} %, per domain and ablation, mean over classes with its CI.`),
      table(["domain"].concat(ablations.map((a) => a + " ablation AUC")), Object.entries(f.domains).map(([d, per]) => [d].concat(ablations.map((a) => cell(per[a]))))));
  }

  function causalSection(model) {
    const blocks = model.rows.map((r) => {
      const pc = Object.entries(r.causal.per_class);
      return h("div", {}, h("h3", {}, `Causal test on ${r.test_domain}: `, verdict(r.causal.verdict)),
        h("p", { class: "note" }, `Per C2 class, the true-class logit drop after ablating (${r.causal.ablation || "?"}) the circuit nodes shared with other domains minus the drop after ablating IG-matched controls; shared nodes without a matched control trimmed: ${r.causal.trimmed} %.`),
        pc.length ? table(["class", "logit effect", "accuracy effect", "shared nodes", "images"], pc.map(([c, v]) => [c, num(v.logit), pct(v.accuracy), v.n_shared ?? NM, v.n_images ?? NM])) : h("p", {}, NM),
        faithfulnessTable(r));
    });
    return h("section", { id: "causal" }, h("h2", {}, "Causal and faithfulness results"), blocks, figuresSection(model.figures, "model-figures"));
  }

  async function modelPage(study, st) {
    const summary = study.models.find((m) => m.model_id === st.model);
    if (!summary) return [h("p", {}, `No model ${st.model} in this study. `, h("a", { href: "#" }, "Back to the study"))];
    const model = await load(summary.page);
    const c = model.circuits;
    const cls = c.classes.includes(st.class) ? st.class : c.classes[0];
    const byClass = cls ? await load(c.files[cls]) : null;
    const explanations = model.explanations ? await load(model.explanations) : null;
    const testDomains = model.rows.map((r) => r.test_domain).filter(Boolean);
    const analysis = study.kind === "analysis";  // one run's analyses: no study rows to show
    let panel = null;
    if (byClass && st.node) {
      const domains = Object.keys(byClass.domains);
      const domain = domains.includes(st.domain) ? st.domain : testDomains.find((d) => domains.includes(d)) || domains[0];
      panel = nodePanel(model, { ...st, domain }, byClass, explanations);
    }
    return [h("h1", {}, model.model_id), analysis ? null : rowsSection(model),
      h("section", { id: "cka" }, h("h2", {}, "CKA per layer"), ckaChart(model.cka, testDomains)),
      byClass ? circuitSection(model, st, byClass, panel) : circuitSection(model, st, { domains: {} }, null),
      analysis ? figuresSection(model.figures, "model-figures") : causalSection(model)];
  }

  // ---------------------------------------------------------------------------- router
  let rendering = 0, shown = null;
  async function render() {
    const token = ++rendering;
    const app = document.getElementById("app");
    const study = store["data/study.js"];
    document.body.dataset.ready = "";
    if (!study) { app.replaceChildren(h("p", { class: "error" }, "data/study.js is missing; rerun `clipmech view`.")); return; }
    const st = state();
    let content;
    try {
      content = st.model ? await modelPage(study, st) : studyPage(study);
    } catch (err) {
      content = [h("p", { class: "error" }, String(err.message || err))];
    }
    if (token !== rendering) return;
    const y = window.scrollY, where = st.model || "";
    app.replaceChildren(...content.flat().filter(Boolean));
    document.getElementById("crumbs").replaceChildren(st.model ? h("span", {}, " / ", h("a", { href: "#" }, study.folder), " / " + st.model) : h("span", {}, " / " + study.folder));
    document.title = (st.model ? st.model + " — " : "") + "clipmech " + study.folder;
    document.body.dataset.page = st.model ? (st.node ? "node" : "model") : "study";
    window.scrollTo(0, where === shown ? y : 0);  // within a model page keep the place; a new page starts at the top
    shown = where;
    document.body.dataset.ready = "1";
  }
  window.addEventListener("hashchange", render);
  document.addEventListener("DOMContentLoaded", render);
})();
