// Cyclone dashboard: state arrives by Server-Sent Events on api/events (no polling).
// Chart history is read once per model from api/history; later points come with `status` events.
"use strict";

const PALETTE = ["#3b73c4", "#e07b00", "#2e9e5b", "#b02a8a", "#7a5cc4", "#d43f3a", "#1b9aaa", "#8a6200"];
const state = {
  statuses: new Map(),   // model -> ModelStatus JSON (GetStatus shape)
  versions: [],          // VersionLineage records
  rollouts: [],          // RolloutSummary records
  points: new Map(),     // model -> Map(series name -> Map(t seconds -> value))
  traffic: new Map(),    // model -> TrafficPoint records
  counts: {},            // model -> {predictions, labels}: what the store holds now
  jobs: [],              // TrainingJobSummary records, newest first
  loaded: new Set(),     // models whose history is being or was read
  histories: new Set(),  // models whose history is on the charts
  charts: new Map(),     // "model/kind" -> {plot, keys}
};
window.cyclone = { state, charts: state.charts, events: 0 };

const $ = (sel, root = document) => root.querySelector(sel);
const esc = s => String(s ?? "").replace(/[&<>"']/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;"}[c]));
const levelName = s => (s || "").replace("LEVEL_", "").replace("UNSPECIFIED", "") || "—";
const time = iso => iso ? new Date(iso).toLocaleTimeString() : "";
const secs = iso => new Date(iso).getTime() / 1000;  // uPlot time is in seconds; keep the ms
const slug = s => String(s).replace(/[^A-Za-z0-9_-]/g, "_");

function models() {
  const names = new Set([...state.statuses.keys(), ...state.versions.map(v => v.model)]);
  return [...names].sort();
}

// --- history ---------------------------------------------------------------------------------

function series(model) {
  if (!state.points.has(model)) state.points.set(model, new Map());
  return state.points.get(model);
}

function addPoint(model, name, t, value) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return;
  const s = series(model);
  if (!s.has(name)) s.set(name, new Map());
  s.get(name).set(t, Number(value));
}

function addStatusPoints(status) {
  // The same names the monitor stores as metric history (metric, drift.<test>.<feature>).
  const t = secs(status.evaluated_at);
  for (const m of status.metrics || []) addPoint(status.model, m.name, t, m.value);
  for (const d of status.drift || []) addPoint(status.model, `drift.${d.test}.${d.feature}`, t, d.effect_size);
}

async function loadHistory(model) {
  if (state.loaded.has(model)) return;
  state.loaded.add(model);
  try {
    const response = await fetch("api/history?model=" + encodeURIComponent(model));
    if (!response.ok) throw new Error((await response.json()).error || response.statusText);
    const body = await response.json();
    for (const p of body.points) if (p.metric !== "level") addPoint(model, p.metric, secs(p.created_at), p.value);
    state.traffic.set(model, body.traffic);
    renderModel(model);
    state.histories.add(model);
  } catch (e) {
    state.loaded.delete(model);
    showProblem(`history of ${model}: ${e.message}`);
  }
}

// --- charts (uPlot) --------------------------------------------------------------------------

function aligned(named) {
  // [[xs], [ys of series 1], ...] with null where a series has no point at x.
  const keys = [...named.keys()].sort();
  const xs = [...new Set(keys.flatMap(k => [...named.get(k).keys()]))].sort((a, b) => a - b);
  return { keys, data: [xs, ...keys.map(k => xs.map(x => named.get(k).has(x) ? named.get(k).get(x) : null))] };
}

function xRange(xs) {
  // [first, last] point in seconds; one point (or one instant) gets ten minutes before it.
  const lo = xs[0], hi = xs[xs.length - 1];
  return hi - lo >= 1 ? [lo, hi] : [lo - 600, hi + 60];
}

