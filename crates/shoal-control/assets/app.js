// Shoal dashboard: one page over the control plane's REST API (the same
// calls the CLI makes). Live data comes from one server-sent event stream
// (`/api/v1/stream`); the browser reconnects it by itself, so a page left
// open holds one connection and bounded memory (series capped at an hour).
"use strict";

const CSRF_HEADER = "x-shoal-dashboard";
const MAX_POINTS = 3600;
const AUDIT_ENTRIES = 500;
const ACTIVE = new Set(["progressing", "holding", "paused"]);

const state = {
  me: null,
  canDeploy: false,
  status: null,
  deployments: [],
  revision: -1,
  series: new Map(), // model -> { points: [], after: number }
  audit: [],
  models: [],
  details: new Map(),
  cards: new Map(), // model -> rollout card element
  busy: false,
  pending: null,
};

const $ = (id) => document.getElementById(id);
const esc = (v) =>
  String(v ?? "").replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
const clock = (ms) => new Date(ms).toLocaleTimeString([], { hour12: false });
const when = (ms) => new Date(ms).toLocaleString([], { hour12: false });
const ago = (ms) => {
  const s = Math.max(0, Math.round((Date.now() - ms) / 1000));
  return s < 90 ? `${s} s ago` : s < 5400 ? `${Math.round(s / 60)} min ago` : `${Math.round(s / 3600)} h ago`;
};
const bytes = (n) => (n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : n >= 1024 ? `${(n / 1024).toFixed(1)} KiB` : `${n} B`);
const num = (v, digits = 1) => (v == null ? "–" : Number(v).toFixed(digits));

async function api(path, options = {}) {
  const headers = { Accept: "application/json" };
  const method = options.method || "GET";
  if (method !== "GET") {
    headers[CSRF_HEADER] = "1";
    headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, { credentials: "same-origin", ...options, method, headers });
  const text = await response.text();
  let body = null;
  try {
    body = text ? JSON.parse(text) : null;
  } catch {
    body = null;
  }
  if (!response.ok) {
    const error = new Error((body && body.error) || `${response.status} ${response.statusText}`);
    error.status = response.status;
    throw error;
  }
  return body;
}

function toast(message, bad = false) {
  const t = $("toast");
  t.textContent = message;
  t.className = `toast show${bad ? " bad" : ""}`;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => (t.className = "toast"), 6000);
}

function showSignin(message) {
  $("app").hidden = true;
  $("nav").hidden = true;
  $("signout").hidden = true;
  $("who").textContent = "";
  $("signin").hidden = false;
  const error = $("signin-error");
  error.hidden = !message;
  error.textContent = message || "";
  $("token").focus();
}

async function start() {
  const hash = new URLSearchParams(location.hash.slice(1));
  if (hash.get("signin") === "invalid") {
    history.replaceState(null, "", "/");
    showSignin("That token is not valid: it is unknown or revoked.");
    return;
  }
  try {
    state.me = await api("/api/v1/auth/whoami");
  } catch (e) {
    showSignin(e.status === 401 ? "" : `Cannot reach the control plane: ${e.message}`);
    return;
  }
  if (state.me.role === "fleet") {
    showSignin("Tokens with role fleet are for replicas and gateways: sign in with a viewer, deployer or admin token.");
    return;
  }
  state.canDeploy = ["deployer", "admin"].includes(state.me.role);
  $("who").textContent = `${state.me.name} (${state.me.role})`;
  $("signin").hidden = true;
  $("app").hidden = false;
  $("nav").hidden = false;
  $("signout").hidden = false;
  $("audit-filter").addEventListener("input", renderAudit);
  $("models").addEventListener("click", onRegistryClick);
  connect();
}

