// worldline-play page: keys -> "controls" messages; "frame" message + JPEG binaries -> <img>.
// No dependencies, no CDN. Protocol: train/play/server.py.
"use strict";
const $ = (id) => document.getElementById(id);
const ws = new WebSocket(`ws://${location.host}/ws`);
ws.binaryType = "blob";
let space = null, held = [], seq = 0, pressedAt = {}, pending = null, shown = [], lastUrl = null;
const state = { actions: [], camera: [], paused: false, latency: null, fps: 0, frames: 0 };
window.worldlinePlay = state;  // read by the browser test

function send(msg) { if (ws.readyState === 1) ws.send(JSON.stringify(msg)); }

function controls() {
  // Last pressed key wins within a slot; camera keys add up (clamped to [-1, 1]).
  const acts = new Array(space.slots).fill(0), cam = new Array(space.camera_dim).fill(0);
  for (const k of held) {
    if (k in space.keys) { const [s, a] = space.keys[k]; acts[s] = a; }
    if (k in space.camera) space.camera[k].forEach((d, i) => cam[i] = Math.max(-1, Math.min(1, cam[i] + d)));
  }
  return [acts, cam];
}

function update() {
  const [acts, cam] = controls();
  seq += 1; pressedAt[seq] = performance.now();
  state.actions = acts; state.camera = cam;
  $("actions").textContent = JSON.stringify(acts); $("camera").textContent = JSON.stringify(cam);
  state.lastSeqSent = seq;
  send({ type: "controls", actions: acts, camera: cam, seq: seq });
}

function keyName(e) { return e.key.length === 1 ? e.key.toLowerCase() : e.key; }
document.addEventListener("keydown", (e) => {
  const k = keyName(e);
  if (!space || !(k in space.keys || k in space.camera) || e.target.tagName === "INPUT") return;
  e.preventDefault();
  const a = $("sound");  // browsers allow play() only after a gesture: start it on the first key
  if (state.audio && a.paused && !a.ended && !state.paused) a.play().catch(() => {});
  if (!held.includes(k)) { held.push(k); update(); }
});
document.addEventListener("keyup", (e) => {
  const k = keyName(e), i = held.indexOf(k);
  if (i >= 0) { held.splice(i, 1); update(); }
});

ws.onmessage = (ev) => {
  if (typeof ev.data !== "string") {  // a JPEG of the pending frame message
    if (!pending) return;
    pending.blobs.push(ev.data);
    if (pending.blobs.length === pending.meta.count) show(pending);
    return;
  }
  const msg = JSON.parse(ev.data);
  if (msg.type === "frame" && msg.reset) restartSound();
  if (msg.type === "hello") hello(msg);
  else if (msg.type === "busy") { $("busy").textContent = msg.message; }
  else if (msg.type === "error") { $("error").textContent = msg.message; }
  else if (msg.type === "frame") {
    pending = { meta: msg, blobs: [] };
    if (msg.errors && msg.errors.length) $("error").textContent = msg.errors.join("; ");
    if (msg.recording) recording(msg.recording);
    if (msg.count === 0) pending = null;
  }
};
ws.onclose = () => { if (!$("busy").textContent) $("error").textContent = "disconnected"; };

function show(p) {
  const m = p.meta, now = performance.now();
  pending = null;
  // Several pixel frames per latent frame: spread them over the last step's duration.
  const gap = Math.min(250, (m.step_ms || 100) / p.blobs.length);
  p.blobs.forEach((b, i) => setTimeout(() => {
    const url = URL.createObjectURL(b);
    $("view").src = url;
    if (lastUrl) URL.revokeObjectURL(lastUrl);
    lastUrl = url;
    shown.push(performance.now());
    while (shown.length && shown[0] < performance.now() - 2000) shown.shift();
    state.fps = shown.length / 2; state.frames += 1;
    $("fps").textContent = state.fps.toFixed(1);
  }, i * gap));
  if (m.seq in pressedAt) {  // first frame made with these keys: key-to-frame latency
    state.latency = now - pressedAt[m.seq];
    for (const s of Object.keys(pressedAt)) if (+s <= m.seq) delete pressedAt[s];
    $("latency").textContent = state.latency.toFixed(0);
  }
  state.lastActions = m.actions; state.index = m.index; state.lastSeq = m.seq;
  $("stepms").textContent = m.compute_ms.toFixed(0);
  $("index").textContent = m.index; $("dropped").textContent = m.dropped;
}

function hello(msg) {
  space = msg.space;
  $("steps").value = msg.settings.num_steps; $("cfg").value = msg.settings.cfg_scale;
  $("acfg").value = msg.settings.action_cfg_scale;
  for (const [slot, key, name] of space.legend) {
    const tr = document.createElement("tr");
    for (const c of [slot, key, name]) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    $("keymap").appendChild(tr);
  }
  for (const c of msg.contexts) {
    const o = document.createElement("option"); o.value = o.textContent = c; $("contexts").appendChild(o);
  }
  state.space = space; state.ready = true;
  update();
}

function recording(r) {
  if (r.files) {
    $("recstatus").textContent = "done";
    $("downloads").textContent = "";
    for (const url of r.files) {
      const a = document.createElement("a");
      a.href = url; a.download = url.split("/").pop(); a.textContent = a.download + " ";
      $("downloads").appendChild(a);
      a.click();  // download right away
    }
    state.recorded = r.files;
  } else $("recstatus").textContent = `${r.recorded}/${r.of}`;
}

$("reset").onclick = () => send({ type: "reset", context: $("contexts").value });
// --audio: the page plays the file from 0 at every reset (context, record), as the model
// hears it. Only by wall clock: the model hears it in frame time, so slow steps drift.
function restartSound() {
  const a = $("sound");
  if (!state.audio) return;
  a.currentTime = 0; state.soundRestarts = (state.soundRestarts || 0) + 1;
  if (!state.paused) a.play().catch(() => {});  // blocked until the first key press/click
}
$("mute").onclick = () => {
  const a = $("sound"); a.muted = !a.muted; $("mute").textContent = a.muted ? "unmute" : "mute";
};
$("pause").onclick = () => {
  state.paused = !state.paused; $("pause").textContent = state.paused ? "resume" : "pause";
  if (state.audio) { if (state.paused) $("sound").pause(); else $("sound").play().catch(() => {}); }
  send({ type: "pause", paused: state.paused });
};
$("apply").onclick = () => send({ type: "settings", num_steps: +$("steps").value,
  cfg_scale: +$("cfg").value, action_cfg_scale: +$("acfg").value });
$("record").onclick = () => send({ type: "record", frames: +$("recframes").value });
$("stoprec").onclick = () => send({ type: "stop_record" });
$("upload").onchange = () => {
  const f = $("upload").files[0]; if (!f) return;
  const r = new FileReader();
  r.onload = () => send({ type: "reset", image: r.result });
  r.readAsDataURL(f);
};
fetch("/api/info").then((r) => r.json()).then((i) => {
  $("source").textContent = i.source;
  if (i.audio) {
    state.audio = true; $("sound").src = "/audio"; $("soundrow").hidden = false;
    restartSound();  // the first context frame may have come before this answer
  }
});