function chart(model, kind, title, named, label) {
  const box = $(`[data-chart="${kind}"]`, $(`#model-${slug(model)}`));
  if (!box) return;
  const { keys, data } = aligned(named);
  const id = `${model}/${kind}`;
  const existing = state.charts.get(id);
  if (!keys.length || !data[0].length) {
    if (existing) { existing.plot.destroy(); state.charts.delete(id); }
    box.innerHTML = `<h3>${esc(title)}</h3><div class="empty">No data yet.</div>`;
    return;
  }
  if (existing && existing.keys.join("\n") === keys.join("\n")) {
    existing.plot.setData(data, false);
    const [lo, hi] = xRange(data[0]);
    existing.plot.setScale("x", { min: lo, max: hi });
    return;
  }
  if (existing) existing.plot.destroy();
  box.innerHTML = `<h3>${esc(title)}</h3>`;
  const width = Math.max(320, box.clientWidth || 420);
  const [lo, hi] = xRange(data[0]);
  const plot = new uPlot({
    width, height: 180,
    // The x range is ours, not uPlot's guess: one point would otherwise span years.
    scales: { x: { time: true, auto: false, min: lo, max: hi, range: (u, min, max) => xRange([min, max]) } },
    axes: [{}, { label, size: 56 }],
    series: [{}, ...keys.map((k, i) => ({
      label: k, stroke: PALETTE[i % PALETTE.length], width: 1.5, spanGaps: true,
      points: { show: data[0].length < 60 },
    }))],
  }, data, box);
  state.charts.set(id, { plot, keys });
}

function renderCharts(model) {
  const named = series(model);
  const pick = test => new Map([...named].filter(([k]) => test(k)));
  chart(model, "quality", "Quality metrics", pick(k => !k.startsWith("drift.") && k !== "level"), "value");
  const drift = new Map([...pick(k => k.startsWith("drift."))].map(([k, v]) => {
    const [, test, ...feature] = k.split(".");
    return [`${feature.join(".")} (${test})`, v];
  }));
  chart(model, "drift", "Drift per feature (effect size)", drift, "effect");
  const traffic = new Map(), latency = new Map();
  for (const p of state.traffic.get(model) || []) {
    const t = secs(p.bucket);
    if (!traffic.has(p.version)) { traffic.set(p.version, new Map()); latency.set(p.version, new Map()); }
    traffic.get(p.version).set(t, p.predictions);
    if (p.p50_latency_ms !== null) latency.get(p.version).set(t, p.p50_latency_ms);
  }
  chart(model, "traffic", "Traffic per version (predictions / minute)", traffic, "per min");
  chart(model, "latency", "Latency per version (p50, ms)", latency, "ms");
}

// --- rendering -------------------------------------------------------------------------------

function section(model) {
  let el = $(`#model-${slug(model)}`);
  if (el) return el;
  el = document.createElement("section");
  el.className = "model";
  el.id = `model-${slug(model)}`;
  el.dataset.model = model;
  el.innerHTML = `<div class="model-head"><b>${esc(model)}</b><span class="level" data-level="">—</span>
      <span class="summary muted"></span></div><ul class="reasons"></ul>
    <div class="charts"><div class="chart" data-chart="quality"></div><div class="chart" data-chart="drift"></div>
      <div class="chart" data-chart="traffic"></div><div class="chart" data-chart="latency"></div></div>
    <div class="row"><div><h3>Traffic split</h3><div class="split"></div><div class="rollout"></div></div>
      <div><h3>Versions and lineage</h3><table class="versions"><thead><tr><th>version</th><th>status</th>
        <th>parent</th><th>family</th><th>trained on</th><th>alert</th><th>registered</th></tr></thead><tbody></tbody></table></div></div>`;
  $("#no-models")?.remove();
  const all = [...document.querySelectorAll("#models > section.model")];
  const next = all.find(s => s.dataset.model > model);
  $("#models").insertBefore(el, next || null);
  return el;
}

