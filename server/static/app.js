// streamgen demo: one websocket session per Start (stream-protocol.md v1). No build step, no dependencies.
"use strict";

const $ = (id) => document.getElementById(id);
const EXAMPLES = [
  "a red circle bouncing on a black background",
  "a large yellow square moving left quickly on a navy background",
  "a small cyan triangle standing still and a magenta circle moving up slowly on a gray background",
  "a green triangle moving right on a white background",
  "a white circle moving down slowly on a navy background",
  "a large green square bouncing quickly and a blue circle bouncing on a black background",
];
const STAGES = [
  ["text", "#a78bfa"], ["recache", "#f472b6"], ["context", "#22d3ee"],
  ["denoise", "#ff5a5f"], ["decode", "#f5a524"], ["encode", "#3ecf8e"],
];
const STAGE_COLOR = Object.fromEntries(STAGES);

// Everything the page knows; also read by the headless-browser test (window.__demo).
const S = {
  ws: null, state: "idle", ready: null, format: "jpeg",
  userStopped: false, done: false, everStreamed: false, paused: false,
  attempts: 0, reconnectTimer: null,
  framesDrawn: 0, lastIndex: -1, decodeChain: Promise.resolve(),
  drawTimes: [], stageAvg: {}, lastChunk: null, stats: null, events: [],
};
window.__demo = S;

const canvas = $("screen");
const ctx = canvas.getContext("2d");

// ---- UI helpers ----------------------------------------------------------------------------------------

function setStatus(state, text) {
  S.state = state;
  const el = $("status");
  el.className = "pill " + state;
  el.textContent = text;
  const live = state === "streaming" || state === "paused";
  $("start").disabled = live || state === "connecting";
  $("switch").disabled = !live;
  $("pause").disabled = !live;
  $("stop").disabled = !(live || state === "connecting" || state === "reconnecting");
  $("pause").textContent = state === "paused" ? "Resume" : "Pause";
}

function log(text, cls = "") {
  const li = document.createElement("li");
  li.className = cls;
  const t = document.createElement("time");
  t.textContent = new Date().toLocaleTimeString();
  li.append(t, document.createTextNode(text));
  const list = $("log");
  list.prepend(li);
  while (list.children.length > 200) list.lastChild.remove();
}

function banner(text, bad = false) {
  const b = $("banner");
  b.hidden = !text;
  b.textContent = text || "";
  b.classList.toggle("bad", bad);
}

function caption(prompt, flash) {
  const c = $("caption");
  c.hidden = !prompt;
  c.textContent = prompt || "";
  if (flash) {
    c.classList.add("flash");
    setTimeout(() => c.classList.remove("flash"), 900);
  }
}

function settings() {
  const seed = Math.max(0, Math.floor(Number($("seed").value) || 0));
  return {
    prompt: $("prompt").value.trim(),
    seed,
    frames: Math.max(0, Math.floor(Number($("frames").value) || 0)),
    format: $("format").value,
    pace: $("pace").value,
    quality: 90,
  };
}

// ---- connection ------------------------------------------------------------------------------------------

function wsURL() {
  const url = new URL("/v1/stream", location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  const token = new URLSearchParams(location.search).get("token");
  if (token) url.searchParams.set("token", token);
  return url.toString();
}

function start(isReconnect = false) {
  const msg = settings();
  if (!msg.prompt) {
    log("the prompt is empty", "warn");
    $("prompt").focus();
    return;
  }
  clearTimeout(S.reconnectTimer);
  if (S.ws) { S.ws.onclose = null; S.ws.close(); }
  S.userStopped = false;
  S.done = false;
  S.paused = false;
  S.format = msg.format;
  if (!isReconnect) { S.attempts = 0; S.stageAvg = {}; }
  setStatus(isReconnect ? "reconnecting" : "connecting", isReconnect ? "Reconnecting…" : "Connecting…");
  const ws = new WebSocket(wsURL());
  ws.binaryType = "arraybuffer";
  S.ws = ws;
  ws.onopen = () => { ws.send(JSON.stringify({ type: "start", ...msg })); };
  ws.onmessage = (ev) => {
    if (ws !== S.ws) return;
    if (typeof ev.data === "string") onText(JSON.parse(ev.data));
    else onFrame(ev.data);
  };
  ws.onclose = (ev) => { if (ws === S.ws) onClose(ev); };
}

function send(obj) {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify(obj));
}

