// The playground page: a client of the Cog HTTP API through the playground's relay (app.py).
// Every form is built from its server's OpenAPI schema; nothing here knows a model's inputs.
"use strict";

const state = {
  servers: [],        // from /api/servers
  panels: {},         // server name -> {server, form, fields, job, source, els}
  opening: {},        // server name -> the promise of its panel
  tiny: false,
  audio: null,        // one AudioContext for streamed chunks (made on the first click: browsers require it)
  firstHeard: {},     // job id -> epoch ms the first streamed audio started playing (read by the tests)
};
window.playground = state;

// ---------------------------------------------------------------------------------------------
// small helpers

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k === "class") e.className = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c);
  return e;
}

async function api(path, options = {}) {
  const response = await fetch(path, {
    headers: { "Content-Type": "application/json" },
    ...options,
    body: options.body === undefined ? undefined : JSON.stringify(options.body),
  });
  let body = null;
  try { body = await response.json(); } catch (e) { body = null; }
  return { status: response.status, body };
}

function readAsDataURL(blob) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(blob);
  });
}

function audioContext() {
  if (!state.audio) state.audio = new AudioContext();
  if (state.audio.state === "suspended") state.audio.resume();
  return state.audio;
}

async function decode(arrayBuffer) {
  return await audioContext().decodeAudioData(arrayBuffer);
}

function seconds(s) { return `${s.toFixed(s < 10 ? 2 : 1)} s`; }

// ---------------------------------------------------------------------------------------------
// schema -> form

function resolve(schema, prop) {
  // Cog writes an enum as allOf: [{$ref: "#/components/schemas/<name>"}] (predictions) or a bare $ref
  // (trainings); the property's own description and default win over the enum's
  const ref = prop.$ref || (prop.allOf && prop.allOf.length === 1 && prop.allOf[0].$ref);
  if (!ref) return prop;
  const target = schema.components.schemas[ref.split("/").pop()] || {};
  return { ...target, ...prop, description: prop.description ?? target.description, allOf: undefined, $ref: undefined };
}

function ruleText(p) {
  const parts = [];
  if (p.enum) parts.push(`one of ${p.enum.join(", ")}`);
  const lo = p.minimum ?? p.exclusiveMinimum, hi = p.maximum ?? p.exclusiveMaximum;
  if (lo !== undefined && hi !== undefined) parts.push(`${p.exclusiveMinimum !== undefined ? ">" : ""}${lo} to ${hi}`);
  else if (lo !== undefined) parts.push(`${p.exclusiveMinimum !== undefined ? ">" : "≥"} ${lo}`);
  else if (hi !== undefined) parts.push(`≤ ${hi}`);
  if (p.maxLength !== undefined) parts.push(`at most ${p.maxLength} characters`);
  if (p.default !== undefined && p.default !== null) parts.push(`default ${JSON.stringify(p.default)}`);
  return parts.join("; ");
}

function inputSchema(schema, kind) {
  const schemas = schema.components.schemas;
  return kind === "train" ? schemas.TrainingInput : schemas.Input;
}

function buildFields(panel, schema) {
  const s = inputSchema(schema, panel.server.kind);
  const props = Object.entries(s.properties).map(([name, p]) => [name, resolve(schema, p)]);
  props.sort((a, b) => (a[1]["x-order"] ?? 0) - (b[1]["x-order"] ?? 0));
  const required = new Set(s.required || []);
  const fields = {};
  const box = el("div", { class: "fields" });
  for (const [name, p] of props) {
    const id = `${panel.server.name}-${name}`;
    const field = { name, prop: p, row: null, control: null, error: el("p", { class: "error", id: `${id}-error`, "aria-live": "polite" }) };
    let control;
    if (p.type === "string" && p.format === "uri") {
      control = fileControl(panel, field, id);
    } else if (p.enum) {
      control = el("select", { id, name });
      for (const v of p.enum) control.append(el("option", { value: v, selected: v === p.default }, String(v)));
    } else if (p.type === "boolean") {
      control = el("input", { id, name, type: "checkbox", checked: p.default === true });
    } else if (p.type === "integer" || p.type === "number") {
      control = el("input", { id, name, type: "number", step: p.type === "integer" ? "1" : "any",
        value: p.default ?? "", placeholder: p.default === undefined || p.default === null ? "empty: none" : undefined });
    } else if (name.includes("prompt") || name === "caption" || (p.maxLength || 0) > 200) {
      control = el("textarea", { id, name, rows: 3 }, p.default ?? "");
    } else {
      control = el("input", { id, name, type: "text", value: p.default ?? "" });
    }
    field.control = control;
    const hint = [p.description, ruleText(p)].filter(Boolean).join(" — ");
    field.row = el("div", { class: "field", "data-field": name },
      el("label", { for: control.tagName === "DIV" ? `${id}-file` : id }, name, required.has(name) ? " *" : ""),
      control,
      el("p", { class: "hint", id: `${id}-hint` }, hint),
      field.error);
    if (control.tagName !== "DIV") control.setAttribute("aria-describedby", `${id}-hint ${id}-error`);
    fields[name] = field;
    box.append(field.row);
  }
  return { box, fields };
}

