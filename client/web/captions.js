// Live captions: microphone -> AudioWorklet -> WebSocket (/v1/stream) -> caption lines.
//
// Plain ES module, no build step and no third-party code. Audio is sent at the
// AudioContext's native rate as pcm_s16le and the server resamples it (see
// capture-worklet.js for why). It follows the resume rule of docs/protocol.md, as the
// Python client does: the audio sent since the last final is kept (30 s at most), and a
// connection that ends before its `done` is followed by another that sends that audio
// again with `offset_s` (the stream time of its first sample, on the page's own audio
// clock: samples captured since Start) and `first_segment`; the server shifts every time
// and segment number it sends by them, so the captions need no arithmetic of their own.

const STREAM_PATH = "/v1/stream";
const FRAME_MS = 100; // audio per binary frame
const MAX_KEEP_S = 30; // audio kept to send (again) on the next connection; older is dropped
const KEY_STORAGE = "whisperstream.apiKey"; // sessionStorage only: gone with the tab
const MAX_RETRY_S = 10;
const STOP_TIMEOUT_MS = 30000; // wait this long for `done` after Stop

// The worklet's source is fetched once, with the page, so that Start still works (and
// can then report the real problem) when the server went away after the page loaded.
const workletUrl = fetch(new URL("capture-worklet.js", import.meta.url))
  .then((r) => (r.ok ? r.text() : Promise.reject(new Error(`HTTP ${r.status}`))))
  .then((code) => URL.createObjectURL(new Blob([code], { type: "text/javascript" })))
  .catch(() => new URL("capture-worklet.js", import.meta.url).href);

const $ = (id) => document.getElementById(id);
const ui = {
  status: $("status"),
  statusText: $("status-text"),
  level: $("level"),
  start: $("start"),
  stop: $("stop"),
  clear: $("clear"),
  large: $("large"),
  txt: $("download-txt"),
  srt: $("download-srt"),
  vtt: $("download-vtt"),
  settings: $("settings"),
  key: $("api-key"),
  message: $("message"),
  captions: $("captions"),
  empty: $("empty"),
  finals: $("finals"),
  provisional: $("provisional"),
};

const PHASE_TEXT = {
  idle: "Not started",
  starting: "Starting the microphone…",
  connecting: "Connecting…",
  live: "Live",
  reconnecting: "Reconnecting…",
  stopping: "Finishing…",
  stopped: "Stopped",
  error: "Stopped",
};

const state = {
  phase: "idle",
  audio: null, // {ctx, stream, source, node}
  rate: 0,
  captured: 0, // samples captured since Start: the page's audio clock
  kept: [], // [{start, pcm}] frames not yet covered by a final: sent, or waiting to be
  resume: 0, // samples: where the next connection takes the stream up (a final's end, `done`)
  nextSegment: 0, // the next connection's first_segment
  connFrom: 0, // samples: the first sample the current connection sends (its offset_s)
  ws: null,
  conn: 0, // id of the current connection; events of older ones are ignored
  ready: false, // the current connection got `ready`
  base: 0, // seconds: page time of sample 0 of this Start (after the captions of earlier ones)
  draining: false, // the server is finishing this connection (a limit): audio waits for the next
  done: false, // the current connection got `done`
  stopRequested: false,
  stopTimer: null,
  retries: 0,
  retryTimer: null,
  finals: [], // {start, end, text, interrupted}
  partial: null, // {conn, segment, stable, text, start, end}
  partials: 0, // partial messages shown since the page loaded
};

// ---------------------------------------------------------------- status and messages

function setPhase(phase, detail) {
  state.phase = phase;
  ui.status.dataset.state = phase;
  document.body.dataset.state = phase;
  ui.statusText.textContent = detail ? `${PHASE_TEXT[phase]} · ${detail}` : PHASE_TEXT[phase];
  const running = !["idle", "stopped", "error"].includes(phase);
  ui.start.disabled = running;
  ui.stop.disabled = !running || phase === "stopping";
  if (!running) setLevel(0, 0);
}

