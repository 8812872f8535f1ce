// The live state of trio-swap as the UI knows it, kept current by GET /api/events.
//
// One connection for every page: a `snapshot` replaces the models (and starts the
// logs again: the server re-sends their recent history), `model` replaces one row,
// `log` adds a line, `activity` announces a finished request. Pages subscribe with
// on(topic, listener) and read `state` directly.

import { api } from "./api.js";
import { readEvents } from "./sse.js";

/** Lines kept per log in the browser (the server's rings keep 2000 too). */
export const MAX_LOG_LINES = 2000;

export const state = {
  /** Model rows by id, as GET /api/models lists them. */
  models: new Map(),
  version: "",
  swaps: 0,
  /** "connecting" | "live" | "offline" */
  connection: "connecting",
  /** Lines by source: "proxy", "upstream" (every model, prefixed "[id] ") and each model id. */
  logs: new Map(),
  /** The active profile's name, or null (docs/selectors.md). */
  profile: null,
};

const listeners = new Map();

/** Call `listener` on each `topic` event; returns the function that stops it. */
export function on(topic, listener) {
  if (!listeners.has(topic)) listeners.set(topic, new Set());
  listeners.get(topic).add(listener);
  return () => listeners.get(topic).delete(listener);
}

function emit(topic, payload) {
  for (const listener of listeners.get(topic) ?? []) {
    try {
      listener(payload);
    } catch (error) {
      console.error(`listener for ${topic} failed`, error);
    }
  }
}

export function logLines(source) {
  return state.logs.get(source) ?? [];
}

function keep(source, line) {
  let lines = state.logs.get(source);
  if (!lines) state.logs.set(source, (lines = []));
  lines.push(line);
  if (lines.length > MAX_LOG_LINES) lines.splice(0, lines.length - MAX_LOG_LINES);
}

function addLog(source, line) {
  keep(source, line);
  if (source !== "proxy") keep("upstream", `[${source}] ${line}`);
  emit("log", { source, line });
}

function setConnection(value) {
  if (state.connection === value) return;
  state.connection = value;
  emit("connection", value);
}

function handle({ event, data }) {
  const payload = JSON.parse(data);
  switch (event) {
    case "snapshot":
      state.models = new Map(payload.models.map((row) => [row.id, row]));
      state.version = payload.version;
      state.swaps = payload.swaps;
      state.profile = payload.profile ?? null;
      state.logs = new Map();
      emit("models", state.models);
      emit("profile", state.profile);
      emit("logs-reset");
      break;
    case "model":
      state.models.set(payload.id, payload);
      emit("model", payload);
      break;
    case "log":
      addLog(payload.source, payload.line);
      break;
    case "activity":
      emit("activity", payload);
      break;
    case "profile":
      state.profile = payload.active;
      emit("profile", state.profile);
      break;
    default:
      break; // newer servers may send more
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

/** Follow /api/events for as long as the page is open, reconnecting when it drops. */
export async function followEvents() {
  let delay = 500;
  for (;;) {
    const opened = Date.now();
    try {
      setConnection("connecting");
      const response = await api("/api/events", { headers: { Accept: "text/event-stream" } });
      for await (const message of readEvents(response)) {
        setConnection("live");
        handle(message);
      }
    } catch (error) {
      console.warn("event stream failed", error);
    }
    setConnection("offline");
    // An ended stream (a reload of the config, a restart) reconnects at once; one
    // that keeps failing backs off up to 10 s.
    delay = Date.now() - opened > 5000 ? 250 : Math.min(delay * 2, 10000);
    await sleep(delay);
  }
}

/** A model id as a URL path (ids may contain "/"). */
export function modelPath(id) {
  return id.split("/").map(encodeURIComponent).join("/");
}