function onClose(ev) {
  S.ws = null;
  const expected = S.userStopped || S.done;
  S.events.push({ type: "close", code: ev.code });
  if (expected) {
    if (S.state !== "done") setStatus("done", "Stopped");
    return;
  }
  const why = { 1009: "message too large", 1011: "generation failed", 1013: "server busy" }[ev.code]
    || `connection lost (${ev.code})`;
  if (ev.code === 1009 || !$("reconnect").checked || !S.everStreamed && ev.code !== 1013) {
    setStatus("error", "Disconnected");
    banner(why, true);
    log(`closed: ${why}`, "bad");
    return;
  }
  const delay = Math.min(10, 2 ** S.attempts);
  S.attempts += 1;
  setStatus("reconnecting", `Reconnecting in ${delay}s`);
  banner(`${why} — reconnecting in ${delay}s`);
  log(`${why}; reconnecting in ${delay}s`, "warn");
  S.reconnectTimer = setTimeout(() => start(true), delay * 1000);
}

// ---- messages --------------------------------------------------------------------------------------------

function onText(m) {
  S.events.push(m.type === "chunk" ? { type: "chunk", index: m.index } : m);
  if (S.events.length > 500) S.events.splice(0, S.events.length - 500);
  switch (m.type) {
    case "ready":
      S.ready = m;
      S.everStreamed = true;
      S.attempts = 0;
      S.lastIndex = -1;
      canvas.width = m.width;
      canvas.height = m.height;
      $("placeholder").hidden = true;
      $("hud").hidden = false;
      $("model").textContent = `${m.model} · ${m.width}×${m.height} @ ${m.fps} fps`;
      caption(settings().prompt);
      banner("");
      setStatus("streaming", "Live");
      log(`session ${m.session} ready (seed ${m.seed})`, "ok");
      break;
    case "chunk":
      S.lastChunk = m;
      updateLatency(m);
      if (m.batch) $("hud-batch").textContent = m.batch;
      break;
    case "prompt_applied":
      caption(m.prompt, true);
      log(`prompt applied at frame ${m.frame}: ${m.prompt}`, "info");
      break;
    case "stats":
      S.stats = m;
      $("hud-sfps").textContent = m.fps.toFixed(1);
      $("hud-dropped").textContent = m.dropped;
      $("lat-summary").textContent = `p50 ${Math.round(m.latency_ms.p50)} ms · p95 ${Math.round(m.latency_ms.p95)} ms`;
      break;
    case "warning":
      log(`${m.code}: ${m.message}`, "warn");
      break;
    case "error":
      log(`${m.code}: ${m.message}`, "bad");
      if (m.code === "internal" || m.code === "busy" || m.code === "too_large") banner(m.message, true);
      break;
    case "done":
      S.done = true;
      setStatus("done", m.reason === "frames" ? "Finished" : m.reason === "timeout" ? "Timed out" : "Stopped");
      log(`done: ${m.frames} frames (${m.reason})`, "ok");
      break;
  }
}

function onFrame(buf) {
  const view = new DataView(buf);
  const index = Number(view.getBigUint64(0, true));
  const body = new Uint8Array(buf, 8);
  const fmt = S.format;
  // decode in arrival order; draw unless a newer frame was already drawn
  S.decodeChain = S.decodeChain.then(async () => {
    let image;
    if (fmt === "rgb") {
      const { width: w, height: h } = S.ready;
      const rgba = new Uint8ClampedArray(w * h * 4);
      for (let i = 0, j = 0; i < w * h; i++, j += 3) {
        rgba[4 * i] = body[j]; rgba[4 * i + 1] = body[j + 1]; rgba[4 * i + 2] = body[j + 2]; rgba[4 * i + 3] = 255;
      }
      image = new ImageData(rgba, w, h);
    } else {
      image = await createImageBitmap(new Blob([body], { type: fmt === "png" ? "image/png" : "image/jpeg" }));
    }
    if (index <= S.lastIndex) return;
    if (image instanceof ImageData) ctx.putImageData(image, 0, 0);
    else { ctx.drawImage(image, 0, 0, canvas.width, canvas.height); image.close(); }
    S.lastIndex = index;
    S.framesDrawn += 1;
    const now = performance.now();
    S.drawTimes.push(now);
    while (S.drawTimes.length && S.drawTimes[0] < now - 2000) S.drawTimes.shift();
  }).catch((e) => log(`frame ${index}: ${e}`, "bad"));
}