function renderModel(model) {
  const el = section(model);
  const s = state.statuses.get(model);
  const level = s ? levelName(s.level) : "";
  el.dataset.level = level;
  const badge = $(".level", el);
  badge.dataset.level = level;
  badge.textContent = level || "not evaluated";
  renderSummary(model, el);
  const next = nextStep(model, s);
  $(".reasons", el).innerHTML = (s?.reasons || []).map(r => `<li>${esc(r)}</li>`).join("")
    + (next ? `<li class="next">${esc(next)}</li>` : "");
  const versions = state.versions.filter(v => v.model === model)
    .sort((a, b) => String(b.created_at).localeCompare(String(a.created_at)));
  $(".versions tbody", el).innerHTML = versions.map(v => `<tr><td>${esc(v.version)}</td><td>${esc(v.status)}</td>
    <td>${esc(v.parent_version) || '<span class="muted">—</span>'}</td><td>${esc(v.family)}</td>
    <td class="num">${v.training_rows ? esc(v.training_rows) + " rows" : ""}</td>
    <td>${v.triggering_alert_id ? "#" + esc(v.triggering_alert_id) : ""}</td><td>${esc(time(v.created_at))}</td></tr>`).join("");
  renderSplit(el, model, versions);
  renderCharts(model);
}

function renderSummary(model, el) {
  // Live counts (the store now) beside the last evaluation (its window, maybe older).
  const s = state.statuses.get(model), c = state.counts[model];
  const live = c ? `now ${c.predictions} predictions, ${c.labels} labelled` : "";
  const last = s
    ? `last evaluation v${s.version} at ${time(s.evaluated_at)}: ${s.rows || 0} rows, ${s.labelled_rows || 0} labelled in its window`
    : "not evaluated yet";
  $(".summary", el).textContent = [live, last].filter(Boolean).join(" · ");
}

const ENDED = ["succeeded", "failed", "cancelled", "not_enough_data", "rejected"];

function nextStep(model, s) {
  // For a RED model: what happens next, from its rollout, its job or the plan's actions.
  if (!s || levelName(s.level) !== "RED") return "";
  const rollout = state.rollouts.find(r => r.model === model && ["pending", "progressing", "paused"].includes(r.state));
  if (rollout) return `next: rollout #${rollout.id} to v${rollout.to_version} is ${rollout.state}`;
  const job = state.jobs.find(j => j.model === model);
  if (job && !ENDED.includes(job.state)) return `next: retraining job #${job.id} is ${job.state} (${job.stage || "queued"})`;
  const actions = s.actions || [];
  if (actions.includes("retrain")) return "next: retraining was asked for" + (job ? `; the last job #${job.id} ended ${job.state}` : "");
  if (actions.includes("rollback")) return "next: the previous version was asked back (rollback)";
  return actions.length ? `next: ${actions.join(", ")}` : "next: nothing automatic (the plan has no RED action)";
}

function renderSplit(el, model, versions) {
  const rollout = state.rollouts.find(r => r.model === model);
  let weights = {};
  if (rollout && Object.keys(rollout.weights || {}).length) weights = rollout.weights;
  else {
    const serving = versions.find(v => v.status === "serving");
    if (serving) weights[serving.version] = 100;
  }
  const entries = Object.entries(weights).filter(([, w]) => w > 0);
  $(".split", el).innerHTML = entries.length
    ? entries.map(([name, w], i) => `<div style="width:${Number(w)}%;background:${PALETTE[i % PALETTE.length]}" title="${esc(name)}">${esc(name)} ${Number(w).toFixed(0)}%</div>`).join("")
    : '<span class="muted">&nbsp;no traffic</span>';
  $(".rollout", el).innerHTML = rollout ? `<h3 style="margin-top:10px">Rollout #${esc(rollout.id)}: ${esc(rollout.from_version) || "—"} → ${esc(rollout.to_version)}
      (${esc(rollout.strategy)}, <span class="rollout-state">${esc(rollout.state)}</span>)</h3>
      <div class="progress"><div style="width:${Number(rollout.current_weight)}%"></div></div>
      <span class="muted">${Number(rollout.current_weight).toFixed(0)}% on ${esc(rollout.to_version)}${rollout.reason ? " · " + esc(rollout.reason) : ""}</span>
      <ol class="steps">${(rollout.steps || []).slice(-5).map(e => `<li>${esc(time(e.time))} ${esc(e.decision)} → ${Number(e.weight).toFixed(0)}% ${esc(e.reason)}</li>`).join("")}</ol>`
    : "";
}