// kind: "error" (needs the user), "warning" (the page is handling it), "info".
// source: "connection" messages are cleared once a connection works again.
function showMessage(text, kind = "error", source = "page") {
  ui.message.textContent = text;
  ui.message.dataset.kind = kind;
  ui.message.dataset.source = source;
  ui.message.hidden = false;
}

function clearMessage(source) {
  if (source && ui.message.dataset.source !== source) return;
  ui.message.hidden = true;
  ui.message.textContent = "";
  delete ui.message.dataset.kind;
  delete ui.message.dataset.source;
}

function setLevel(rms, peak) {
  // dBFS of the RMS mapped from -60..0 dB to 0..100 %, the peak nudging it up.
  const db = 20 * Math.log10(Math.max(rms, peak / 4, 1e-6));
  const pct = Math.max(0, Math.min(100, ((db + 60) / 60) * 100));
  ui.level.style.width = `${pct.toFixed(0)}%`;
  ui.level.dataset.hot = peak > 0.98 ? "true" : "false";
}

// ---------------------------------------------------------------- captions

function fmtClock(t) {
  const m = Math.floor(t / 60);
  const s = t - m * 60;
  return `${String(m).padStart(2, "0")}:${s.toFixed(2).padStart(5, "0")}`;
}

function fmtStamp(t, sep) {
  const ms = Math.max(0, Math.round(t * 1000));
  const h = Math.floor(ms / 3600000);
  const m = Math.floor((ms % 3600000) / 60000);
  const s = Math.floor((ms % 60000) / 1000);
  const pad = (n, w = 2) => String(n).padStart(w, "0");
  return `${pad(h)}:${pad(m)}:${pad(s)}${sep}${pad(ms % 1000, 3)}`;
}

function addFinal(line) {
  state.finals.push(line);
  const li = document.createElement("li");
  if (line.interrupted) {
    li.className = "interrupted";
    li.title = "The connection dropped before this line was final";
  }
  const time = document.createElement("span");
  time.className = "times";
  time.textContent = `${fmtClock(line.start)} → ${fmtClock(line.end)}`;
  const text = document.createElement("span");
  text.className = "text";
  text.textContent = line.text;
  li.append(time, " ", text);
  ui.finals.append(li);
  updateCaptionChrome();
}

function renderPartial() {
  const p = state.partial;
  if (!p || !p.text) {
    ui.provisional.hidden = true;
    ui.provisional.firstElementChild.textContent = "";
    ui.provisional.lastElementChild.textContent = "";
  } else {
    const stable = p.text.startsWith(p.stable) ? p.stable : "";
    ui.provisional.firstElementChild.textContent = stable;
    ui.provisional.lastElementChild.textContent = p.text.slice(stable.length);
    ui.provisional.hidden = false;
  }
  updateCaptionChrome();
}

function updateCaptionChrome() {
  const any = state.finals.length > 0;
  ui.empty.hidden = any || !ui.provisional.hidden;
  ui.txt.disabled = ui.srt.disabled = ui.vtt.disabled = !any;
  document.body.dataset.finals = String(state.finals.length);
  document.body.dataset.partials = String(state.partials);
  // Follow the newest line unless the reader scrolled up.
  const box = ui.captions;
  if (box.scrollHeight - box.scrollTop - box.clientHeight < 160) {
    box.scrollTop = box.scrollHeight;
  }
}

// Keep provisional words that will never become final (the page stopped before the
// server finished them; when it reconnects, their audio is sent again instead).
function keepPartial() {
  const p = state.partial;
  state.partial = null;
  if (p && p.text.trim()) {
    addFinal({ start: p.start, end: p.end, text: p.text.trim(), interrupted: true });
  }
  renderPartial();
}

function clearCaptions() {
  state.finals = [];
  state.partial = null;
  ui.finals.replaceChildren();
  renderPartial();
  clearMessage("page");
}

// ---------------------------------------------------------------- downloads

function transcriptText() {
  return state.finals.map((f) => f.text).join("\n") + "\n";
}

function transcriptSrt() {
  return state.finals
    .map((f, i) => `${i + 1}\n${fmtStamp(f.start, ",")} --> ${fmtStamp(f.end, ",")}\n${f.text}\n`)
    .join("\n");
}