// A file input (a data: URI when sent), with a recorder and a waveform for audio.
function fileControl(panel, field, id) {
  const audio = field.name.includes("audio");
  const name = el("span", { class: "name" }, "no file");
  const picker = el("input", { id: `${id}-file`, type: "file", accept: audio ? "audio/*" : undefined });
  const wave = audio ? el("canvas", { class: "wave", width: 600, height: 70, tabindex: 0, hidden: true,
    role: "slider", "aria-label": `${field.name}: the part to use (drag, or arrows)` }) : null;
  const box = el("div", { class: "file" }, picker, name);
  field.value = null;
  field.set = async (dataURL, label) => {
    field.value = dataURL;
    name.textContent = label || "no file";
    if (wave) {
      wave.hidden = !dataURL;
      field.buffer = null;
      if (dataURL) {
        try {
          field.buffer = await decode(await (await fetch(dataURL)).arrayBuffer());
          name.textContent = `${label} (${seconds(field.buffer.duration)})`;
          drawWave(panel, field, wave);
        } catch (e) { name.textContent = `${label} (the browser cannot draw it; the server decides)`; }
      }
    }
  };
  picker.addEventListener("change", async () => {
    const f = picker.files[0];
    await field.set(f ? await readAsDataURL(f) : null, f ? f.name : null);
  });
  const clear = el("button", { type: "button", onclick: () => { picker.value = ""; field.set(null, null); } }, "Clear");
  box.append(clear);
  if (audio && navigator.mediaDevices && window.MediaRecorder) {
    let recorder = null;
    const record = el("button", { type: "button" }, "Record");
    record.addEventListener("click", async () => {
      if (recorder) { recorder.stop(); return; }
      try {
        const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
        const parts = [];
        recorder = new MediaRecorder(stream);
        recorder.ondataavailable = (e) => parts.push(e.data);
        recorder.onstop = async () => {
          stream.getTracks().forEach((t) => t.stop());
          recorder = null;
          record.textContent = "Record";
          const blob = new Blob(parts, { type: parts[0]?.type || "audio/webm" });
          await field.set(await readAsDataURL(blob), "recording");
        };
        recorder.start();
        record.textContent = "Stop recording";
      } catch (e) { field.error.textContent = `microphone: ${e.message}`; }
    });
    box.append(record);
  }
  if (wave) {
    box.append(wave);
    waveSelection(panel, field, wave);
  }
  return box;
}

function drawWave(panel, field, canvas, selection) {
  if (field.buffer) drawBuffer(canvas, field.buffer, selection || currentRange(panel, field.buffer.duration));
}

// A waveform (min/max per pixel column), with a selected span shaded.
function drawBuffer(canvas, b, sel) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height;
  ctx.clearRect(0, 0, w, h);
  const data = b.getChannelData(0), per = Math.max(1, Math.floor(data.length / w));
  if (sel) {
    ctx.fillStyle = "rgba(40, 86, 199, .12)";
    ctx.fillRect(sel[0] / b.duration * w, 0, (sel[1] - sel[0]) / b.duration * w, h);
  }
  ctx.fillStyle = "#2856c7";
  for (let x = 0; x < w; x++) {
    let lo = 1, hi = -1;
    for (let i = x * per; i < Math.min(data.length, (x + 1) * per); i++) { lo = Math.min(lo, data[i]); hi = Math.max(hi, data[i]); }
    ctx.fillRect(x, (1 - hi) * h / 2, 1, Math.max(1, (hi - lo) * h / 2));
  }
}

