// gguf-swarm dashboard: draws the node's snapshots (Server-Sent Events from
// /api/events, a JSON snapshot a second; /api/state polled if they fail).
// Everything from the node is put in the page as text (textContent), never
// as HTML: peers' reasons and model names are not ours.
"use strict";

const TOKEN_KEY = "gguf-swarm-token";
const COLORS = {
  down: "#4ea1ff", up: "#f5a524", held: "#2fbf71", part: "#1d7a4a", fetching: "#f5d90a",
  c0: "#b3343c", c1: "#6a4fc4", c2: "#3a78d8", c3: "#79c7ff", grid: "#2a2f3a", text: "#8b93a7",
};

let token = "";
let last = null;

function takeToken() {
  const m = location.hash.match(/token=([A-Za-z0-9_-]+)/);
  if (m) {
    sessionStorage.setItem(TOKEN_KEY, m[1]);
    history.replaceState(null, "", location.pathname);  // not left in the address bar or history
  }
  token = sessionStorage.getItem(TOKEN_KEY) || "";
  document.getElementById("no-token").hidden = !!token;
}

function $(id) { return document.getElementById(id); }

function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined && text !== null) e.textContent = String(text);
  if (cls) e.className = cls;
  return e;
}

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  n = Number(n) || 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return i === 0 ? `${n.toFixed(0)} ${units[i]}` : `${n.toFixed(1)} ${units[i]}`;
}

function rate(n) { return `${bytes(n)}/s`; }

function seconds(s) {
  if (s === null || s === undefined) return "–";
  s = Math.round(s);
  const h = Math.floor(s / 3600), m = Math.floor(s / 60) % 60, r = s % 60;
  return h ? `${h}:${String(m).padStart(2, "0")}:${String(r).padStart(2, "0")}` : `${m}:${String(r).padStart(2, "0")}`;
}

function shortCid(cid) { return cid.length > 20 ? `${cid.slice(0, 10)}…${cid.slice(-6)}` : cid; }

// ---- canvases ---------------------------------------------------------------

function fitCanvas(canvas, cssHeight) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth || canvas.parentElement.clientWidth || 600;
  canvas.style.height = `${cssHeight}px`;
  if (canvas.width !== Math.round(width * ratio) || canvas.height !== Math.round(cssHeight * ratio)) {
    canvas.width = Math.round(width * ratio);
    canvas.height = Math.round(cssHeight * ratio);
  }
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, cssHeight);
  return [ctx, width, cssHeight];
}

function drawSeries(ctx, values, color, w, h, max, fill) {
  if (!values.length) return;
  // The last 2 minutes at most; a young history is stretched over at least 30 s.
  const n = Math.max(30, values.length), step = w / (n - 1), x0 = w - (values.length - 1) * step;
  ctx.beginPath();
  values.forEach((v, i) => {
    const x = x0 + i * step, y = h - 2 - (h - 4) * (v / max);
    if (i === 0) ctx.moveTo(x, y); else ctx.lineTo(x, y);
  });
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5;
  ctx.stroke();
  if (fill) {
    ctx.lineTo(w, h);
    ctx.lineTo(x0, h);
    ctx.closePath();
    ctx.globalAlpha = 0.15;
    ctx.fillStyle = color;
    ctx.fill();
    ctx.globalAlpha = 1;
  }
}

function drawRateGraph(history) {
  const [ctx, w, h] = fitCanvas($("rate-graph"), 140);
  const down = history.down || [], up = history.up || [];
  const max = Math.max(1024, ...down, ...up) * 1.1;
  ctx.strokeStyle = COLORS.grid;
  ctx.lineWidth = 1;
  for (let i = 1; i < 4; i++) {
    const y = Math.round((h * i) / 4) + 0.5;
    ctx.beginPath(); ctx.moveTo(0, y); ctx.lineTo(w, y); ctx.stroke();
  }
  drawSeries(ctx, up, COLORS.up, w, h, max, true);
  drawSeries(ctx, down, COLORS.down, w, h, max, true);
  $("graph-max").textContent = `(top of the graph: ${rate(max)}; last ${Math.max(down.length, up.length)} s)`;
}

function drawSparkline(canvas, values) {
  const [ctx, w, h] = fitCanvas(canvas, 28);
  drawSeries(ctx, values, COLORS.down, w, h, Math.max(1024, ...values) * 1.1, true);
}

// Held here: green. Not held: by how many peers in session hold it (0: red).
function cellColor(have, copies) {
  if (have === "2") return COLORS.held;
  if (have === "1") return COLORS.part;
  const c = Number(copies) || 0;
  return c === 0 ? COLORS.c0 : c === 1 ? COLORS.c1 : c === 2 ? COLORS.c2 : COLORS.c3;
}

