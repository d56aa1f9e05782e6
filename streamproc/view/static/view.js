// streamproc view: tiles, timelines, dead letters and worker health, kept live over
// Server-Sent Events. Plain JS, no libraries. The page stays light with many streams:
// at most MAX_TILES tiles exist in the DOM (the filter finds the others), a tile is
// redrawn only when its data changed or time moved, frames load only for tiles on screen
// and one at a time per tile, and every per-stream list is trimmed to the history.
"use strict";
(() => {
  const MAX_TILES = 48;
  const MAX_MARKS = 200;
  const DL_ROWS = 50;
  const TIME_REDRAW_MS = 1000;
  const BAND_H = 34;  // CSS pixels of the label band; the masked rows sit under it
  const MODALITIES = ["video", "audio", "text"];

  const $ = (id) => document.getElementById(id);
  const grid = $("grid");
  const template = $("tile-template");

  const view = {
    streams: new Map(),  // id -> stream (see newStream)
    labels: [],
    config: { history_s: 120, prefix: "" },
    offsetMs: 0,  // server clock minus this browser's
    filter: "",
    shown: [],
    renderQueued: false,
    newestEndMs: 0,
  };

  // --- data ---------------------------------------------------------------------------

  function newStream(id) {
    return {
      id, tile: null, windows: new Map(), sorted: null, marks: [], el: null,
      dirtyTile: true, dirtyTimeline: true, visible: false,
      loading: false, loadedV: 0,
    };
  }

  function stream(id) {
    let s = view.streams.get(id);
    if (!s) {
      s = newStream(id);
      view.streams.set(id, s);
    }
    return s;
  }

  function addWindows(s, rows) {
    for (const w of rows) {
      s.windows.set(w[0], w);
      if (w[1] > view.newestEndMs) view.newestEndMs = w[1];
    }
    // keep only what the timeline can show
    const newest = Math.max(...s.windows.keys());
    const floor = newest - view.config.history_s * 1000;
    if (s.windows.size > 32) {
      for (const k of s.windows.keys()) if (k < floor) s.windows.delete(k);
    }
    s.sorted = null;
    s.dirtyTimeline = true;
  }

  function addMarks(s, marks) {
    s.marks.push(...marks);
    if (s.marks.length > MAX_MARKS) s.marks.splice(0, s.marks.length - MAX_MARKS);
    s.dirtyTimeline = true;
  }

  function applyStreamPart(id, part) {
    const s = stream(id);
    if (part.tile) { s.tile = part.tile; s.dirtyTile = true; }
    if (part.windows && part.windows.length) addWindows(s, part.windows);
    if (part.marks && part.marks.length) addMarks(s, part.marks);
  }

  function applyCommon(msg) {
    view.offsetMs = msg.now_ms - Date.now();
    if (msg.labels) { view.labels = msg.labels; renderLegend(); markAllTimelines(); }
    if (msg.deadletters) renderDeadLetters(msg.deadletters);
    if (msg.health) renderHealth(msg.health);
  }

  function applySnapshot(msg) {
    for (const s of view.streams.values()) if (s.el) { observer.unobserve(s.el); s.el.remove(); }
    view.streams.clear();
    view.newestEndMs = 0;
    view.config = msg.config;
    $("prefix").textContent = msg.config.prefix ? msg.config.prefix + ".*" : "";
    for (const [id, part] of Object.entries(msg.streams)) applyStreamPart(id, part);
    applyCommon(msg);
    layout();
  }

  function applyDelta(msg) {
    let added = false;
    for (const id of msg.removed || []) {
      const s = view.streams.get(id);
      if (s && s.el) { observer.unobserve(s.el); s.el.remove(); }
      view.streams.delete(id);
      added = true;
    }
    for (const [id, part] of Object.entries(msg.streams || {})) {
      if (!view.streams.has(id)) added = true;
      applyStreamPart(id, part);
    }
    applyCommon(msg);
    if (added) layout(); else scheduleRender();
  }

  // --- layout: which streams have a tile ------------------------------------------------

  const collator = new Intl.Collator(undefined, { numeric: true });

  function layout() {
    const ids = [...view.streams.keys()].filter((id) => id.toLowerCase().includes(view.filter));
    ids.sort(collator.compare);
    const shown = ids.slice(0, MAX_TILES);
    const keep = new Set(shown);
    for (const id of view.shown) {
      const s = view.streams.get(id);
      if (s && s.el && !keep.has(id)) { observer.unobserve(s.el); s.el.remove(); s.el = null; }
    }
    shown.forEach((id, i) => {
      const s = view.streams.get(id);
      if (!s.el) makeTile(s);
      if (grid.children[i] !== s.el) grid.insertBefore(s.el, grid.children[i] || null);
    });
    view.shown = shown;
    const more = ids.length - shown.length;
    $("more").hidden = more <= 0;
    $("more").textContent = `${more} more stream(s) match: narrow the filter to see them`;
    $("empty").hidden = view.streams.size > 0;
    const n = view.streams.size;
    $("count").textContent = `${n} stream${n === 1 ? "" : "s"}` +
      (ids.length !== n ? `, ${ids.length} shown by the filter` : "");
    scheduleRender();
  }

  function makeTile(s) {
    const el = template.content.firstElementChild.cloneNode(true);
    el.dataset.stream = s.id;
    el.querySelector(".sid").textContent = s.id;
    el.querySelector(".sid").title = s.id;
    const img = el.querySelector(".frame");
    img.addEventListener("load", () => frameSettled(s, true));
    img.addEventListener("error", () => frameSettled(s, false));
    s.el = el;
    s.dirtyTile = s.dirtyTimeline = true;
    s.loading = false;
    s.loadedV = 0;
    observer.observe(el);
  }

  const observer = new IntersectionObserver((entries) => {
    for (const e of entries) {
      const s = view.streams.get(e.target.dataset.stream);
      if (!s) continue;
      s.visible = e.isIntersecting;
      if (s.visible) { s.dirtyTimeline = true; s.dirtyTile = true; }
    }
    scheduleRender();
  });

  // --- rendering ------------------------------------------------------------------------

  function scheduleRender() {
    if (view.renderQueued) return;
    view.renderQueued = true;
    requestAnimationFrame(render);
  }

  function render() {
    view.renderQueued = false;
    for (const id of view.shown) {
      const s = view.streams.get(id);
      if (!s || !s.el) continue;
      if (s.dirtyTile) { renderTile(s); s.dirtyTile = false; }
      if (s.dirtyTimeline && s.visible) { drawTimeline(s); s.dirtyTimeline = false; }
    }
  }

  function markAllTimelines() {
    for (const s of view.streams.values()) s.dirtyTimeline = true;
    scheduleRender();
  }

  function clock(ms) {
    return new Date(ms).toISOString().slice(11, 23);
  }

  function duration(ms) {
    if (ms === null || ms === undefined) return "";
    return ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(1)} s`;
  }

  function renderTile(s) {
    const t = s.tile;
    const el = s.el;
    el.dataset.windows = String(s.windows.size);
    el.dataset.marks = String(s.marks.length);
    if (!t) return;
    const label = t.label === null ? "–" : (t.label || "(no label)");
    el.querySelector(".label").textContent = label;
    el.querySelector(".label").style.color = t.label ? color(t.label, 1) : "";
    el.querySelector(".score").textContent = t.score === null ? "" : t.score.toFixed(2);
    const tag = el.querySelector(".tag");
    tag.textContent = t.tag || "";
    tag.dataset.final = t.final ? "1" : "0";
    el.querySelector(".latency").textContent = duration(t.latency_ms);
    el.querySelector(".window").textContent = t.start_ms === null ? "" : clock(t.start_ms);
    el.dataset.label = t.label === null ? "" : t.label;
    el.dataset.tag = t.tag || "";
    el.dataset.windowStart = t.start_ms === null ? "" : String(t.start_ms);
    el.dataset.dead = String(t.dead);
    for (const b of el.querySelectorAll(".badge")) {
      const st = t.badges[b.dataset.m] || "absent";
      b.dataset.state = st;
      b.title = `${b.dataset.m}: ${st}`;
    }
    el.querySelector(".dead").textContent = t.dead ? `${t.dead} dead letter${t.dead === 1 ? "" : "s"}` : "";
    el.querySelector(".words").textContent = t.words;
    if (t.frame && t.frame.v !== s.loadedV) requestFrame(s);
  }

  function requestFrame(s) {
    if (!s.visible || s.loading || !s.el || !s.tile || !s.tile.frame) return;
    s.loading = true;
    s.requestedV = s.tile.frame.v;
    s.el.querySelector(".frame").src =
      `api/frame?stream=${encodeURIComponent(s.id)}&v=${s.requestedV}`;
  }

  function frameSettled(s, ok) {
    s.loading = false;
    if (!s.el) return;
    if (ok) {
      s.loadedV = s.requestedV;
      s.el.dataset.frameV = String(s.loadedV);
      s.el.dataset.loads = String((Number(s.el.dataset.loads) || 0) + 1);
      s.el.querySelector(".frame-box").dataset.has = "1";
    } else {
      s.loadedV = s.requestedV;  // skip it; the next version is tried
    }
    if (s.tile && s.tile.frame && s.tile.frame.v !== s.loadedV) requestFrame(s);
  }

  function color(label, alpha) {
    const i = view.labels.indexOf(label);
    if (!label || i < 0) return `rgba(138, 152, 166, ${alpha})`;
    const hue = (i * 137.508 + 200) % 360;
    return `hsla(${hue.toFixed(1)}, 70%, 55%, ${alpha})`;
  }

  function sortedWindows(s) {
    if (!s.sorted) s.sorted = [...s.windows.values()].sort((a, b) => a[0] - b[0]);
    return s.sorted;
  }

  function drawTimeline(s) {
    const canvas = s.el.querySelector(".timeline");
    const dpr = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(canvas.clientWidth * dpr));
    const h = Math.max(1, Math.round(canvas.clientHeight * dpr));
    if (canvas.width !== w) canvas.width = w;
    if (canvas.height !== h) canvas.height = h;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    const W = w / dpr;
    ctx.clearRect(0, 0, W, h / dpr);
    const span = view.config.history_s * 1000;
    let right = Date.now() + view.offsetMs;
    // a replay of old media: follow its event time rather than show an empty strip
    if (view.newestEndMs && view.newestEndMs < right - span) right = view.newestEndMs;
    const left = right - span;
    const x = (t) => ((t - left) / span) * W;

    ctx.fillStyle = "rgba(255, 255, 255, 0.06)";
    for (let m = Math.ceil(left / 60000) * 60000; m < right; m += 60000) ctx.fillRect(x(m), 0, 1, h);

    const rows = sortedWindows(s);
    for (const e of rows) {
      if (e[1] < left) continue;
      const x0 = x(e[0]);
      const x1 = Math.max(x0 + 1, x(e[1]));
      ctx.fillStyle = color(e[2], e[5] ? 0.9 : 0.35);
      ctx.fillRect(x0, 0, x1 - x0, BAND_H);
      MODALITIES.forEach((_, i) => {
        if (e[6] & (1 << i)) {
          ctx.fillStyle = "rgba(160, 170, 180, 0.8)";
          ctx.fillRect(x0, BAND_H + 3 + i * 5, x1 - x0, 3);
        }
      });
    }
    ctx.strokeStyle = "rgba(255, 255, 255, 0.9)";
    ctx.lineWidth = 1.25;
    ctx.beginPath();
    let started = false;
    for (const e of rows) {
      if (e[1] < left || e[3] === null) continue;
      const px = x((e[0] + e[1]) / 2);
      const py = BAND_H - 1 - e[3] * (BAND_H - 2);
      if (started) ctx.lineTo(px, py); else { ctx.moveTo(px, py); started = true; }
    }
    ctx.stroke();
    ctx.fillStyle = "#f85149";
    for (const [t] of s.marks) if (t >= left) ctx.fillRect(x(t) - 1, 0, 2, h);
    s.el.dataset.windows = String(s.windows.size);
    s.el.dataset.marks = String(s.marks.length);
    s.el.dataset.drawn = String((Number(s.el.dataset.drawn) || 0) + 1);
  }

  function renderLegend() {
    const box = $("legend");
    box.replaceChildren(...view.labels.map((l) => {
      const span = document.createElement("span");
      span.textContent = l;
      span.style.setProperty("--c", color(l, 0.9));
      return span;
    }));
  }

  function fmt(v, digits = 1) {
    return v === null || v === undefined ? "–" : Number(v).toFixed(digits);
  }

  function listing(obj) {
    const parts = Object.entries(obj || {}).filter(([, n]) => n > 0).map(([k, n]) => `${k} ${n}`);
    return parts.length ? parts.join(", ") : "0";
  }

  function renderHealth(hl) {
    const box = $("health");
    box.dataset.status = hl.status;
    const status = {
      off: "no metrics endpoint (streamproc view --view-metrics-url)",
      ok: `ok (${hl.targets} endpoint${hl.targets === 1 ? "" : "s"})`,
      partial: `partly reachable: ${(hl.errors || []).join("; ")}`,
      unreachable: `unreachable: ${(hl.errors || []).join("; ")}`,
    }[hl.status] || hl.status;
    $("h-status").textContent = status;
    if (hl.status === "off") return;
    $("h-lag").textContent = hl.lag === null || hl.lag === undefined ? "–" : String(hl.lag);
    $("h-wps").textContent = fmt(hl.windows_per_s);
    $("h-rps").textContent = fmt(hl.records_per_s, 0);
    // numbers of the last few seconds; "since start" once the workers have gone quiet
    const since = (h) => (h.since_start ? " since start" : "");
    const b = hl.batch_size || {};
    $("h-batch").textContent = b.mean === null || b.mean === undefined ? "–" : `${fmt(b.mean)} mean, p99 ${fmt(b.p99, 0)}${since(b)}`;
    const a = hl.added_ms || {};
    $("h-added").textContent = a.p50 === null || a.p50 === undefined ? "–" : `${fmt(a.p50, 0)} / ${fmt(a.p99, 0)} ms${since(a)}`;
    const e = hl.end_to_end_ms || {};
    $("h-e2e").textContent = e.p50 === null || e.p50 === undefined ? "–" : `${duration(e.p50)}${since(e)}`;
    $("h-masked").textContent = listing(hl.masked);
    $("h-dead").textContent = listing(hl.dead_letters);
  }

  function renderDeadLetters(dl) {
    $("dl-total").textContent = String(dl.total);
    $("dl-kinds").textContent = dl.total ? `(${listing(dl.by_kind)})` : "";
    const rows = dl.groups.slice(0, DL_ROWS).map((g) => {
      const tr = document.createElement("tr");
      tr.dataset.kind = g.kind;
      for (const [cls, text] of [["kind", g.kind], ["reason", g.reason], ["count", String(g.count)],
        ["stream", g.stream], ["topic", g.topic], ["last", new Date(g.last_ms).toLocaleTimeString()]]) {
        const td = document.createElement("td");
        td.className = cls;
        td.textContent = text;
        tr.appendChild(td);
      }
      return tr;
    });
    $("dl-rows").replaceChildren(...rows);
  }

  function setConn(state) {
    const c = $("conn");
    c.dataset.state = state;
    c.textContent = state;
  }

  // --- wiring ---------------------------------------------------------------------------

  let source = null;
  function connect() {
    source = new EventSource("api/events");
    source.addEventListener("snapshot", (e) => { applySnapshot(JSON.parse(e.data)); setConn("live"); });
    source.addEventListener("delta", (e) => applyDelta(JSON.parse(e.data)));
    source.addEventListener("error", () => setConn("reconnecting"));
  }

  $("filter").addEventListener("input", (e) => {
    view.filter = e.target.value.trim().toLowerCase();
    layout();
  });
  // time moves: visible timelines slide even when no record comes
  setInterval(() => {
    for (const id of view.shown) {
      const s = view.streams.get(id);
      if (s && s.visible) s.dirtyTimeline = true;
    }
    scheduleRender();
  }, TIME_REDRAW_MS);
  // EventSource gives up after an HTTP error (the view restarting): start it again
  setInterval(() => { if (source && source.readyState === EventSource.CLOSED) connect(); }, 3000);
  connect();
})();