function currentRange(panel, duration) {
  const f = panel.fields;
  const start = f.continuation_start ? Number(f.continuation_start.control.value) || 0 : 0;
  const endRaw = f.continuation_end ? f.continuation_end.control.value : "";
  const end = endRaw === "" || Number(endRaw) < 0 ? duration : Number(endRaw);
  return [Math.min(start, duration), Math.min(end, duration)];
}

function setRange(panel, field, canvas, start, end) {
  const d = field.buffer.duration;
  start = Math.max(0, Math.min(start, d)); end = Math.max(start + 0.1, Math.min(end, d));
  if (panel.fields.continuation_start) panel.fields.continuation_start.control.value = start.toFixed(2);
  if (panel.fields.continuation_end) panel.fields.continuation_end.control.value = end >= d - 0.01 ? "" : end.toFixed(2);
  canvas.setAttribute("aria-valuetext", `${seconds(start)} to ${seconds(end)}`);
  drawWave(panel, field, canvas, [start, end]);
}

// Drag on the waveform (or arrows) to choose the continuation's part: it fills continuation_start/_end.
function waveSelection(panel, field, canvas) {
  let from = null;
  const at = (e) => (e.offsetX / canvas.clientWidth) * field.buffer.duration;
  canvas.addEventListener("pointerdown", (e) => { if (field.buffer) { from = at(e); canvas.setPointerCapture(e.pointerId); } });
  canvas.addEventListener("pointermove", (e) => { if (from !== null) { const t = at(e); setRange(panel, field, canvas, Math.min(from, t), Math.max(from, t)); } });
  canvas.addEventListener("pointerup", () => { from = null; });
  canvas.addEventListener("keydown", (e) => {
    if (!field.buffer || !["ArrowLeft", "ArrowRight"].includes(e.key)) return;
    e.preventDefault();
    const step = (e.key === "ArrowLeft" ? -1 : 1) * Math.max(0.1, field.buffer.duration / 100);
    const [s, t] = currentRange(panel, field.buffer.duration);
    if (e.shiftKey) setRange(panel, field, canvas, s, t + step); else setRange(panel, field, canvas, s + step, t);
  });
}

function collect(panel) {
  const input = {};
  for (const f of Object.values(panel.fields)) {
    const p = f.prop, c = f.control;
    if (p.type === "string" && p.format === "uri") { if (f.value) input[f.name] = f.value; continue; }
    if (p.type === "boolean") { input[f.name] = c.checked; continue; }
    const raw = c.value;
    if (raw === "") continue;  // empty: the server's default
    if (p.type === "integer" || p.type === "number") input[f.name] = Number(raw);
    else input[f.name] = raw;
  }
  return input;
}

function fill(panel, input) {
  for (const f of Object.values(panel.fields)) {
    if (!(f.name in input)) continue;
    const v = input[f.name];
    if (f.prop.type === "string" && f.prop.format === "uri") {
      useAudio(panel, f.name, v);
    } else if (f.prop.type === "boolean") f.control.checked = !!v;
    else f.control.value = v ?? "";
  }
}

async function useAudio(panel, name, url) {
  const f = panel.fields[name];
  if (!f || !url) return;
  const blob = await (await fetch(url)).blob();
  await f.set(await readAsDataURL(blob), url.split("/").pop());
}

// The API's messages beside the fields they name: a 422's detail, or a failed prediction's rules
// ("field: rule; other: rule").
function showErrors(panel, detail, error) {
  clearErrors(panel);
  const general = [];
  for (const d of detail || []) {
    const name = (d.loc || []).slice(-1)[0];
    if (panel.fields[name]) mark(panel, name, d.msg || JSON.stringify(d));
    else general.push(d.msg || JSON.stringify(d));
  }
  if (error && !(detail && detail.length)) {
    // coglet puts its own words before the predictor's message: "Prediction failed: ... InputError: "
    const rules = String(error).replace(/^(.*?\bInputError:\s*)/s, "");
    for (const part of rules.split(/;\s+/)) {
      const m = part.match(/^\s*([A-Za-z_]+):\s*(.*)$/s);
      if (m && panel.fields[m[1]]) mark(panel, m[1], m[2]); else general.push(part);
    }
  }
  panel.els.message.textContent = general.join("; ");
}