function connect() {
  const events = new EventSource("/api/v1/stream");
  events.addEventListener("snapshot", (event) => {
    let snapshot;
    try {
      snapshot = JSON.parse(event.data);
    } catch {
      return;
    }
    $("connection").textContent = "";
    onSnapshot(snapshot);
  });
  events.onerror = async () => {
    $("connection").textContent = "Connection lost; reconnecting…";
    try {
      await api("/api/v1/auth/whoami");
    } catch (e) {
      if (e.status === 401) {
        events.close();
        showSignin("Your session ended (signed out, expired or its token revoked): sign in again.");
      }
    }
  };
}

// One snapshot at a time; a newer one arriving meanwhile waits, older
// waiting ones are dropped.
async function onSnapshot(snapshot) {
  if (state.busy) {
    state.pending = snapshot;
    return;
  }
  state.busy = true;
  try {
    let next = snapshot;
    while (next) {
      state.pending = null;
      await apply(next);
      next = state.pending;
    }
  } finally {
    state.busy = false;
  }
}

async function apply(snapshot) {
  // How many snapshots this page has shown (the browser test waits on it).
  document.body.dataset.snapshots = String(Number(document.body.dataset.snapshots || 0) + 1);
  state.status = snapshot.status;
  state.deployments = snapshot.deployments || [];
  renderFleet();
  if (state.status.revision !== state.revision) {
    state.revision = state.status.revision;
    await Promise.all([refreshRegistry(), refreshAudit()]);
  }
  await refreshSeries();
  renderRollouts();
}

// ---------------------------------------------------------------- fleet

function renderFleet() {
  const status = state.status;
  const replicas = status.replicas || [];
  const healthy = replicas.filter((r) => r.healthy).length;
  const control = status.control;
  const regions = new Map();
  for (const r of replicas) {
    if (!regions.has(r.region)) regions.set(r.region, []);
    regions.get(r.region).push(r);
  }
  $("fleet-summary").innerHTML = `
    <div class="stat"><b id="healthy-count">${healthy} / ${replicas.length}</b>replicas healthy</div>
    <div class="stat"><b>${regions.size}</b>regions</div>
    <div class="stat"><b>${replicas.reduce((a, r) => a + (r.rps || 0), 0).toFixed(1)}</b>requests/s</div>
    <div class="stat"><b>${status.revision}</b>fleet revision</div>
    <div class="stat"><b>${esc(control && control.leader ? control.leader : "none")}</b>control-plane leader</div>`;
  $("control-members").innerHTML = control
    ? `<h3>Control plane</h3><p>Term ${control.term}. Members: ${(control.members || [])
        .map(
          (m) =>
            `<span class="badge ${m.id === control.leader ? "ok" : "info"}" data-member="${esc(m.id)}">${esc(m.id)}${
              m.id === control.leader ? " · leader" : ""
            }</span> <span class="hint">${esc(m.address)}, seen ${ago(m.last_seen)}</span>`,
        )
        .join(" ")}</p>`
    : "";
  $("regions").innerHTML = [...regions.entries()]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(
      ([region, rs]) => `<div class="region" data-region="${esc(region)}">
        <h3>${esc(region)} <span class="hint">${rs.filter((r) => r.healthy).length} of ${rs.length} healthy</span></h3>
        ${rs.map(replicaView).join("")}</div>`,
    )
    .join("");
  const gateways = status.gateways || [];
  $("gateways").innerHTML = `<h3>Gateways</h3>${
    gateways.length
      ? `<p>${gateways
          .map((g) => `<span class="badge ${Date.now() - g.last_report < 30000 ? "ok" : "warn"}">${esc(g.id)}</span> <span class="hint">reported ${ago(g.last_report)}</span>`)
          .join(" ")}</p>`
      : `<p class="hint">No gateway has reported yet.</p>`
  }`;
}