// One cell per fragment (or per `per_cell` consecutive fragments of a big model).
function drawMap(canvas, map) {
  const width = canvas.clientWidth || canvas.parentElement.clientWidth || 600;
  const n = map.cells;
  let size = Math.floor(Math.sqrt((width * 90) / Math.max(n, 1)));
  size = Math.max(3, Math.min(16, size));
  const cols = Math.max(1, Math.floor(width / size));
  const rows = Math.max(1, Math.ceil(n / cols));
  const [ctx] = fitCanvas(canvas, rows * size);
  const gap = size >= 6 ? 1 : 0;
  for (let i = 0; i < n; i++) {
    const x = (i % cols) * size, y = Math.floor(i / cols) * size;
    ctx.fillStyle = cellColor(map.have[i], map.copies[i]);
    ctx.fillRect(x, y, size - gap, size - gap);
    if (map.have[i] === "f") {  // being fetched: a dot on its holders' colour
      ctx.fillStyle = COLORS.fetching;
      const d = Math.max(2, Math.round(size / 3));
      ctx.fillRect(x + Math.floor((size - gap - d) / 2), y + Math.floor((size - gap - d) / 2), d, d);
    }
  }
  canvas.dataset.cols = cols;
  canvas.dataset.size = size;
}

function mapTitle(canvas, map, event) {
  const size = Number(canvas.dataset.size), cols = Number(canvas.dataset.cols);
  const rect = canvas.getBoundingClientRect();
  const i = Math.floor((event.clientY - rect.top) / size) * cols + Math.floor((event.clientX - rect.left) / size);
  if (i < 0 || i >= map.cells) { canvas.title = ""; return; }
  const first = i * map.per_cell, lastOne = Math.min(map.fragments, first + map.per_cell) - 1;
  const what = { "2": "held", "1": "partly held", "f": "being fetched", "0": "missing" }[map.have[i]];
  const range = first === lastOne ? `fragment ${first}` : `fragments ${first}–${lastOne}`;
  canvas.title = `${range}: ${what}; ${map.copies[i]}${map.copies[i] === "9" ? "+" : ""} peer(s) hold it`;
}

// ---- sections ---------------------------------------------------------------

function renderHeader(s) {
  const id = s.node.peer_id;
  $("node-id").textContent = `node …${id.slice(-6)} · up ${seconds(s.node.uptime)}${s.node.indexed ? "" : " · indexing"}`;
  $("node-id").title = `${id}\n${s.node.addrs.join("\n")}\n${s.node.data_dir}`;
  $("t-down").textContent = rate(s.totals.down_rate);
  $("t-up").textContent = rate(s.totals.up_rate);
  $("t-peers").textContent = s.totals.peers;
  $("t-models").textContent = s.totals.models;
  $("t-banned").textContent = s.totals.banned;
}

function renderTransfers(s) {
  drawRateGraph(s.history);
  const body = $("transfers").tBodies[0];
  body.replaceChildren();
  for (const t of s.transfers) {
    const tr = el("tr");
    tr.dataset.cid = t.cid;
    const name = el("td");
    name.append(el("div", t.name), el("div", shortCid(t.cid), "mono dim small"));
    name.title = t.cid;
    const progress = el("td");
    const bar = el("div", null, "bar");
    const fill = el("div", null, "fill");
    const pct = t.total ? (100 * t.done) / t.total : 0;
    fill.style.width = `${pct.toFixed(1)}%`;
    bar.append(fill);
    progress.append(bar, el("div", `${bytes(t.done)} / ${bytes(t.total)} (${pct.toFixed(0)}%)`, "small dim"));
    const spark = el("td");
    const canvas = el("canvas", null, "spark");
    spark.append(canvas);
    tr.append(name, progress, el("td", rate(t.rate), "num"), el("td", seconds(t.eta), "num"), el("td", t.peers, "num"), spark);
    body.append(tr);
    drawSparkline(canvas, s.history[t.cid] || []);
  }
  $("no-transfers").hidden = s.transfers.length > 0;
}