function mark(panel, name, text) {
  const f = panel.fields[name];
  f.row.classList.add("bad");
  f.error.textContent = f.error.textContent ? `${f.error.textContent}; ${text}` : text;
}

function clearErrors(panel) {
  for (const f of Object.values(panel.fields)) { f.row.classList.remove("bad"); f.error.textContent = ""; }
  panel.els.message.textContent = "";
}

// ---------------------------------------------------------------------------------------------
// panels

async function openPanel(server) {
  const panel = { server, fields: {}, job: null, source: null, els: {} };
  state.panels[server.name] = panel;
  const status = el("p", { class: "status", role: "status" }, "reading the server's schema...");
  const message = el("p", { class: "message", role: "alert" });
  const send = el("button", { class: "primary", type: "submit" }, server.kind === "train" ? "Train" : "Generate");
  const cancel = el("button", { type: "button", disabled: true, onclick: () => cancelJob(panel) }, "Cancel");
  const progress = el("progress", { max: 100, value: 0, hidden: true, "aria-label": "progress" });
  const logs = el("pre", { class: "logs", "aria-label": "logs" });
  const results = el("div", { class: "results", "aria-live": "polite" });
  const form = el("form", { novalidate: true, "aria-label": `${server.title} form` });
  const left = el("div", {}, status, form, message);
  const right = el("div", {}, progress, el("details", { open: true }, el("summary", {}, "Logs"), logs), results);
  const section = el("section", { class: "panel", role: "tabpanel", id: `panel-${server.name}`,
    "aria-labelledby": `tab-${server.name}`, hidden: true }, left, right);
  document.getElementById("panels").append(section);
  Object.assign(panel.els, { status, message, send, cancel, progress, logs, results, form, section });
  form.addEventListener("submit", (e) => { e.preventDefault(); submit(panel); });
  form.addEventListener("keydown", (e) => { if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) { e.preventDefault(); submit(panel); } });
  const r = await api(`/api/servers/${server.name}/schema`);
  if (r.status !== 200) { status.textContent = `no schema: ${r.body?.error || r.status}`; return panel; }
  const { box, fields } = buildFields(panel, r.body);
  panel.fields = fields;
  form.append(box, el("div", { class: "actions" }, send, cancel));
  watchHealth(panel);
  return panel;
}

async function watchHealth(panel) {
  const s = panel.server;
  const where = s.managed ? "a local server" : s.url;
  for (;;) {
    const h = await api(`/api/servers/${s.name}/health`);
    const status = h.body?.status || "UNREACHABLE";
    panel.els.status.textContent = `${s.title}: ${where} — ${status}${s.note ? ` (${s.note})` : ""}`;
    if (status === "READY" || status === "BUSY") { panel.ready = true; }
    if (status === "SETUP_FAILED" || status === "EXITED") { panel.els.message.textContent = h.body?.error || "setup failed: see the server's log"; }
    await new Promise((r) => setTimeout(r, panel.ready ? 5000 : 500));
  }
}

async function submit(panel) {
  if (panel.job) return;
  audioContext();  // inside the click: the browser lets the page play streamed audio from now on
  clearErrors(panel);
  const input = collect(panel);
  panel.els.send.disabled = true;
  const r = await api(`/api/servers/${panel.server.name}/jobs`, { method: "POST", body: { input } });
  if (r.status !== 202) {
    panel.els.send.disabled = false;
    showErrors(panel, r.body?.detail, r.body?.detail ? null : r.body?.error || `HTTP ${r.status}`);
    refreshHistory();
    return;
  }
  startJob(panel, r.body.job);
}

function startJob(panel, job) {
  panel.job = job;
  panel.stream = { items: [], next: 0, chunkSeconds: 0, playhead: 0, chain: Promise.resolve() };
  panel.els.cancel.disabled = false;
  panel.els.progress.hidden = false;
  panel.els.progress.value = 0;
  panel.els.logs.textContent = "";
  const card = el("div", { class: "result", "data-job": job.id });
  panel.els.results.prepend(card);
  panel.card = card;
  const source = new EventSource(`/api/jobs/${job.id}/events`);
  panel.source = source;
  source.addEventListener("job", (e) => update(panel, JSON.parse(e.data)));
}