function replicaView(r) {
  const serving = new Set(r.serving);
  const desired = new Set(r.desired);
  const mark = (list, other) =>
    list.length
      ? list.map((k) => `<code class="${other.has(k) ? "" : "skew"}">${esc(k)}</code>`).join(" ")
      : `<span class="hint">nothing</span>`;
  const failures = Object.entries(r.failures || {});
  const health = r.healthy
    ? `<span class="badge ok">healthy</span>`
    : `<span class="badge bad">${r.last_heartbeat ? "unhealthy" : "never seen"}</span>`;
  return `<div class="replica" data-replica="${esc(r.id)}" data-healthy="${r.healthy}">
    <div><b>${esc(r.id)}</b> ${health}${r.standby ? ` <span class="badge info">standby</span>` : ""}${
      r.skew ? ` <span class="badge warn">${r.behind ? "behind" : "converging"}</span>` : ""
    } <span class="hint">${esc(r.address)}</span></div>
    <dl class="kv">
      <dt>Serving</dt><dd>${mark(r.serving, desired)}</dd>
      <dt>Should serve</dt><dd>${mark(r.desired, serving)}</dd>
      ${r.skew && r.skew_since ? `<dt>Skew</dt><dd class="skew">since ${clock(r.skew_since)}</dd>` : ""}
      <dt>Load</dt><dd>${r.in_flight} in flight · ${num(r.rps)} requests/s</dd>
      <dt>Heartbeat</dt><dd>${r.last_heartbeat ? ago(r.last_heartbeat) : "none"}</dd>
      ${failures.map(([k, f]) => `<dt class="error">Failed</dt><dd class="error">${esc(k)}: ${esc(f.reason)}</dd>`).join("")}
    </dl></div>`;
}

// ------------------------------------------------------------- rollouts

async function refreshSeries() {
  const rollouts = state.status.rollouts || {};
  for (const model of [...state.series.keys()]) {
    if (!(model in rollouts)) state.series.delete(model);
  }
  await Promise.all(
    Object.keys(rollouts).map(async (model) => {
      const series = state.series.get(model) || { points: [], after: -1 };
      try {
        const history = await api(`/api/v1/rollouts/${encodeURIComponent(model)}/history?after=${series.after}`);
        for (const p of history.points) series.points.push(p);
        if (series.points.length > MAX_POINTS) series.points.splice(0, series.points.length - MAX_POINTS);
        if (series.points.length) series.after = series.points[series.points.length - 1].at;
        state.series.set(model, series);
      } catch (e) {
        if (e.status === 401) showSignin("Your session ended: sign in again.");
      }
    }),
  );
}

function renderRollouts() {
  const rollouts = state.status.rollouts || {};
  const models = Object.keys(rollouts).sort();
  $("no-rollouts").hidden = models.length > 0;
  for (const [model, card] of state.cards) {
    if (!(model in rollouts)) {
      card.remove();
      state.cards.delete(model);
    }
  }
  for (const model of models) {
    let card = state.cards.get(model);
    if (!card) {
      card = rolloutCard(model);
      state.cards.set(model, card);
      $("rollout-list").append(card);
    }
    updateRolloutCard(card, model, rollouts[model]);
  }
}

// The card's buttons are made once and kept, so keyboard focus survives
// the updates every second; only the text and charts are redrawn.
function rolloutCard(model) {
  const card = document.createElement("article");
  card.className = "card rollout";
  card.dataset.model = model;
  card.setAttribute("aria-label", `Rollout of ${model}`);
  card.innerHTML = `<header><h3 class="title"></h3><span class="badge state"></span>
    <div class="actions"></div></header><div class="body"></div>`;
  const actions = card.querySelector(".actions");
  const button = (label, action, cls) => {
    const b = document.createElement("button");
    b.type = "button";
    b.textContent = label;
    b.dataset.action = action;
    if (cls) b.className = cls;
    b.addEventListener("click", () => act(action, model));
    actions.append(b);
    return b;
  };
  if (state.canDeploy) {
    button("Promote", "promote", "primary");
    button("Abort", "abort", "danger");
    button("Roll back", "rollback", "danger");
  }
  return card;
}

