// captionflow dashboard: read-only, live. The page asks /api/snapshot once (to learn whether a
// token is needed), then listens on the /api/live websocket, which sends the snapshot as JSON
// every second. Every value shown goes through textContent: worker names come from workers.
"use strict";

(() => {
  const TOKEN_KEY = "captionflow.monitorToken";
  const SERIES_MAX = 3600; // local samples when the snapshot carries no history
  const GRAPH = { width: 640, height: 180, left: 44, right: 8, top: 10, bottom: 22, points: 120 };
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  const state = {
    token: sessionStorage.getItem(TOKEN_KEY) || "",
    public: false,
    socket: null,
    retryMs: 1000,
    series: [], // [[unix seconds, items_done]] seen by this page
  };

  // -- formatting -------------------------------------------------------------------------
  const int = (n) => (typeof n === "number" ? Math.round(n).toLocaleString("en-US") : "–");
  const fixed = (n, d = 2) => (typeof n === "number" ? n.toFixed(d) : "–");
  const pct = (n) => (typeof n === "number" ? `${(n * 100).toFixed(0)}%` : "–");
  function duration(s) {
    if (typeof s !== "number" || !isFinite(s) || s < 0) return "–";
    s = Math.round(s);
    const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), sec = s % 60;
    if (h > 0) return `${h}h ${String(m).padStart(2, "0")}m`;
    if (m > 0) return `${m}m ${String(sec).padStart(2, "0")}s`;
    return `${sec}s`;
  }
  const text = (v) => (v === undefined || v === null || v === "" ? "–" : String(v));

  const WORKER_COLUMNS = [
    { key: "name", label: "Name", fmt: text },
    { key: "contributor", label: "Contributor", fmt: text },
    { key: "engine", label: "Engine", fmt: text },
    { key: "model", label: "Model", fmt: text },
    { key: "gpu", label: "GPU", fmt: text },
    { key: "items_per_s", label: "Images/s", fmt: (v) => fixed(v), num: true },
    { key: "items_done", label: "Items done", fmt: int, num: true },
    { key: "engine_busy", label: "Engine busy", fmt: pct, num: true },
    { key: "queued_chunks", label: "Queued chunks", fmt: int, num: true },
    { key: "unacked", label: "Unacked", fmt: int, num: true },
    { key: "current_chunk", label: "Chunk", fmt: text },
    { key: "heartbeat_age_s", label: "Heartbeat", fmt: (v) => (typeof v === "number" ? `${v.toFixed(0)}s ago` : "–"), num: true },
  ];
  const CONTRIBUTOR_COLUMNS = [
    { key: "contributor", label: "Contributor", fmt: text },
    { key: "captions", label: "Captions", fmt: int, num: true },
    { key: "items", label: "Items", fmt: int, num: true },
    { key: "failed", label: "Failed", fmt: int, num: true },
    { key: "share", label: "Share", fmt: (v) => (typeof v === "number" ? `${(v * 100).toFixed(1)}%` : "–"), num: true },
    { key: "trust_level", label: "Trust", fmt: text, num: true },
  ];

  // -- connection -------------------------------------------------------------------------
  function setStatus(kind, words) {
    const badge = $("conn-status");
    badge.dataset.state = kind;
    badge.textContent = words;
  }

  function showLogin(message) {
    $("board").hidden = true;
    $("forget").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    setStatus("locked", "token needed");
    $("token-input").focus();
  }

  function forgetToken() {
    state.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
  }

  function retryLater(fn) {
    setTimeout(fn, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, 10000);
  }

  async function start() {
    const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
    let response;
    try {
      response = await fetch("/api/snapshot", { headers, cache: "no-store" });
    } catch (err) {
      setStatus("offline", "orchestrator unreachable, retrying");
      retryLater(start);
      return;
    }
    if (response.status === 401) {
      const had = Boolean(state.token);
      forgetToken();
      showLogin(had ? "That token was refused." : "");
      return;
    }
    if (!response.ok) {
      setStatus("offline", `orchestrator answered ${response.status}, retrying`);
      retryLater(start);
      return;
    }
    state.public = response.headers.get("X-Captionflow-View") === "public";
    $("view-mode").hidden = !state.public;
    $("forget").hidden = state.public;
    $("login").hidden = true;
    $("board").hidden = false;
    render(await response.json());
    connect();
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const socket = new WebSocket(`${scheme}://${location.host}/api/live`);
    state.socket = socket;
    socket.onopen = () => {
      if (!state.public) socket.send(state.token);
      setStatus("live", "live");
      state.retryMs = 1000;
    };
    socket.onmessage = (event) => render(JSON.parse(event.data));
    socket.onclose = (event) => {
      if (state.socket !== socket) return;
      state.socket = null;
      if (event.code === 4001) {
        forgetToken();
        showLogin("The orchestrator refused this token (wrong or revoked).");
        return;
      }
      setStatus("reconnecting", "disconnected, reconnecting…");
      retryLater(start);
    };
  }

  // -- rendering --------------------------------------------------------------------------
  function setText(id, value) {
    $(id).textContent = value;
  }

  function render(s) {
    const total = s.items_total || 0;
    const done = s.items_done || 0;
    setText("items-done", int(done));
    setText("items-total", int(total));
    setText("items-failed", int(s.items_failed));
    setText("items-captioned", int(s.items_captioned));
    setText("percent", total ? ((100 * done) / total).toFixed(1) : "0.0");
    $("progress-bar").style.width = `${total ? (100 * done) / total : 0}%`;
    setText("rate", fixed(s.rate));
    setText("rate-avg", "rate_avg" in s ? `${fixed(s.rate_avg)}/s` : "–");
    setText("eta", "eta_s" in s ? (done >= total && total ? "done" : duration(s.eta_s)) : "–");
    setText("uptime", duration(s.uptime_s));
    setText("workers", int(s.workers));
    const chunks = s.chunks || {};
    for (const k of ["pending", "leased", "done", "failed"]) setText(`chunks-${k}`, int(chunks[k] || 0));
    setText("model", s.model ? `model ${s.model}` : "");
    const workers = (s.sessions || []).filter((x) => x.role === "worker" || x.role === "dataworker");
    fillTable($("workers-table"), WORKER_COLUMNS, workers);
    $("workers-empty").hidden = workers.length > 0;
    const contributors = Array.isArray(s.contributors) ? s.contributors : null;
    $("contributors-panel").hidden = !contributors;
    if (contributors) fillTable($("contributors-table"), CONTRIBUTOR_COLUMNS, contributors);
    renderActivity(Array.isArray(s.activity) ? s.activity : null);
    const now = Date.now() / 1000;
    state.series.push([now, done]);
    if (state.series.length > SERIES_MAX) state.series.shift();
    // The orchestrator's history (kept for hours, so a late page sees the past) once it has a
    // few buckets; until then this page's own per-second samples.
    const history = Array.isArray(s.history) && s.history.length > 2 ? bucketEnds(s.history, now) : null;
    drawGraph(history || state.series);
    setText("updated", new Date().toLocaleTimeString());
  }

  function fillTable(table, columns, rows) {
    // A column shows when any row has it: the public view and older orchestrators send fewer.
    const shown = columns.filter((c) => rows.some((r) => r[c.key] !== undefined && r[c.key] !== ""));
    const head = document.createElement("tr");
    for (const c of shown) {
      const th = document.createElement("th");
      th.textContent = c.label;
      if (c.num) th.className = "num";
      head.appendChild(th);
    }
    table.tHead.replaceChildren(head);
    const body = rows.map((row) => {
      const tr = document.createElement("tr");
      for (const c of shown) {
        const td = document.createElement("td");
        td.textContent = c.fmt(row[c.key]);
        td.dataset.key = c.key;
        if (c.num) td.className = "num";
        tr.appendChild(td);
      }
      return tr;
    });
    table.tBodies[0].replaceChildren(...body);
  }

  function renderActivity(entries) {
    $("activity-panel").hidden = !entries || entries.length === 0;
    if (!entries) return;
    const items = entries.slice(-15).reverse().map((e) => {
      const li = document.createElement("li");
      const when = typeof e.t === "number" ? new Date(e.t * 1000).toLocaleTimeString() : "";
      li.textContent = `${when} ${text(e.kind)}: ${text(e.text)}`;
      return li;
    });
    $("activity").replaceChildren(...items);
  }

  // History points are [bucket start, items done by the bucket's end]: move each to its end
  // (the newest bucket is still filling: its end is now).
  function bucketEnds(history, now) {
    let bucket = Infinity;
    for (let i = 1; i < history.length; i++) bucket = Math.min(bucket, history[i][0] - history[i - 1][0]);
    if (!(bucket > 0 && isFinite(bucket))) return null;
    return history.map(([t, done]) => [Math.min(t + bucket, Math.max(now, t)), done]);
  }

  // Items per second over time, from cumulative [time, items_done] points: resample the
  // cumulative count at even times, then difference it. Each rate covers [from, to].
  function ratesOf(points) {
    if (points.length < 2) return [];
    const t0 = points[0][0], t1 = points[points.length - 1][0];
    if (!(t1 > t0)) return [];
    if (points.length - 1 <= GRAPH.points) {
      // Few enough: one step per interval as recorded.
      const out = [];
      for (let i = 1; i < points.length; i++) {
        const [ta, va] = points[i - 1], [tb, vb] = points[i];
        if (tb > ta) out.push([ta, tb, Math.max(0, (vb - va) / (tb - ta))]);
      }
      return out;
    }
    const n = GRAPH.points;
    const step = (t1 - t0) / n;
    let j = 0;
    const at = (t) => {
      while (j < points.length - 2 && points[j + 1][0] < t) j++;
      const [ta, va] = points[j], [tb, vb] = points[j + 1];
      return tb > ta ? va + ((vb - va) * Math.min(Math.max(t - ta, 0), tb - ta)) / (tb - ta) : vb;
    };
    const out = [];
    let prev = at(t0);
    for (let i = 1; i <= n; i++) {
      const t = t0 + i * step;
      const v = at(t);
      out.push([t - step, t, Math.max(0, (v - prev) / step)]);
      prev = v;
    }
    return out;
  }

  function svg(tag, attrs, words) {
    const el = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
    if (words !== undefined) el.textContent = words;
    return el;
  }

  function drawGraph(points) {
    const rates = ratesOf(points);
    const graph = $("graph");
    // Drawn at the element's own width so that labels keep their size.
    const g = { ...GRAPH, width: Math.max(320, Math.round(graph.clientWidth) || GRAPH.width) };
    graph.setAttribute("viewBox", `0 0 ${g.width} ${g.height}`);
    const w = g.width - g.left - g.right, h = g.height - g.top - g.bottom;
    const top = Math.max(1, ...rates.map((r) => r[2])) * 1.1;
    const parts = [
      svg("line", { class: "grid", x1: g.left, y1: g.top + h, x2: g.left + w, y2: g.top + h }),
      svg("line", { class: "grid", x1: g.left, y1: g.top, x2: g.left + w, y2: g.top }),
      svg("text", { x: g.left - 6, y: g.top + 10, "text-anchor": "end" }, top.toFixed(1)),
      svg("text", { x: g.left - 6, y: g.top + h, "text-anchor": "end" }, "0"),
    ];
    if (rates.length > 0) {
      const t0 = points[0][0], span = points[points.length - 1][0] - t0;
      const x = (t) => g.left + (w * (t - t0)) / span;
      const y = (r) => g.top + h - (h * r) / top;
      // A step per interval: even a single interval shows as a line.
      const line = rates.flatMap(([from, to, r]) => [
        `${x(from).toFixed(1)},${y(r).toFixed(1)}`,
        `${x(to).toFixed(1)},${y(r).toFixed(1)}`,
      ]);
      const first = `${x(rates[0][0]).toFixed(1)},${(g.top + h).toFixed(1)}`;
      const last = `${x(rates[rates.length - 1][1]).toFixed(1)},${(g.top + h).toFixed(1)}`;
      parts.push(svg("polygon", { class: "area", points: [first, ...line, last].join(" ") }));
      parts.push(svg("polyline", { class: "line", points: line.join(" ") }));
      parts.push(svg("text", { x: g.left, y: g.height - 4 }, `−${duration(span)}`));
      parts.push(svg("text", { x: g.left + w, y: g.height - 4, "text-anchor": "end" }, "now"));
      setText("graph-caption", `items/s, last ${duration(span)}`);
    } else {
      parts.push(svg("text", { x: g.left + w / 2, y: g.top + h / 2, "text-anchor": "middle" }, "waiting for data…"));
    }
    graph.replaceChildren(...parts);
  }

  // -- wiring -----------------------------------------------------------------------------
  document.addEventListener("DOMContentLoaded", () => {
    $("login-form").addEventListener("submit", (event) => {
      event.preventDefault();
      state.token = $("token-input").value.trim();
      $("token-input").value = "";
      sessionStorage.setItem(TOKEN_KEY, state.token);
      start();
    });
    $("forget").addEventListener("click", () => {
      forgetToken();
      const socket = state.socket;
      state.socket = null;
      if (socket) socket.close();
      showLogin("");
    });
    start();
  });
})();
