// The Parallel Pilot dashboard: one page, live over a WebSocket (gateway/server/_dash_feed.py).
// Every text that comes from the gateway is put in the DOM as text (textContent, text nodes):
// never as markup. No innerHTML anywhere in this file.
"use strict";

const FINISHED = new Set(["done", "failed", "cancelled"]);
const TEXT_TAIL = 8000;
// The jobs list shows the latest JOBS_PAGE jobs, and as many more per click. A busy gateway
// replaces the whole list every batch; laying out 150 rows four times a second cost a headless
// Chromium page 60-80 ms a batch, 30 rows 7-11 ms (bench/dashboard.py, docs/dashboard.md).
const JOBS_PAGE = 25;

const S = {
  who: null, csrf: "", ws: null, live: false, retry: 500,
  workers: new Map(), jobs: new Map(), gateway: {},
  rates: [],            // recent task rates, for the sparkline
  detail: null,         // the job the page looks at: {id, frames: Map, metrics, text, failed, restarts}
  jobsShown: JOBS_PAGE, // rows of the jobs list shown (JOBS_PAGE more per "Show more")
  drawing: false,       // a render is asked for the next frame
  after: [],            // what the render does once its DOM is in place (canvases, scrolling)
};

// -- DOM helpers ------------------------------------------------------------------------------

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(props || {})) {
    if (k === "data") { for (const [dk, dv] of Object.entries(v)) node.dataset[dk] = dv; }
    else if (k === "on") { for (const [ev, fn] of Object.entries(v)) node.addEventListener(ev, fn); }
    else node[k] = v;
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}
function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); return node; }

// Make `parent`'s children look like `fresh` (new nodes), touching only what differs: an
// element whose tag and attributes are the same is kept and its children patched in turn, a
// text that is the same is left alone. A page that did not change is not laid out or painted
// again, and a busy one only where it changed. So an element's listeners must depend only on
// its attributes (a row's click reads its job from data-job, not from anything else), because
// a kept element keeps its own listeners. Canvases are always the new ones (their pixels are
// not attributes), and a node marked `kept` (a frame's figure, made once) is moved into place
// before the nodes that follow it, never emptied into another. An element marked
// `childrenAfter` is built empty and filled after the patch (S.after): its children are
// nodes that live in the document, which a view built apart cannot hold.
function patch(parent, fresh) {
  for (let i = 0; i < fresh.length; i++) {
    const cur = parent.childNodes[i], node = fresh[i];
    if (cur === node) continue;
    if (!cur) parent.append(node);
    else if (node.nodeType === Node.TEXT_NODE && cur.nodeType === Node.TEXT_NODE) {
      if (cur.data !== node.data) cur.data = node.data;
    } else if (node.kept) parent.insertBefore(node, cur);
    else if (sameShell(cur, node)) { if (!node.childrenAfter) patch(cur, [...node.childNodes]); }
    else parent.replaceChild(node, cur);
  }
  while (parent.childNodes.length > fresh.length) parent.lastChild.remove();
}
function sameShell(a, b) {
  if (a.nodeType !== Node.ELEMENT_NODE || a.nodeName !== b.nodeName || a.nodeName === "CANVAS") return false;
  if (a.kept || a.attributes.length !== b.attributes.length) return false;  // (patch moves b.kept)
  for (const at of b.attributes) if (a.getAttribute(at.name) !== at.value) return false;
  return true;
}
const $ = (id) => document.getElementById(id);