function transcriptVtt() {
  const cues = state.finals.map(
    (f) => `${fmtStamp(f.start, ".")} --> ${fmtStamp(f.end, ".")}\n${f.text}\n`,
  );
  return ["WEBVTT\n", ...cues].join("\n");
}

function download(kind) {
  const [body, type] = {
    txt: [transcriptText, "text/plain"],
    srt: [transcriptSrt, "application/x-subrip"],
    vtt: [transcriptVtt, "text/vtt"],
  }[kind];
  const stamp = new Date().toISOString().slice(0, 16).replace(/[:T]/g, "-");
  const url = URL.createObjectURL(new Blob([body()], { type: `${type};charset=utf-8` }));
  const a = document.createElement("a");
  a.href = url;
  a.download = `captions-${stamp}.${kind}`;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10000);
}

// ---------------------------------------------------------------- audio

class MicError extends Error {}

function micMessage(err) {
  switch (err && err.name) {
    case "NotAllowedError":
    case "SecurityError":
      return "Microphone access was denied. Allow the microphone for this site (the icon " +
        "in the address bar), then press Start again.";
    case "NotFoundError":
    case "OverconstrainedError":
      return "No microphone was found. Connect one, then press Start again.";
    case "NotReadableError":
    case "AbortError":
      return "The microphone could not be opened; another program may be using it.";
    default:
      return `The microphone could not be started: ${err && err.message ? err.message : err}`;
  }
}

async function startAudio() {
  if (!window.isSecureContext || !navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new MicError("This browser only allows the microphone on https:// pages or on " +
      "localhost. Open the page at http://localhost:PORT/ or serve it over TLS.");
  }
  let stream;
  try {
    stream = await navigator.mediaDevices.getUserMedia({
      // The raw microphone: Whisper wants the speech as it is. Browser processing was
      // made for calls: noise suppression and echo cancellation smear words, and the gain
      // control pumps the level and drives loud speech into its limiter.
      audio: { channelCount: 1, echoCancellation: false, noiseSuppression: false,
        autoGainControl: false },
    });
  } catch (err) {
    throw new MicError(micMessage(err));
  }
  let ctx = new AudioContext({ latencyHint: "interactive" });
  if (ctx.sampleRate > 48000 || ctx.sampleRate < 8000) {
    // The server takes 8-48 kHz; let the browser resample anything outside.
    await ctx.close();
    ctx = new AudioContext({ latencyHint: "interactive", sampleRate: 48000 });
  }
  try {
    await ctx.audioWorklet.addModule(await workletUrl);
    await ctx.resume();
    const source = ctx.createMediaStreamSource(stream);
    const node = new AudioWorkletNode(ctx, "whisperstream-capture", {
      numberOfInputs: 1,
      numberOfOutputs: 1,
      outputChannelCount: [1],
      channelCount: 1,
      channelCountMode: "explicit", // a stereo microphone is mixed down to mono
      channelInterpretation: "speakers",
      processorOptions: { frameMs: FRAME_MS },
    });
    node.port.onmessage = (event) => onFrame(event.data);
    source.connect(node);
    node.connect(ctx.destination); // keeps the graph pulling; the node outputs silence
    for (const track of stream.getAudioTracks()) {
      track.addEventListener("ended", () => {
        if (state.audio && state.audio.stream === stream && !state.stopRequested) {
          showMessage("The microphone stopped (unplugged or taken away). Press Start " +
            "to continue.");
          stop();
        }
      });
    }
    state.audio = { ctx, stream, source, node, flushed: null };
    state.rate = ctx.sampleRate;
  } catch (err) {
    for (const track of stream.getTracks()) track.stop();
    await ctx.close();
    throw new MicError(`Audio processing could not start: ${err.message || err}`);
  }
}

// Stop capturing; resolves once the worklet has handed over its last partial frame.
async function stopAudio() {
  const audio = state.audio;
  if (!audio) return;
  await new Promise((resolve) => {
    audio.flushed = resolve;
    audio.node.port.postMessage("stop");
    setTimeout(resolve, 500);
  });
  state.audio = null;
  audio.source.disconnect();
  audio.node.disconnect();
  audio.node.port.onmessage = null;
  for (const track of audio.stream.getTracks()) track.stop();
  await audio.ctx.close().catch(() => {});
  setLevel(0, 0);
}