function updateRolloutCard(card, model, r) {
  const active = ACTIVE.has(r.state);
  card.dataset.state = r.state;
  card.querySelector(".title").textContent = `${model}: ${r.from ? `${r.from} → ` : ""}${r.to} (${r.strategy})`;
  const badge = card.querySelector(".state");
  badge.textContent = r.state.replace("_", " ");
  badge.className = `badge state ${r.state === "promoted" ? "ok" : active ? "info" : "bad"}`;
  for (const b of card.querySelectorAll(".actions button")) {
    b.hidden = b.dataset.action !== "rollback" && !active;
  }
  const series = state.series.get(model);
  const points = series ? series.points : [];
  // From just before this rollout began (not the one before it).
  const t0 = r.started_at - 15000;
  const last = points.length ? points[points.length - 1].at : Date.now();
  const t1 = active ? Math.max(last, r.started_at + 10000) : Math.max(Math.min(last, r.updated_at + 60000), r.started_at + 10000);
  const shown = points.filter((p) => p.at >= t0 && p.at <= t1);
  const versions = versionsOf(r, shown);
  const cls = (v) => `c${versions.indexOf(v) % 5}`;
  const weights = Object.entries(r.weights || {}).filter(([, w]) => w > 0);
  let decisions = state.audit
    .filter((e) => (e.target === model || e.target.startsWith(`${model}:`)) && e.at >= r.started_at - 1000)
    .filter((e) => /^(deploy|rollback|traffic)/.test(e.action));
  // This rollout's decisions begin with the deploy that started it.
  const begun = decisions.map((e) => e.action).lastIndexOf("deploy");
  if (begun > 0) decisions = decisions.slice(begun);
  const markers = decisions.filter((e) => e.at >= t0 && e.at <= t1).map((e) => ({ at: e.at, label: `${e.action}: ${e.detail}` }));
  const line = (pick, scale = 1) =>
    versions.map((v) => ({
      version: v,
      cls: cls(v),
      points: shown.map((p) => {
        const value = pick(p, v);
        return [p.at, value == null ? null : value * scale];
      }),
    }));
  const metric = (name) => (p, v) => (p.versions[v] ? p.versions[v][name] : null);
  const charts = [
    chart({ id: `${model}-weights`, title: "Traffic weight", unit: "%", t0, t1, markers, series: line((p, v) => p.weights[v] ?? 0), yMax: 100 }),
    chart({ id: `${model}-p99`, kind: "p99", title: "p99 latency", unit: "ms", t0, t1, markers, series: line(metric("p99_ms")) }),
    chart({ id: `${model}-p50`, title: "p50 latency", unit: "ms", t0, t1, markers, series: line(metric("p50_ms")) }),
    chart({ id: `${model}-errors`, title: "Error rate", unit: "%", t0, t1, markers, series: line(metric("error_rate"), 100) }),
    chart({ id: `${model}-rps`, title: "Request rate", unit: "req/s", t0, t1, markers, series: line(metric("rps")) }),
  ];
  if (shown.some((p) => Object.values(p.versions).some((x) => x.reward != null))) {
    charts.push(chart({ id: `${model}-reward`, title: "Mean reward", unit: "reward", t0, t1, markers, series: line(metric("reward")) }));
  }
  const shadow = r.shadow
    ? `<h4>Shadow comparison</h4><dl class="kv">
        <dt>Mirrored</dt><dd>${r.shadow.mirrored}</dd><dt>Compared</dt><dd>${r.shadow.compared}</dd>
        <dt>Agreement</dt><dd data-agreement="${r.shadow.agreement ?? ""}">${r.shadow.agreement == null ? "–" : `${(r.shadow.agreement * 100).toFixed(2)} % of ${r.shadow.rows} rows`}</dd>
        <dt>Largest difference</dt><dd>${r.shadow.max_abs_diff.toExponential(2)}</dd>
        <dt>Latency, candidate − primary</dt><dd>${num(r.shadow.latency_diff_ms, 2)} ms</dd>
        <dt>Candidate errors</dt><dd>${r.shadow.candidate_errors}</dd></dl>`
    : "";
  const arms = (r.arms || []).length
    ? `<h4>Arms${r.significant == null ? "" : r.significant ? " · difference significant" : " · not significant yet"}</h4>
       <table><thead><tr><th scope="col">Version</th><th scope="col">Rewards</th><th scope="col">Mean</th><th scope="col">95 % interval</th><th scope="col">Traffic</th></tr></thead><tbody>
       ${r.arms.map((a) => `<tr data-arm="${esc(a.version)}"><td>${esc(a.version)}</td><td>${a.count}</td><td>${num(a.mean, 3)}</td><td>${num(a.ci95[0], 3)} – ${num(a.ci95[1], 3)}</td><td>${a.weight} %</td></tr>`).join("")}
       </tbody></table>`
    : "";
  card.querySelector(".body").innerHTML = `
    <p class="reason"><b>Last decision:</b> <span class="reason-text">${esc(r.reason)}</span></p>
    <p class="hint">Step ${r.step} · ${r.replicas_done} of ${r.replicas_total} replicas done · started ${clock(r.started_at)} · updated ${clock(r.updated_at)}</p>
    <div class="weights" role="img" aria-label="Traffic now: ${esc(weights.map(([v, w]) => `${v} ${w} %`).join(", "))}">
      ${weights.map(([v, w]) => `<div class="w${versions.indexOf(v) % 5}" data-w="${w}">${esc(v)} ${w} %</div>`).join("")}
    </div>
    <div class="legend">${versions.map((v) => `<span class="${cls(v)}">version ${esc(v)}${v === r.to ? " (new)" : v === r.from ? " (baseline)" : ""}</span>`).join("")}</div>
    <div class="charts">${charts.join("")}</div>
    ${shadow}${arms}
    <h4>Decisions</h4>
    <ol class="decisions">${decisions.map((e) => `<li data-action="${esc(e.action)}"><time>${clock(e.at)}</time> <b>${esc(e.action)}</b> by ${esc(e.actor)}: ${esc(e.detail)}</li>`).join("") || "<li class=hint>none yet</li>"}</ol>`;
  // Widths through the CSSOM: the page's policy allows no inline styles.
  for (const el of card.querySelectorAll(".weights [data-w]")) el.style.width = `${el.dataset.w}%`;
}