function fmtBytes(n) {
  if (!(n > 0)) return "0 B";
  const u = ["B", "KB", "MB", "GB", "TB"]; let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return `${n.toFixed(n >= 100 || i === 0 ? 0 : 1)} ${u[i]}`;
}
function fmtDur(s) {
  if (!(s >= 0) || !isFinite(s)) return "—";
  if (s < 1) return `${Math.round(s * 1000)} ms`;
  if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
  if (s < 5400) return `${Math.round(s / 60)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}
function ago(t) { return t > 0 ? fmtDur(Math.max(0, now() - t)) + " ago" : "—"; }
function now() { return Date.now() / 1000; }
function clock(t) { return t > 0 ? new Date(t * 1000).toLocaleTimeString() : "—"; }
function badge(text) { return el("span", { className: `badge ${text}` }, text); }

function eta(j) {
  if (FINISHED.has(j.state)) return "";
  const settled = j.done + j.failed;
  if (!settled) return "—";
  const rate = settled / Math.max(1e-3, now() - j.created);
  return fmtDur((j.n - settled) / rate);
}
function progress(j) {
  const bar = el("span", { className: "bar" });
  const n = Math.max(1, j.n);
  bar.append(el("i", { style: `width:${(100 * j.done) / n}%` }));
  bar.append(el("b", { style: `left:${(100 * j.done) / n}%;width:${(100 * j.failed) / n}%` }));
  return el("span", {}, bar, `${j.done}/${j.n}`, j.failed ? ` (${j.failed} failed)` : "");
}

// -- the feed -----------------------------------------------------------------------------------

async function start() {
  const r = await fetch("/api/session", { credentials: "same-origin" });
  if (r.status !== 200) { loggedOut(); return; }
  const s = await r.json();
  S.who = { name: s.user, admin: s.admin };
  S.csrf = s.csrf;
  $("who").textContent = `${s.user}${s.admin ? " (admin)" : ""}`;
  connect();
  window.addEventListener("hashchange", route);
  route();
  setInterval(tick, 1000);
}

function loggedOut() {
  const main = clear($("main"));
  main.append(el("h1", {}, "Log in"),
    el("p", {}, "Run ", el("code", {}, "pilot dashboard"), " (or ", el("code", {}, "%pilot dashboard"),
      " in a notebook) and open the link it prints. Each link logs in once."));
  setLive(false, "logged out");
}

function setLive(on, text) {
  S.live = on;
  const n = $("live");
  n.className = on ? "live" : "live off";
  n.textContent = text;
}

function connect() {
  const ws = new WebSocket(`${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/api/feed`);
  S.ws = ws;
  ws.onopen = () => { S.retry = 500; setLive(true, "live"); watch(); };
  ws.onmessage = (m) => receive(JSON.parse(m.data));
  ws.onclose = async () => {
    setLive(false, "reconnecting…");
    S.ws = null;
    const r = await fetch("/api/session", { credentials: "same-origin" }).catch(() => null);
    if (r && r.status === 401) { loggedOut(); return; }
    setTimeout(connect, S.retry);
    S.retry = Math.min(S.retry * 2, 8000);
  };
}

function watch() {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) {
    S.ws.send(JSON.stringify({ watch: S.detail ? S.detail.id : null }));
  }
}

function receive(m) {
  if (m.t === "snap") {
    S.workers = new Map(m.workers.map((w) => [w.name, w]));
    S.jobs = new Map(m.jobs.map((j) => [j.id, j]));
    S.gateway = m.gateway;
  } else if (m.t === "delta") {
    for (const [k, v] of Object.entries(m.workers || {})) v ? S.workers.set(k, v) : S.workers.delete(k);
    for (const [k, v] of Object.entries(m.jobs || {})) v ? S.jobs.set(k, v) : S.jobs.delete(k);
    S.gateway = m.gateway || S.gateway;
    if (S.detail) for (const e of m.events || []) event(e);
  } else if (m.t === "detail") {
    if (!S.detail || S.detail.id !== m.job) return;
    S.detail.frames.clear(); S.detail.metrics = []; S.detail.text = []; S.detail.restarts = [];
    for (const e of m.events) event(e);
    S.detail.failed = m.failed;
    S.detail.loaded = true;
  }
  S.rates.push(S.gateway.rate || 0);
  if (S.rates.length > 240) S.rates.shift();
  render();
}

function event(e) {
  const d = S.detail;
  if (!d || e.job !== d.id) return;
  if (e.k === "f") {  // one figure per frame, made once: a re-render moves it, never re-decodes
    e.node = el("figure", { data: { frame: e.frame }, kept: true },
      e.thumb ? el("img", { src: `data:image/png;base64,${e.thumb}`, alt: `frame ${e.frame}` }) : el("div", { className: "muted" }, "(no preview)"),
      el("figcaption", {}, `frame ${e.frame}`));
    d.frames.set(e.frame, e);
  }
  else if (e.k === "m") {
    d.metrics.push(e);
    if (d.pendingRestart !== undefined) { d.restarts.push(xOf(e, d.metrics.length - 1)); d.pendingRestart = undefined; }
  } else if (e.k === "o") {
    if (e.restart !== undefined) d.pendingRestart = e.restart;
    d.text.push(e);
    d.lines = (d.lines || 0) + 1;
    let size = d.text.reduce((a, t) => a + t.text.length, 0);
    while (size > TEXT_TAIL && d.text.length > 1) size -= d.text.shift().text.length;
  } else if (e.k === "x") d.failed = e.failed;
}

function tick() { if (S.live) render(); }

// -- routing and pages ----------------------------------------------------------------------

function route() {
  const h = location.hash.replace(/^#\/?/, "") || "jobs";
  const [view, ...rest] = h.split("/");
  const id = rest.length ? decodeURIComponent(rest.join("/")) : null;
  S.view = view;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("on", a.dataset.view === view);
  const want = view === "jobs" && id ? id : null;
  if ((S.detail ? S.detail.id : null) !== want) {
    S.detail = want ? { id: want, frames: new Map(), metrics: [], text: [], failed: [], restarts: [], loaded: false } : null;
    watch();
  }
  render();
}

// Every change asks for a render; the page renders once in the next frame whatever the number
// of messages before it, and not at all while it is hidden (a background tab gets no frames).
function render() {
  if (S.drawing) return;
  S.drawing = true;
  requestAnimationFrame(() => { S.drawing = false; renderNow(); });
}

function renderNow() {
  if (!S.who) return;
  const main = $("main");
  const keep = main.querySelector("select");
  const chosen = keep ? keep.value : null;
  const page = document.createElement("main");  // built apart, then patched in
  S.after = [];
  if (S.view === "pool") pool(page);
  else if (S.view === "gateway") gatewayPage(page);
  else if (S.detail) jobPage(page, chosen);
  else jobsPage(page);
  patch(main, [...page.childNodes]);
  for (const f of S.after) f();
}

function table(head, rows) {
  return el("table", {}, el("thead", {}, el("tr", {}, head.map((h) => el("th", {}, h)))),
    el("tbody", {}, rows));
}

function cancelButton(j) {
  if (!j.mine || FINISHED.has(j.state)) return "";
  return el("button", {
    className: "danger", data: { cancel: j.id },
    on: { click: (ev) => { ev.stopPropagation(); cancel(ev.currentTarget.dataset.cancel); } },
  }, "Cancel");
}

async function cancel(id) {
  if (!confirm(`Cancel job ${id}?`)) return;
  const r = await fetch(`/api/jobs/${encodeURIComponent(id)}/cancel`, {
    method: "POST", credentials: "same-origin", headers: { "X-Pilot-CSRF": S.csrf },
  });
  if (r.status !== 200) alert(`Could not cancel: ${(await r.json()).error}`);
}

function jobsPage(main) {
  const all = [...S.jobs.values()].sort((a, b) => b.created - a.created);
  const jobs = all.slice(0, S.jobsShown);
  main.append(el("h1", {}, "Jobs"));
  if (!jobs.length) { main.append(el("div", { className: "empty" }, "No jobs yet.")); return; }
  main.append(table(["job", "name", "owner", "kind", "state", "progress", "ETA", "submitted", ""],
    jobs.map((j) => el("tr", {
      className: "link", data: { job: j.id },
      on: { click: (ev) => { location.hash = `#/jobs/${encodeURIComponent(ev.currentTarget.dataset.job)}`; } },
    },
    el("td", { className: "muted" }, j.id), el("td", { className: "name" }, j.name), el("td", {}, j.owner),
    el("td", {}, j.kind), el("td", {}, badge(j.state)), el("td", {}, progress(j)),
    el("td", {}, eta(j)), el("td", { className: "muted" }, clock(j.created)), el("td", {}, cancelButton(j))))));
  const rest = all.length - jobs.length;
  if (rest > 0) {
    main.append(el("p", { className: "more" },
      el("button", { id: "more", on: { click: () => { S.jobsShown += JOBS_PAGE; render(); } } },
        `Show ${Math.min(JOBS_PAGE, rest)} more`),
      el("span", { className: "muted" }, ` ${rest} more of the latest ${all.length}; older jobs: pilot jobs`)));
  }
}