function onFrame(data) {
  if (data.pcm) {
    const frame = { start: state.captured, pcm: data.pcm };
    state.captured += data.pcm.byteLength / 2;
    setLevel(data.rms, data.peak);
    if (!state.stopRequested || isStreaming()) {
      state.kept.push(frame);
      const keep = MAX_KEEP_S * state.rate;
      while (state.kept.length && state.captured - state.kept[0].start > keep) {
        state.kept.shift();
      }
    }
    if (isStreaming()) state.ws.send(frame.pcm);
  }
  if (data.stopped && state.audio && state.audio.flushed) state.audio.flushed();
}

// ---------------------------------------------------------------- connection

function isStreaming() {
  return state.ws !== null && state.ready && !state.draining &&
    state.ws.readyState === WebSocket.OPEN;
}

function apiKey() {
  return ui.key.value.trim();
}

// The first sample the next connection sends: where the stream resumes, unless the audio
// from there was dropped (more than MAX_KEEP_S), then the oldest kept.
function resendFrom() {
  return state.kept.length ? Math.max(state.resume, state.kept[0].start) : state.captured;
}

function streamUrl() {
  const scheme = location.protocol === "https:" ? "wss:" : "ws:";
  const params = new URLSearchParams({
    sample_rate: String(state.rate),
    encoding: "pcm_s16le",
    interim: "true",
  });
  state.connFrom = resendFrom(); // what `ready` sends from, on the clock of offset_s
  const offset = state.base + state.connFrom / state.rate;
  if (offset > 0 || state.nextSegment > 0) {
    params.set("offset_s", offset.toFixed(6));
    params.set("first_segment", String(state.nextSegment));
  }
  if (apiKey()) params.set("token", apiKey());
  return `${scheme}//${location.host}${STREAM_PATH}?${params}`;
}

function connect() {
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  const conn = ++state.conn;
  state.ready = false;
  state.done = false;
  state.draining = false;
  let opened = false;
  setPhase(state.retries ? "reconnecting" : "connecting");
  let ws;
  try {
    ws = new WebSocket(streamUrl());
  } catch (err) {
    showMessage(`Cannot open a connection to the server: ${err.message || err}`);
    abandon();
    return;
  }
  ws.binaryType = "arraybuffer";
  state.ws = ws;
  ws.onopen = () => { opened = true; };
  ws.onmessage = (event) => {
    if (conn !== state.conn || typeof event.data !== "string") return;
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      return;
    }
    onMessage(message);
  };
  ws.onclose = (event) => {
    if (conn === state.conn) onClose(event, opened);
  };
}

function onMessage(m) {
  switch (m.type) {
    case "ready": {
      state.ready = true;
      state.retries = 0;
      const from = state.connFrom;
      for (const frame of state.kept) {
        const end = frame.start + frame.pcm.byteLength / 2;
        if (end <= from) continue;
        state.ws.send(frame.start >= from ? frame.pcm : frame.pcm.slice((from - frame.start) * 2));
      }
      clearMessage("connection");
      setPhase("live", m.model);
      if (state.stopRequested) finishStop();
      break;
    }
    case "partial": {
      state.partials += 1;
      state.partial = {
        conn: state.conn,
        segment: m.segment,
        stable: m.stable || "",
        text: (m.text || "").trimStart(),
        start: m.start,
        end: m.end,
      };
      state.partial.stable = state.partial.stable.trimStart();
      renderPartial();
      break;
    }
    case "final": {
      const p = state.partial;
      if (p && p.conn === state.conn && p.segment <= m.segment) state.partial = null;
      const text = (m.text || "").trim();
      if (text) addFinal({ start: m.start, end: m.end, text });
      renderPartial();
      resumeAt(m.end, m.segment + 1);
      break;
    }
    case "speech_start":
      ui.status.dataset.speech = "true";
      break;
    case "speech_end":
      ui.status.dataset.speech = "false";
      break;
    case "error":
      if (m.code === "limit" && !state.stopRequested) {
        // The server is finishing this session (e.g. limits.max_session_s): hold the audio
        // back for a new session, which starts as soon as this one is `done`.
        state.draining = true;
        showMessage(`Server: ${m.message}. Continuing in a new session.`, "warning",
          "connection");
      } else if (!state.draining) {
        showMessage(`Server error (${m.code}): ${m.message}`, "error", "server");
      }
      break;
    case "done":
      // Also when the server ended the session itself (a drain, a limit): the next
      // connection goes on from the audio it heard.
      state.done = true;
      resumeAt(m.audio_seconds, m.segments);
      break;
    default:
      break; // newer protocol messages are welcome and ignored
  }
}