async function cancelJob(panel) {
  if (!panel.job) return;
  panel.els.cancel.disabled = true;
  await api(`/api/jobs/${panel.job.id}/cancel`, { method: "POST", body: {} });
}

const TERMINAL = ["succeeded", "failed", "canceled"];

function update(panel, job) {
  panel.els.logs.textContent = job.logs || "";
  panel.els.logs.scrollTop = panel.els.logs.scrollHeight;
  const pct = [...(job.logs || "").matchAll(/\((\d+)%\)/g)].pop();
  if (pct) panel.els.progress.value = Number(pct[1]);
  if (panel.server.kind === "train") drawLoss(panel, job);
  if (panel.server.kind === "stream") {  // one at a time, in order: each decodes the new items first
    panel.stream.chain = panel.stream.chain.then(() => streamOutputs(panel, job)).catch((e) => {
      panel.els.message.textContent = `playing a chunk: ${e.message}`;
    });
  }
  if (!TERMINAL.includes(job.status)) return;
  panel.source.close();
  panel.job = null;
  panel.els.send.disabled = false;
  panel.els.cancel.disabled = true;
  panel.els.progress.value = job.status === "succeeded" ? 100 : panel.els.progress.value;
  if (job.status === "failed") showErrors(panel, null, job.error);
  renderResult(panel, job, panel.card);
  refreshHistory();
}

// The streaming model's outputs: chunks (1 s, then 2 s each) as they come, then the whole file. A
// chunk is scheduled on the AudioContext right after the previous one (gapless); the whole file is the
// item whose length is the chunks' sum once they cover the request, and goes into a player instead.
async function streamOutputs(panel, job) {
  const st = panel.stream;
  const items = Array.isArray(job.output) ? job.output : [];
  const done = TERMINAL.includes(job.status);
  while (st.items.length < items.length) {
    const index = st.items.length;
    st.items.push(null);
    const url = items[index];
    const buffer = await decode(await (await fetch(url)).arrayBuffer());
    st.items[index] = { url, buffer };
  }
  // in order: an item is held while it may be the whole file
  for (; st.next < st.items.length && st.items[st.next]; st.next++) {
    const { buffer } = st.items[st.next];
    const mayBeWhole = st.next > 0 && Math.abs(buffer.duration - st.chunkSeconds) < 0.06 &&
      st.chunkSeconds + 0.06 >= requestedSeconds(panel);
    const last = st.next === st.items.length - 1;
    if (mayBeWhole && last && !done) break;  // wait: another item (then it was a chunk) or the end
    if (mayBeWhole && last && done && job.status === "succeeded") { st.next++; break; }
    play(panel, job.id, buffer);
    st.chunkSeconds += buffer.duration;
  }
}

function requestedSeconds(panel) {
  const d = panel.fields.duration ? Number(panel.fields.duration.control.value) : 0;
  return Number.isFinite(d) ? d : 0;
}

function play(panel, jobId, buffer) {
  const ctx = audioContext();
  const src = ctx.createBufferSource();
  src.buffer = buffer;
  src.connect(ctx.destination);
  const st = panel.stream;
  const at = Math.max(ctx.currentTime + 0.02, st.playhead || 0);
  src.start(at);
  st.playhead = at + buffer.duration;
  if (!(jobId in state.firstHeard)) {
    const heard = Date.now() + (at - ctx.currentTime) * 1000;
    state.firstHeard[jobId] = heard;
    api(`/api/jobs/${jobId}/heard`, { method: "POST", body: { at: heard / 1000 } });
    const first = el("p", { class: "hint" }, "playing the first chunk while the rest is generated");
    panel.card.prepend(first);
  }
}

function lossPoints(logs) {
  return [...(logs || "").matchAll(/step (\d+)\/(\d+) \(epoch \d+\): loss ([\d.]+)/g)].map((m) => [Number(m[1]), Number(m[3]), Number(m[2])]);
}