function jobPage(main, chosenMetric) {
  const d = S.detail;
  const j = S.jobs.get(d.id);
  main.append(el("p", {}, el("a", { href: "#/jobs" }, "← all jobs")));
  if (!j) { main.append(el("div", { className: "empty" }, `Job ${d.id}: not in the recent jobs you may see.`)); return; }
  main.append(el("h1", {}, el("span", { className: "name" }, j.name), " ", badge(j.state), " ", cancelButton(j)));
  main.append(el("div", { className: "meta" },
    el("span", {}, "job ", el("b", {}, j.id)), el("span", {}, "owner ", el("b", {}, j.owner)),
    el("span", {}, "kind ", el("b", {}, j.kind)), el("span", {}, progress(j)),
    el("span", {}, "ETA ", el("b", {}, eta(j) || "—")),
    el("span", {}, "running ", el("b", {}, j.running), " · queued ", el("b", {}, j.queued)),
    el("span", {}, "submitted ", el("b", {}, clock(j.created)))));
  if (j.error) main.append(el("pre", { className: "job-error" }, j.error));
  if (d.frames.size || j.kind === "render") gallery(main, d);
  if (d.metrics.length || j.kind === "ddp") chart(main, d, chosenMetric);
  if (d.failed.length) {
    main.append(el("h2", {}, `Failed tasks (${j.failed})`));
    for (const f of d.failed) {
      main.append(el("div", { className: "failed-item" },
        el("div", { className: "head" }, `task ${f.task}${f.item >= 0 ? `, item ${f.item}` : ""}${f.worker ? ` on ${f.worker}` : ""}`),
        el("pre", { className: "traceback" }, f.error)));
    }
  }
  main.append(el("h2", {}, "Output (tail)"));
  if (!d.text.length) { main.append(el("div", { className: "empty" }, d.loaded ? "No output." : "Loading…")); return; }
  main.append(el("pre", { id: "output" }, d.text.map((t) => el("span", { className: t.err ? "err" : "" }, t.text))));
  S.after.push(() => {  // the tail: the latest lines in view when lines came (else leave the reader be)
    if (d.scrolled === d.lines) return;
    const out = $("output");
    out.scrollTop = out.scrollHeight;
    d.scrolled = d.lines;
  });
}