// The stream is transcribed up to page time `t`: audio before it need not be sent again.
function resumeAt(t, nextSegment) {
  state.resume = Math.max(state.resume, Math.round((t - state.base) * state.rate));
  state.nextSegment = Math.max(state.nextSegment, nextSegment);
  while (state.kept.length &&
    state.kept[0].start + state.kept[0].pcm.byteLength / 2 <= state.resume) {
    state.kept.shift();
  }
}

async function onClose(event, opened) {
  const wasReady = state.ready;
  state.ws = null;
  state.ready = false;
  delete ui.status.dataset.speech;
  if (state.stopRequested) {
    if (!state.done) keepPartial();
    clearTimeout(state.stopTimer);
    if (!state.done && wasReady) {
      showMessage("The connection closed before the server finished; the last words may " +
        "be missing.", "warning");
    }
    setPhase("stopped");
    return;
  }
  if (!opened) {
    await diagnose();
    return;
  }
  if (event.code === 4400 || event.code === 1008) {
    // The server cannot go on with what this page sent: reconnecting would repeat it.
    if (ui.message.dataset.source !== "server") {
      showMessage(`The server ended the session: ${event.reason || `close code ${event.code}`}`);
    }
    await abandon();
    return;
  }
  // Dropped (network, server restart, a limit, an internal error): keep the captions and
  // the audio since the last final, and connect again; the provisional words will be
  // heard again from that audio. After a clean end (`done`) go on at once.
  state.partial = null;
  renderPartial();
  const delay = state.done || state.draining ? 0 : retryDelay();
  if (!state.done && !state.draining) {
    showMessage(`The connection to the server was lost${event.code !== 1006 ? ` (close code ` +
      `${event.code})` : ""}. Reconnecting${delay ? ` in ${delay} s` : ""}; captions so far ` +
      "are kept.", "warning", "connection");
  }
  scheduleRetry(delay);
}

// A WebSocket that never opened tells the page nothing about why (the HTTP status of a
// refused upgrade is hidden from scripts), so ask the same URL over plain HTTP: the
// server answers it with the status it refused the upgrade with (401 a wrong key, 403 an
// origin it does not allow, 429 too many sessions from here, 503 busy or shutting down).
async function diagnose() {
  const probe = new URL(STREAM_PATH, location.href);
  if (apiKey()) probe.searchParams.set("token", apiKey());
  let response;
  try {
    response = await fetch(probe, { cache: "no-store" });
  } catch {
    response = null;
  }
  if (state.stopRequested) return;
  const why = response ? (await response.text().catch(() => "")).trim() : "";
  const delay = retryDelay();
  if (response === null) {
    showMessage(`Cannot reach the server at ${location.host}: it is down or unreachable. ` +
      `Retrying in ${delay} s; press Stop to give up.`, "error", "connection");
    scheduleRetry(delay);
  } else if (response.status === 401) {
    showMessage(apiKey()
      ? "The server refused the API key. Check the key under Settings, then press Start again."
      : "The server requires an API key. Enter it under Settings, then press Start again.",
    "error", "auth");
    ui.settings.open = true;
    await abandon();
    ui.key.focus();
  } else if (response.status === 403) {
    showMessage(`The server refused this page${why ? `: ${why}` : ""}.`, "error", "auth");
    await abandon();
  } else if (response.status === 429 || response.status === 503) {
    showMessage(`The server cannot take this session now${why ? ` (${why})` : ""}. ` +
      `Retrying in ${delay} s.`, "warning", "connection");
    scheduleRetry(delay);
  } else {
    showMessage("The server is up but the WebSocket connection failed (a proxy may not " +
      "forward WebSockets, or the server does not accept this page's origin: " +
      `auth.allowed_origins). Retrying in ${delay} s.`, "error", "connection");
    scheduleRetry(delay);
  }
}