function drawLoss(panel, job) {
  const pts = lossPoints(job.logs);
  let svg = panel.card.querySelector("svg.loss");
  if (!svg) {
    svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
    svg.setAttribute("class", "loss");
    svg.setAttribute("viewBox", "0 0 600 180");
    svg.setAttribute("role", "img");
    panel.card.prepend(el("h3", {}, "Loss"), svg);
  }
  svg.setAttribute("aria-label", `loss curve: ${pts.length} points`);
  svg.setAttribute("data-points", String(pts.length));
  if (!pts.length) return;
  const total = pts[pts.length - 1][2], lo = Math.min(...pts.map((p) => p[1])), hi = Math.max(...pts.map((p) => p[1]));
  const x = (s) => 40 + (s / Math.max(1, total)) * 550, y = (l) => 165 - ((l - lo) / Math.max(1e-9, hi - lo)) * 150;
  svg.innerHTML = `<polyline points="${pts.map((p) => `${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`).join(" ")}"/>` +
    `<text x="2" y="14">${hi.toFixed(3)}</text><text x="2" y="168">${lo.toFixed(3)}</text>` +
    `<text x="540" y="178">step ${pts[pts.length - 1][0]}/${total}</text>`;
}

// A finished job's card: players, downloads, and what can be done with the result.
function renderResult(panel, job, card) {
  card.querySelectorAll(".outcome").forEach((n) => n.remove());
  const box = el("div", { class: "outcome" });
  const took = job.completed_at && job.submitted_at ? ` in ${seconds(job.completed_at - job.submitted_at)}` : "";
  box.append(el("p", {}, `${job.status}${took}`, job.seed !== null ? ` — seed ${job.seed}` : "",
    job.heard_at && job.submitted_at ? ` — first audio at ${seconds(job.heard_at - job.submitted_at)}` : ""));
  if (job.error) box.append(el("p", { class: "message" }, job.error));
  for (const [label, url] of outputFiles(job)) {
    if (/\.(wav|mp3)$/.test(url)) {
      const audio = el("audio", { controls: true, preload: "auto", src: url, loop: panel.server.kind === "loop" || undefined });
      const wave = el("canvas", { class: "wave", width: 600, height: 50, role: "img", "aria-label": `${label}: waveform` });
      box.append(el("div", {}, el("p", { class: "hint" }, label), wave, audio));
      fetch(url).then((r) => r.arrayBuffer()).then(decode).then((b) => drawBuffer(wave, b, null)).catch(() => wave.remove());
    }
    const row = el("div", { class: "row" }, el("a", { href: url, download: url.split("/").pop() }, `Download ${label}`));
    if (/\.(wav|mp3)$/.test(url)) {
      row.append(el("button", { type: "button", onclick: () => sendToMain(url, true) }, "Continue this"));
      row.append(el("button", { type: "button", onclick: () => sendToMain(url, false) }, "Use as melody"));
    }
    box.append(row);
  }
  if (panel.server.kind === "train" && job.status === "succeeded") {
    box.append(el("button", { type: "button", onclick: (e) => serveTrained(job, e.target) }, "Serve this result"));
  }
  card.append(box);
}

function outputFiles(job) {
  const out = job.output;
  if (typeof out === "string") return [["output", out]];
  if (Array.isArray(out)) {
    if (job.kind === "stream") return out.length && job.status === "succeeded" ? [["the whole file", out[out.length - 1]]] : [];
    return out.map((u, i) => [`loop ${i + 1}`, u]);
  }
  if (out && typeof out === "object") return Object.entries(out).filter(([, u]) => typeof u === "string");
  return [];
}

async function sendToMain(url, continuation) {
  const main = state.servers.find((s) => s.kind === "predict");
  if (!main) return;
  const panel = await selectTab(main.name);
  if (panel.fields.continuation) panel.fields.continuation.control.checked = continuation;
  await useAudio(panel, "input_audio", url);
  panel.fields.input_audio?.control.querySelector("input")?.focus();
}

async function serveTrained(job, button) {
  button.disabled = true;
  const r = await api(`/api/jobs/${job.id}/serve`, { method: "POST", body: {} });
  if (r.status !== 200) { button.disabled = false; button.after(el("p", { class: "message" }, r.body?.error || "failed")); return; }
  await loadServers();
  await selectTab(r.body.server.name);
}

// ---------------------------------------------------------------------------------------------
// history

async function refreshHistory() {
  const r = await api("/api/history");
  const list = document.getElementById("history-list");
  list.replaceChildren();
  for (const job of r.body?.jobs || []) {
    const prompt = job.input.prompt || job.input.caption || "";
    const when = new Date(job.created * 1000).toLocaleTimeString();
    const item = el("li", { "data-job": job.id },
      el("strong", {}, `${job.server}`), ` ${when} — ${job.status}`, job.seed !== null ? ` — seed ${job.seed}` : "",
      prompt ? el("div", {}, `“${prompt}”`) : null);
    for (const [label, url] of outputFiles(job)) {
      if (/\.(wav|mp3)$/.test(url)) item.append(el("div", {}, el("audio", { controls: true, preload: "none", src: url })));
      item.append(el("div", { class: "row" }, el("a", { href: url, download: url.split("/").pop() }, `Download ${label}`)));
    }
    const actions = el("div", { class: "row" });
    const server = state.servers.find((s) => s.name === job.server);
    if (server) {
      actions.append(el("button", { type: "button", onclick: async () => fill(await selectTab(server.name), job.input) }, "Reuse inputs"));
      if (job.seed !== null) actions.append(el("button", { type: "button", onclick: async () => fill(await selectTab(server.name), { seed: job.seed }) }, "Reuse seed"));
    }
    const audio = outputFiles(job).find(([, u]) => /\.(wav|mp3)$/.test(u));
    if (audio) actions.append(el("button", { type: "button", onclick: () => sendToMain(audio[1], true) }, "Continue this"));
    item.append(actions);
    list.append(item);
  }
}

// ---------------------------------------------------------------------------------------------
// tabs

async function selectTab(name) {
  for (const b of document.querySelectorAll("#tabs button")) {
    const on = b.dataset.name === name;
    b.setAttribute("aria-selected", String(on));
    b.tabIndex = on ? 0 : -1;
  }
  document.getElementById("history").hidden = name !== "history";
  for (const p of Object.values(state.panels)) p.els.section.hidden = p.server.name !== name;
  if (name === "history") { refreshHistory(); return null; }
  if (!state.opening[name]) {  // once per server, however many clicks arrive while its schema loads
    state.opening[name] = openPanel(state.servers.find((s) => s.name === name));
  }
  const panel = await state.opening[name];
  panel.els.section.hidden = document.querySelector(`#tabs button[data-name="${name}"]`).getAttribute("aria-selected") !== "true";
  return panel;
}

async function loadServers() {
  const r = await api("/api/servers");
  state.servers = r.body.servers;
  state.tiny = r.body.tiny;
  const banner = document.getElementById("banner");
  banner.hidden = !state.tiny;
  banner.textContent = "Tiny random models (the tests' set): the audio is noise, the code is real. " +
    "Fetch real weights with script/download-weights.";
  const tabs = document.getElementById("tabs");
  tabs.replaceChildren();
  const names = [...state.servers.map((s) => [s.name, s.name.startsWith("trained") ? `Trained ${s.name.slice(8)}` : s.title]), ["history", "History"]];
  for (const [name, title] of names) {
    tabs.append(el("button", { role: "tab", id: `tab-${name}`, "data-name": name, "aria-selected": "false",
      "aria-controls": name === "history" ? "history" : `panel-${name}`, onclick: () => selectTab(name) }, title));
  }
}

document.getElementById("tabs").addEventListener("keydown", (e) => {
  if (!["ArrowLeft", "ArrowRight"].includes(e.key)) return;
  const buttons = [...document.querySelectorAll("#tabs button")];
  const i = buttons.indexOf(document.activeElement);
  const next = buttons[(i + (e.key === "ArrowRight" ? 1 : buttons.length - 1)) % buttons.length];
  next.focus();
  selectTab(next.dataset.name);
});

document.addEventListener("keydown", (e) => {
  if (e.key !== "Escape") return;
  const open = Object.values(state.panels).find((p) => !p.els.section.hidden);
  if (open) cancelJob(open);
});

(async () => {
  await loadServers();
  if (state.servers.length) await selectTab(state.servers[0].name);
  refreshHistory();
})();