function gallery(main, d) {
  const frames = [...d.frames.values()].sort((a, b) => a.frame - b.frame);
  const j = S.jobs.get(d.id);
  const video = j && FINISHED.has(j.state) && frames.some((f) => f.stored)
    ? el("a", { id: "video", href: `/api/jobs/${encodeURIComponent(d.id)}/video.mp4`, target: "_blank" }, "video (MP4)")
    : "";
  main.append(el("h2", {}, `Frames (${frames.length}) `, video));
  if (!frames.length) { main.append(el("div", { className: "empty" }, "No frame yet.")); return; }
  main.append(el("div", { className: "gallery", id: "gallery", childrenAfter: true }));
  S.after.push(() => patch($("gallery"), frames.map((f) => f.node)));  // new frames only
}

function xOf(m, i) { return typeof m.values.step === "number" ? m.values.step : i; }

function chart(main, d, chosen) {
  const names = [...new Set(d.metrics.flatMap((m) => Object.keys(m.values)))].filter((k) => k !== "step" && k !== "rank");
  const metric = names.includes(chosen) ? chosen : (names.includes("loss") ? "loss" : names[0]);
  const select = el("select", { id: "metric", on: { change: () => render() } }, names.map((n) => el("option", { value: n, selected: n === metric }, n)));
  main.append(el("h2", {}, "Training ", select, " ", el("span", { id: "points", className: "muted" }, `${d.metrics.length} points`),
    d.restarts.length ? el("span", { className: "muted" }, ` · ${d.restarts.length} restart(s), dashed`) : ""));
  const canvas = el("canvas", { id: "curve" });
  main.append(el("div", { className: "chart" }, canvas, el("div", { className: "legend", id: "legend" })));
  if (!metric) return;
  S.after.push(() => draw(canvas, d, metric));
}

const COLORS = ["#2f6fed", "#e0702b", "#1f9d55", "#9b51e0", "#d64545", "#0aa3a3", "#c98a00", "#555"];

function draw(canvas, d, metric) {
  const dpr = window.devicePixelRatio || 1;
  const W = canvas.clientWidth, H = canvas.clientHeight;
  canvas.width = W * dpr; canvas.height = H * dpr;
  const g = canvas.getContext("2d");
  g.scale(dpr, dpr);
  const series = new Map();
  d.metrics.forEach((m, i) => {
    const v = m.values[metric];
    if (typeof v !== "number") return;
    const rank = typeof m.values.rank === "number" ? m.values.rank : m.task;
    if (!series.has(rank)) series.set(rank, []);
    series.get(rank).push([xOf(m, i), v]);
  });
  const pts = [...series.values()].flat();
  if (!pts.length) return;
  const L = 56, R = 12, T = 10, B = 26;
  let [x0, x1] = [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...pts.map((p) => p[1])), Math.max(...pts.map((p) => p[1]))];
  if (x1 === x0) x1 = x0 + 1; if (y1 === y0) { y1 += 1; y0 -= 1; }
  const X = (x) => L + ((x - x0) / (x1 - x0)) * (W - L - R);
  const Y = (y) => T + (1 - (y - y0) / (y1 - y0)) * (H - T - B);
  g.strokeStyle = "#e3e6ee"; g.fillStyle = "#6b7385"; g.font = "11px system-ui"; g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    g.beginPath(); g.moveTo(L, Y(y)); g.lineTo(W - R, Y(y)); g.stroke();
    g.fillText(Number(y.toPrecision(3)).toString(), 4, Y(y) + 4);
  }
  g.fillText(`step ${x0}`, L, H - 8); g.fillText(`${x1}`, W - R - 30, H - 8);
  g.setLineDash([5, 4]); g.strokeStyle = "#d64545";
  for (const x of d.restarts) { g.beginPath(); g.moveTo(X(x), T); g.lineTo(X(x), H - B); g.stroke(); }
  g.setLineDash([]);
  const legend = clear($("legend") || el("div"));
  [...series.entries()].forEach(([rank, ps], k) => {
    g.strokeStyle = COLORS[k % COLORS.length]; g.lineWidth = 1.6; g.beginPath();
    ps.forEach(([x, y], i) => (i ? g.lineTo(X(x), Y(y)) : g.moveTo(X(x), Y(y))));
    g.stroke();
    legend.append(el("span", { style: `color:${COLORS[k % COLORS.length]};margin-right:12px` }, `rank ${rank}`));
  });
}