function renderModels(s) {
  const box = $("models");
  box.replaceChildren();
  for (const m of s.models) {
    const card = el("div", null, "model");
    card.dataset.cid = m.cid;
    const head = el("div", null, "model-head");
    const title = el("div");
    title.append(el("span", m.name, "name"), el("span", m.complete ? "complete" : m.holding, m.complete ? "badge ok" : "badge"));
    const cid = el("div", m.cid, "mono small cid");
    const facts = el("div", null, "facts");
    const held = el("span", `${m.held}`, "held");
    const of = el("span", ` / ${m.fragments} fragments verified`);
    const missing = el("span", `${m.missing} missing`, m.missing ? "missing warn" : "missing dim");
    facts.append(held, of, el("span", " · "), missing, el("span", ` · ${bytes(m.held_bytes)} of ${bytes(m.bytes)}`));
    if (m.blocks !== null) facts.append(el("span", ` · blocks ${m.blocks_verified}/${m.blocks} · ${m.sessions} session(s)`));
    if (!m.header) facts.append(el("span", " · header missing", "warn"));
    const remove = el("button", "Remove", "danger");
    remove.disabled = !token;
    remove.addEventListener("click", () => {
      if (confirm(`Delete ${m.name} (${m.cid}) and its folder from this node's data dir?`)) act("/api/remove", m.cid);
    });
    head.append(title, remove);
    const canvas = el("canvas", null, "map");
    card.append(head, cid, facts, canvas);
    if (m.map.per_cell > 1) card.append(el("div", `one cell = ${m.map.per_cell} fragments`, "small dim"));
    box.append(card);
    drawMap(canvas, m.map);
    canvas.addEventListener("mousemove", (e) => mapTitle(canvas, m.map, e));
  }
  if (!s.models.length) box.append(el("p", "No model held yet.", "dim"));
  if (s.totals.models > s.models.length) box.append(el("p", `and ${s.totals.models - s.models.length} more`, "dim"));
  const pulls = s.pulls.filter((p) => p.state !== "running" || !s.transfers.some((t) => t.cid === p.cid));
  for (const p of pulls) box.append(el("p", `pull ${shortCid(p.cid)}: ${p.state}${p.text ? ` — ${p.text}` : ""}`, p.state === "failed" ? "warn" : "dim"));
}

function renderPeers(s) {
  const body = $("peers").tBodies[0];
  body.replaceChildren();
  for (const p of s.peers) {
    const tr = el("tr");
    tr.dataset.peer = p.id;
    const id = el("td", `…${p.short}`, "mono");
    id.title = p.id;
    tr.append(id, el("td", rate(p.down_rate), "num"), el("td", rate(p.up_rate), "num"), el("td", bytes(p.received), "num"),
      el("td", bytes(p.sent), "num"), el("td", p.models, "num"), el("td", p.unchoked ? "yes" : "–"));
    body.append(tr);
  }
  $("no-peers").hidden = s.peers.length > 0;
}

function renderEvents(s) {
  const list = $("events");
  list.replaceChildren();
  for (const e of s.events) {
    const li = el("li", null, `event ${e.kind}`);
    li.append(el("span", new Date(e.time * 1000).toLocaleTimeString(), "dim mono"), el("span", e.kind.replace("_", " "), "kind"));
    if (e.peer) { const p = el("span", `…${e.peer.slice(-6)}`, "mono"); p.title = e.peer; li.append(p); }
    li.append(el("span", e.text));
    list.append(li);
  }
  $("no-events").hidden = s.events.length > 0;
  const bans = $("bans");
  bans.replaceChildren();
  for (const b of s.bans) {
    const li = el("li");
    const p = el("span", `…${b.peer.slice(-6)}`, "mono");
    p.title = b.peer;
    li.append(p, el("span", b.reason));
    bans.append(li);
  }
  $("no-bans").hidden = s.bans.length > 0;
}

function render(s) {
  last = s;
  renderHeader(s);
  renderTransfers(s);
  renderModels(s);
  renderPeers(s);
  renderEvents(s);
  document.body.dataset.updated = String(s.node.time);
}

// ---- actions ----------------------------------------------------------------

async function act(path, cid) {
  const status = $("action-status");
  status.textContent = "…";
  try {
    const response = await fetch(path, {
      method: "POST",
      headers: { "Authorization": `Bearer ${token}`, "Content-Type": "application/json" },
      body: JSON.stringify({ cid }),
    });
    const doc = await response.json().catch(() => ({}));
    status.textContent = response.ok ? (path.endsWith("pull") ? `pulling ${shortCid(cid)}` : `removed ${shortCid(cid)}`) : `error: ${doc.error || response.status}`;
  } catch (err) {
    status.textContent = `error: ${err}`;
  }
}

// ---- updates ----------------------------------------------------------------

function live(on, text) {
  const badge = $("live");
  badge.className = on ? "live on" : "live off";
  badge.textContent = text;
}

let polling = null;

function poll() {
  if (polling) return;
  polling = setInterval(async () => {
    try {
      const response = await fetch("/api/state", { cache: "no-store" });
      if (response.ok) { render(await response.json()); live(true, "live (polling)"); }
    } catch (err) {
      live(false, "disconnected");
    }
  }, 1000);
}

function connect() {
  if (!window.EventSource) { poll(); return; }
  const source = new EventSource("/api/events");
  source.onmessage = (message) => { live(true, "live"); render(JSON.parse(message.data)); };
  source.onerror = () => {
    live(false, "reconnecting…");
    if (source.readyState === EventSource.CLOSED) { poll(); }  // refused (too many pages): poll instead
  };
}

document.addEventListener("DOMContentLoaded", () => {
  takeToken();
  $("pull-form").querySelector("button").disabled = !token;
  $("pull-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const cid = $("pull-cid").value.trim();
    if (cid) act("/api/pull", cid);
  });
  window.addEventListener("resize", () => { if (last) render(last); });
  connect();
});