function renderAlerts(alerts) {
  $("#alerts tbody").innerHTML = alerts.length ? alerts.map(a => `<tr><td>#${esc(a.id)}</td><td>${esc(time(a.created_at))}</td>
    <td>${esc(a.model)} v${esc(a.version)}</td><td>${esc(levelName(a.previous_level))} → ${esc(levelName(a.level))}</td>
    <td>${esc(a.action)} → ${esc(a.sink)}</td><td>${esc(a.status)}</td><td class="muted">${esc((a.reasons || []).join("; "))}</td></tr>`).join("")
    : '<tr><td colspan="7" class="muted">None.</td></tr>';
}

function renderJobs(jobs) {
  $("#jobs tbody").innerHTML = jobs.length ? jobs.map(j => `<tr><td>#${esc(j.id)}</td><td>${esc(time(j.created_at))}</td>
    <td>${esc(j.model)}</td><td class="job-state">${esc(j.state)}</td><td>${esc(j.stage)}</td>
    <td>${esc(j.champion_version)} → ${esc(j.new_version) || "…"}</td><td>${esc(j.decision)}</td><td class="muted">${esc(j.reason)}</td></tr>`).join("")
    : '<tr><td colspan="8" class="muted">None.</td></tr>';
}

function renderAll() {
  for (const model of models()) { renderModel(model); loadHistory(model); }
}

function showProblem(message) { $("#problem").textContent = message || ""; }

// --- the event stream ------------------------------------------------------------------------

const handlers = {
  snapshot(d) {
    state.statuses = new Map(d.statuses.map(s => [s.model, s]));
    for (const s of d.statuses) addStatusPoints(s);
    state.versions = d.versions; state.rollouts = d.rollouts; state.jobs = d.jobs;
    state.counts = d.counts || {};
    renderAlerts(d.alerts); renderJobs(d.jobs); renderAll(); showProblem("");
  },
  status(s) { state.statuses.set(s.model, s); addStatusPoints(s); renderModel(s.model); loadHistory(s.model); },
  versions(d) { state.versions = d; renderAll(); },
  rollouts(d) { state.rollouts = d; renderAll(); },
  alerts(d) { renderAlerts(d); },
  jobs(d) { state.jobs = d; renderJobs(d); for (const m of models()) renderModel(m); },
  counts(d) { state.counts = d; for (const m of models()) renderSummary(m, section(m)); },
  traffic(d) { for (const [model, points] of Object.entries(d)) { state.traffic.set(model, points); renderCharts(model); } },
  heartbeat(d) { $("#heartbeat").textContent = "last heartbeat " + time(d.time); },
  problem(d) { showProblem(d.message); },
};

function connect() {
  const source = new EventSource("api/events");
  const conn = $("#connection");
  source.onopen = () => { conn.dataset.state = "live"; conn.textContent = "live"; };
  source.onerror = () => { conn.dataset.state = "connecting"; conn.textContent = "reconnecting…"; };
  for (const [name, handle] of Object.entries(handlers)) {
    source.addEventListener(name, ev => {
      window.cyclone.events += 1;
      try { handle(JSON.parse(ev.data)); } catch (e) { showProblem(`${name}: ${e.message}`); }
    });
  }
}

window.addEventListener("resize", () => {
  for (const { plot } of state.charts.values()) {
    const width = Math.max(320, plot.root.parentElement.clientWidth);
    plot.setSize({ width, height: 180 });
  }
});
connect();