function pool(main) {
  const ws = [...S.workers.values()].sort((a, b) => a.name.localeCompare(b.name));
  main.append(el("h1", {}, `Pool (${ws.filter((w) => !["lost", "left"].includes(w.state)).length} workers)`));
  if (!ws.length) { main.append(el("div", { className: "empty" }, "No worker connected.")); return; }
  main.append(table(["worker", "state", "host", "slots", "GPUs", "tags", "Blender", "Slurm job", "CPU", "memory", "running", "done", "last heard", "round trip"],
    ws.map((w) => el("tr", { data: { worker: w.name } },
      el("td", { className: "name" }, w.name), el("td", {}, badge(w.state)), el("td", {}, w.host || ""),
      el("td", { className: "num" }, w.slots ?? ""),
      el("td", {}, (w.gpus || []).map((g) => g.name).join(", ") || (w.gpus ? "0" : "")),
      el("td", {}, (w.tags || []).join(", ")), el("td", {}, w.blender || ""), el("td", {}, w.slurm || ""),
      el("td", { className: "num" }, w.cpu >= 0 ? `${w.cpu.toFixed(0)}%` : "—"),
      el("td", { className: "num" }, w.mem_used ? `${fmtBytes(w.mem_used)} / ${fmtBytes(w.memory)}` : "—"),
      el("td", { className: "num" }, w.running ?? ""), el("td", { className: "num" }, w.done ?? ""),
      el("td", {}, ago(w.heard)), el("td", { className: "num" }, w.rtt >= 0 ? fmtDur(w.rtt) : "—")))));
}

function card(k, v, extra) { return el("div", { className: "card" }, el("div", { className: "k" }, k), el("div", { className: "v" }, v), extra || ""); }

function gatewayPage(main) {
  const g = S.gateway;
  main.append(el("h1", {}, "Gateway ", el("span", { className: "muted" }, g.id || "")));
  const spark = el("canvas", { id: "spark" });
  main.append(el("div", { className: "cards", id: "figures" },
    card("task rate", `${(g.rate || 0).toFixed(0)}/s`, spark),
    card("queue depth", g.queued ?? 0), card("running tasks", g.running ?? 0),
    card("tasks OK / failed or cancelled", `${g.ok ?? 0} / ${g.failed ?? 0}`),
    card("task latency p50 / p95 (≤, last 3 s)", `${fmtDur(g.latency_p50)} / ${fmtDur(g.latency_p95)}`),
    card("worker round trip (median)", g.rtt >= 0 ? fmtDur(g.rtt) : "—"),
    card("bytes in / out", `${fmtBytes(g.bytes_in)} / ${fmtBytes(g.bytes_out)}`),
    card("refused messages", g.refused ?? 0),
    card("workers / live jobs", `${g.workers ?? 0} / ${g.jobs ?? 0}`),
    card("up", fmtDur(g.uptime))));
  S.after.push(() => {
    const dpr = window.devicePixelRatio || 1, W = spark.clientWidth, H = spark.clientHeight;
    spark.width = W * dpr; spark.height = H * dpr;
    const c = spark.getContext("2d"); c.scale(dpr, dpr);
    const max = Math.max(1, ...S.rates);
    c.strokeStyle = "#2f6fed"; c.beginPath();
    const n = Math.max(2, S.rates.length);
    S.rates.forEach((r, i) => { const x = (i / (n - 1)) * W, y = H - (r / max) * (H - 2) - 1; i ? c.lineTo(x, y) : c.moveTo(x, y); });
    c.stroke();
  });
}

document.addEventListener("DOMContentLoaded", start);