function retryDelay() {
  return Math.min(MAX_RETRY_S, 0.5 * 2 ** state.retries);
}

function scheduleRetry(delay) {
  state.retries += 1;
  setPhase("reconnecting", delay ? `next try in ${delay} s` : "");
  clearTimeout(state.retryTimer);
  state.retryTimer = setTimeout(connect, delay * 1000);
}

// Give up: no more retries, no more audio.
async function abandon() {
  state.conn += 1; // events of the closing connection no longer count
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  state.stopRequested = true;
  state.kept = [];
  const ws = state.ws;
  state.ws = null;
  if (ws) ws.close();
  await stopAudio();
  setPhase("error");
}

// ---------------------------------------------------------------- start / stop

async function start() {
  clearMessage();
  state.stopRequested = false;
  state.retries = 0;
  state.captured = 0;
  state.kept = [];
  state.resume = 0;
  // Captions already on the page stay; new times continue after the last one.
  state.base = state.finals.length ? Math.ceil(state.finals[state.finals.length - 1].end) : 0;
  setPhase("starting");
  try {
    await startAudio();
  } catch (err) {
    showMessage(err instanceof MicError ? err.message : String(err));
    setPhase("error");
    return;
  }
  if (state.stopRequested) {
    await stopAudio();
    return;
  }
  connect();
}

async function stop() {
  if (state.stopRequested) return;
  state.stopRequested = true;
  clearTimeout(state.retryTimer);
  state.retryTimer = null;
  setPhase("stopping");
  await stopAudio(); // the worklet's last frame is sent before `stop`
  finishStop();
}

function finishStop() {
  if (state.audio) return; // stop() finishes once the audio is off
  state.kept = []; // sent, or never to be: after Stop the page does not reconnect
  if (isStreaming()) {
    // The server sends the remaining finals, then `done`, then closes (onClose).
    state.ws.send(JSON.stringify({ type: "stop" }));
    clearTimeout(state.stopTimer);
    state.stopTimer = setTimeout(() => state.ws && state.ws.close(), STOP_TIMEOUT_MS);
  } else if (state.draining && state.ws) {
    // The server is already finishing this session; it closes after `done` (onClose).
    clearTimeout(state.stopTimer);
    state.stopTimer = setTimeout(() => state.ws && state.ws.close(), STOP_TIMEOUT_MS);
  } else {
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close();
    keepPartial();
    setPhase("stopped");
  }
}

// ---------------------------------------------------------------- wiring

function toggleLarge(on) {
  const large = on ?? !document.body.classList.contains("large");
  document.body.classList.toggle("large", large);
  ui.large.setAttribute("aria-pressed", String(large));
  ui.large.textContent = large ? "Leave large captions" : "Large captions";
  ui.captions.scrollTop = ui.captions.scrollHeight;
}

ui.start.addEventListener("click", start);
ui.stop.addEventListener("click", stop);
ui.clear.addEventListener("click", clearCaptions);
ui.large.addEventListener("click", () => toggleLarge());
ui.txt.addEventListener("click", () => download("txt"));
ui.srt.addEventListener("click", () => download("srt"));
ui.vtt.addEventListener("click", () => download("vtt"));
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && document.body.classList.contains("large")) toggleLarge(false);
});

try {
  ui.key.value = sessionStorage.getItem(KEY_STORAGE) || "";
} catch {
  // storage disabled: the key lives in the field only
}
ui.key.addEventListener("input", () => {
  try {
    if (apiKey()) sessionStorage.setItem(KEY_STORAGE, apiKey());
    else sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled
  }
});
if (!location.host) {
  showMessage("Open this page from the whisperstream server (http://HOST:PORT/), not as a file.");
  ui.start.disabled = true;
}
setPhase("idle");
updateCaptionChrome();
document.documentElement.dataset.ready = "true";