// ---- latency bar -----------------------------------------------------------------------------------------

function updateLatency(m) {
  for (const [k, v] of Object.entries(m.timings_ms)) {
    const prev = S.stageAvg[k];
    S.stageAvg[k] = prev === undefined ? v : prev * 0.7 + v * 0.3;
  }
  const stages = Object.entries(S.stageAvg).filter(([k]) => m.timings_ms[k] !== undefined);
  const total = stages.reduce((a, [, v]) => a + v, 0);
  const budget = S.ready ? (m.frames / S.ready.fps) * 1000 : total;
  const scale = Math.max(total, budget) * 1.1 || 1;
  const bar = $("lat-bar");
  bar.querySelectorAll(".seg").forEach((e) => e.remove());
  const legend = $("lat-legend");
  legend.innerHTML = "";
  for (const [k, v] of stages) {
    const seg = document.createElement("div");
    seg.className = "seg";
    seg.style.width = `${(100 * v) / scale}%`;
    seg.style.background = STAGE_COLOR[k] || "#8a92a6";
    seg.title = `${k}: ${v.toFixed(1)} ms`;
    bar.append(seg);
    const li = document.createElement("li");
    li.innerHTML = `<span class="sw" style="background:${STAGE_COLOR[k] || "#8a92a6"}"></span>${k} <b>${v.toFixed(1)}</b>`;
    legend.append(li);
  }
  const li = document.createElement("li");
  li.innerHTML = `total <b>${total.toFixed(0)} ms</b> / budget <b>${budget.toFixed(0)} ms</b>`;
  legend.append(li);
  $("lat-budget").style.left = `${(100 * budget) / scale}%`;
}

// ---- HUD tick --------------------------------------------------------------------------------------------

setInterval(() => {
  const now = performance.now();
  while (S.drawTimes.length && S.drawTimes[0] < now - 2000) S.drawTimes.shift();
  const span = S.drawTimes.length > 1 ? (now - S.drawTimes[0]) / 1000 : 2;
  $("hud-fps").textContent = (S.drawTimes.length / Math.max(span, 0.5)).toFixed(1);
  $("hud-frame").textContent = Math.max(S.lastIndex, 0);
}, 250);

// ---- controls --------------------------------------------------------------------------------------------

function switchPrompt() {
  const p = $("prompt").value.trim();
  if (!p) return;
  send({ type: "prompt", prompt: p });
  log(`switching to: ${p}`);
}

function togglePause() {
  if (S.state === "streaming") { send({ type: "pause" }); S.paused = true; setStatus("paused", "Paused"); }
  else if (S.state === "paused") { send({ type: "resume" }); S.paused = false; setStatus("streaming", "Live"); }
}

function stop() {
  S.userStopped = true;
  clearTimeout(S.reconnectTimer);
  banner("");
  if (S.ws && S.ws.readyState === WebSocket.OPEN) send({ type: "stop" });
  else { if (S.ws) S.ws.close(); setStatus("done", "Stopped"); }
}

$("start").onclick = () => start(false);
$("switch").onclick = switchPrompt;
$("pause").onclick = togglePause;
$("stop").onclick = stop;
$("dice").onclick = () => { $("seed").value = Math.floor(Math.random() * 1e6); };
$("smooth").onchange = (e) => $("stage").classList.toggle("smooth", e.target.checked);
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
    e.preventDefault();
    if (S.state === "streaming" || S.state === "paused") switchPrompt(); else start(false);
  }
});
document.addEventListener("keydown", (e) => {
  if (e.code === "Space" && !["TEXTAREA", "INPUT", "SELECT", "BUTTON"].includes(document.activeElement.tagName)) {
    e.preventDefault();
    togglePause();
  }
});

for (const p of EXAMPLES) {
  const b = document.createElement("button");
  b.className = "chip";
  b.textContent = p;
  b.onclick = () => {
    $("prompt").value = p;
    if (S.state === "streaming" || S.state === "paused") switchPrompt();
  };
  $("examples").append(b);
}

fetch("/healthz").then((r) => r.json()).then((h) => {
  $("model").textContent = h.model;
  $("conn-info").textContent = `${h.sessions}/${h.max_sessions} sessions on this server`;
}).catch(() => {});
setStatus("idle", "Not connected");