// The rollout's versions first (baseline, then new), then any other
// version with traffic in the charted points.
function versionsOf(r, points) {
  const versions = [];
  const add = (v) => v != null && !versions.includes(v) && versions.push(v);
  add(r.from);
  add(r.to);
  Object.keys(r.weights || {}).forEach(add);
  (r.arms || []).forEach((a) => add(a.version));
  points.forEach((p) => Object.keys(p.versions).forEach(add));
  return versions;
}

// A line chart as SVG: time on x, `unit` on y, a dashed line per decision.
function chart({ id, kind, title, unit, t0, t1, series, markers, yMax }) {
  const W = 480, H = 210, L = 52, R = 28, T = 12, B = 38;
  const values = series.flatMap((s) => s.points.map((p) => p[1]).filter((v) => v != null && isFinite(v)));
  const top = yMax ?? niceMax(values.length ? Math.max(...values) : 1);
  const span = Math.max(1, t1 - t0);
  const x = (t) => L + ((t - t0) / span) * (W - L - R);
  const y = (v) => T + (1 - Math.min(v, top) / top) * (H - T - B);
  const yTicks = [0, 0.25, 0.5, 0.75, 1].map((f) => f * top);
  const xTicks = [0, 0.25, 0.5, 0.75, 1].map((f) => t0 + f * span);
  const grid =
    yTicks.map((v) => `<line class="grid" x1="${L}" x2="${W - R}" y1="${y(v)}" y2="${y(v)}"/><text x="${L - 6}" y="${y(v) + 4}" text-anchor="end">${fmt(v)}</text>`).join("") +
    xTicks.map((t, i) => `<text x="${x(t)}" y="${H - B + 15}" text-anchor="${i === 0 ? "start" : i === xTicks.length - 1 ? "end" : "middle"}">${clock(t)}</text>`).join("");
  const paths = series
    .map((s) => {
      let d = "";
      let pen = false;
      for (const [t, v] of s.points) {
        if (v == null || !isFinite(v)) {
          pen = false;
          continue;
        }
        d += `${pen ? "L" : "M"}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true;
      }
      const own = s.points.map((p) => p[1]).filter((v) => v != null && isFinite(v));
      const max = own.length ? Math.max(...own) : "";
      const lastValue = own.length ? own[own.length - 1] : "";
      return `<path class="series ${s.cls}" d="${d}" data-version="${esc(s.version)}" data-max="${max}" data-last="${lastValue}"><title>version ${esc(s.version)}</title></path>`;
    })
    .join("");
  const lines = markers
    .map((m) => `<line class="decision" x1="${x(m.at)}" x2="${x(m.at)}" y1="${T}" y2="${H - B}" data-at="${m.at}"><title>${esc(clock(m.at))} ${esc(m.label)}</title></line>`)
    .join("");
  const titleId = `t-${id}`.replace(/[^A-Za-z0-9_-]/g, "_");
  return `<figure class="chart" data-chart="${esc(kind || title)}">
    <figcaption id="${titleId}">${esc(title)} (${esc(unit)})</figcaption>
    <svg viewBox="0 0 ${W} ${H}" role="img" aria-labelledby="${titleId}">
      ${grid}
      <line class="axis" x1="${L}" x2="${L}" y1="${T}" y2="${H - B}"/>
      <line class="axis" x1="${L}" x2="${W - R}" y1="${H - B}" y2="${H - B}"/>
      <text x="${(L + W - R) / 2}" y="${H - 4}" text-anchor="middle">time (local)</text>
      <text x="12" y="${(T + H - B) / 2}" text-anchor="middle" transform="rotate(-90 12 ${(T + H - B) / 2})">${esc(unit)}</text>
      ${lines}${paths}
    </svg></figure>`;
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (v <= m * p) return m * p;
  return 10 * p;
}

function fmt(v) {
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1).replace(/\.0$/, "") : Number(v.toPrecision(2)).toString();
}

// -------------------------------------------------------------- actions

function confirmAction(text) {
  const dialog = $("confirm");
  $("confirm-text").textContent = text;
  return new Promise((resolve) => {
    dialog.returnValue = "cancel";
    dialog.addEventListener("close", () => resolve(dialog.returnValue === "ok"), { once: true });
    dialog.showModal();
    dialog.querySelector("button[value=cancel]").focus();
  });
}

const ACTIONS = {
  promote: { text: (m) => `Promote the rollout of ${m} now? All traffic moves to the new version.`, path: (m) => `/api/v1/rollouts/${m}/promote`, done: "promoted" },
  abort: { text: (m) => `Abort the rollout of ${m}? Traffic returns to the version that served before.`, path: (m) => `/api/v1/rollouts/${m}/abort`, done: "aborted" },
  rollback: { text: (m) => `Roll ${m} back to its last known good version?`, path: (m) => `/api/v1/models/${m}/rollback`, done: "rolled back" },
};

async function act(action, model) {
  const spec = ACTIONS[action];
  if (!(await confirmAction(spec.text(model)))) return;
  try {
    await api(spec.path(encodeURIComponent(model)), { method: "POST", body: "{}" });
    toast(`${model}: ${spec.done}.`);
  } catch (e) {
    toast(`${model}: ${e.message}`, true);
  }
}

function onRegistryClick(event) {
  const b = event.target.closest("button[data-action]");
  if (b) act(b.dataset.action, b.dataset.model);
}

// ------------------------------------------------------------- registry

async function refreshRegistry() {
  try {
    state.models = await api("/api/v1/models");
    const details = await Promise.all(state.models.map((m) => api(`/api/v1/models/${encodeURIComponent(m.name)}`)));
    state.details = new Map(details.map((d) => [d.model.name, d]));
  } catch (e) {
    if (e.status === 401) showSignin("Your session ended: sign in again.");
    return;
  }
  renderRegistry();
}

function renderRegistry() {
  const deployed = new Map(state.deployments.map((d) => [d.model, d]));
  $("models").innerHTML =
    state.models
      .map((m) => {
        const detail = state.details.get(m.name);
        const d = deployed.get(m.name);
        const traffic = d ? d.targets.map((t) => `${t.version} ${t.weight} %`).join(", ") : "not deployed";
        const rows = (detail ? detail.versions : [])
          .slice()
          .reverse()
          .map(
            (v) => `<tr data-version="${esc(v.version)}">
              <td><b>${esc(v.version)}</b>${v.version === m.last_known_good ? ` <span class="badge ok">last known good</span>` : ""}</td>
              <td><span class="badge ${v.status === "production" ? "ok" : v.status === "canary" ? "info" : v.status === "deprecated" ? "warn" : ""}">${esc(v.status)}</span>${v.rolled_back ? ` <span class="badge bad">rolled back</span>` : ""}</td>
              <td><code title="${esc(v.sha256)}">${esc(v.sha256.slice(0, 12))}…</code></td>
              <td>${bytes(v.size)}</td>
              <td>${when(v.created_at)}</td>
              <td>${Object.entries(v.metrics).map(([k, x]) => `${esc(k)}=${esc(x)}`).join(", ") || "–"}</td>
              <td>${Object.entries(v.labels).map(([k, x]) => `${esc(k)}=${esc(x)}`).join(", ") || "–"}</td>
              <td>${esc(v.lineage || "–")}</td></tr>`,
          )
          .join("");
        const rollback =
          state.canDeploy && d ? `<button type="button" class="danger" data-action="rollback" data-model="${esc(m.name)}">Roll back</button>` : "";
        return `<article class="card" data-model="${esc(m.name)}"><header><h3>${esc(m.name)}</h3>
            <span class="hint">production ${esc(m.production || "–")} · last known good ${esc(m.last_known_good || "–")} · traffic: ${esc(traffic)}</span>
            <div class="actions">${rollback}</div></header>
          <table><thead><tr><th scope="col">Version</th><th scope="col">Status</th><th scope="col">SHA-256</th><th scope="col">Size</th><th scope="col">Registered</th><th scope="col">Metrics</th><th scope="col">Labels</th><th scope="col">Lineage</th></tr></thead>
          <tbody>${rows}</tbody></table></article>`;
      })
      .join("") || `<p class="hint">No model registered yet: <code>shoal model push NAME FILE</code>.</p>`;
}

// ---------------------------------------------------------------- audit

async function refreshAudit() {
  try {
    state.audit = await api(`/api/v1/audit?last=${AUDIT_ENTRIES}`);
  } catch (e) {
    if (e.status === 401) showSignin("Your session ended: sign in again.");
    return;
  }
  renderAudit();
}

function renderAudit() {
  const filter = $("audit-filter").value.trim().toLowerCase();
  const rows = state.audit
    .slice()
    .reverse()
    .filter((e) => !filter || [e.actor, e.action, e.target, e.detail].some((f) => f.toLowerCase().includes(filter)));
  $("audit-rows").innerHTML = rows
    .map((e) => `<tr data-seq="${e.seq}"><td>${when(e.at)}</td><td>${esc(e.actor)}</td><td>${esc(e.action)}</td><td>${esc(e.target)}</td><td>${esc(e.detail)}</td></tr>`)
    .join("");
}

start();
