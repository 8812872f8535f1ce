// Timeline: what each model's process did lately (GET /api/timeline): one lane per
// model with its loading / ready / sleeping / stopping bands, a mark at each stop saying why,
// and a summary line (loads, evictions, time spent loading) for the window.
//
// Live: fetched every few seconds and soon after any model row changes in the feed;
// between fetches the open bands grow with the clock. Elements are kept across
// redraws (keyed by model and band start), so a tooltip being read stays open.

import { ApiError, apiJson } from "../api.js";
import { clockTime, h, seconds } from "../dom.js";
import { navigate } from "../router.js";
import { on, state } from "../store.js";

export const title = "Timeline";

const WINDOWS = {
  "15m": { seconds: 15 * 60, label: "15 min", tick: 5 * 60, words: "the last 15 minutes" },
  "1h": { seconds: 60 * 60, label: "1 h", tick: 10 * 60, words: "the last hour" },
};
const DEFAULT_WINDOW = "1h";
/** How often the bands are fetched again, and how often open ones are redrawn. */
const REFRESH_MS = 5000;
const REDRAW_MS = 1000;
/** A burst of model events (a swap changes several rows) costs one fetch. */
const EVENT_DELAY_MS = 300;

/** The words of trio-swap's stop reasons (reasons.py). */
const STOP_WORDS = {
  swap: "evicted by a swap",
  ttl: "ttl expired",
  unload: "unloaded",
  abandoned: "no request waited for it any more",
  reload: "changed or removed by a config reload",
  "left the config": "left the config",
  shutdown: "trio-swap shut down",
};

function duration(band, now) {
  return seconds((band.end ?? now) - band.start);
}

function bandTitle(band, now) {
  const end = band.end === null ? "now" : clockTime(band.end);
  const lines = [`${band.state} ${clockTime(band.start)} – ${end} (${duration(band, now)})`];
  if (band.reason === "failed") lines.push("the start failed");
  else if (band.reason === "crashed") lines.push("the process crashed");
  else if (band.reason) lines.push(STOP_WORDS[band.reason] ?? band.reason);
  if (band.evicted_by) lines.push(`to make room for ${band.evicted_by}`);
  if (band.why) lines.push(band.why);
  return lines.join("\n");
}

/** The mark a band leaves on its lane, if any: where, what kind, and its tooltip. */
function markOf(band, now) {
  if (band.state === "stopping" && band.asleep) return null; // its sleep left the mark
  if (band.state === "stopping" || band.state === "sleeping") {
    const stopWords = STOP_WORDS[band.reason] ?? band.reason ?? "stopped";
    const words = band.state === "sleeping" ? `asleep (${stopWords})` : stopWords;
    const who = band.evicted_by ? ` for ${band.evicted_by}` : "";
    const why = band.why ? `\n${band.why}` : "";
    return { at: band.start, kind: "stop", title: `${clockTime(band.start)}: ${words}${who}${why}` };
  }
  if (band.reason === "crashed" || band.reason === "failed") {
    const at = band.end ?? now;
    const words = band.reason === "crashed" ? "crashed" : "failed to start";
    return { at, kind: band.reason, title: `${clockTime(at)}: ${words}` };
  }
  return null;
}

function summaryText(counts, range) {
  if (!counts) return "";
  const parts = [`${counts.loads} load${counts.loads === 1 ? "" : "s"}`];
  if (counts.failed_loads) parts[0] += ` (${counts.failed_loads} failed)`;
  parts.push(`${counts.evictions} eviction${counts.evictions === 1 ? "" : "s"}`);
  if (counts.crashes) parts.push(`${counts.crashes} crash${counts.crashes === 1 ? "" : "es"}`);
  parts.push(`${seconds(counts.loading_seconds)} spent loading`);
  return `${parts.join(" · ")} in ${range.words}`;
}

export function mount(root, params) {
  const windowName = WINDOWS[params.get("window")] ? params.get("window") : DEFAULT_WINDOW;
  const range = WINDOWS[windowName];

  const banner = h("div", { class: "error-banner", hidden: true, role: "alert" });
  const summary = h("span", { class: "muted", id: "timeline-summary" });
  const toggle = h(
    "div",
    { class: "segmented", role: "group", "aria-label": "time window" },
    Object.entries(WINDOWS).map(([name, choice]) =>
      h(
        "button",
        {
          type: "button",
          "aria-pressed": String(name === windowName),
          onclick: () => navigate(`/ui/timeline?window=${name}`, { replace: true }),
        },
        choice.label,
      ),
    ),
  );
  const ticks = h("div", { class: "tl-track tl-ticks" });
  const lanes = h("div", { class: "tl-lanes", id: "timeline" });
  const empty = h("div", { class: "empty" }, "Loading…");
  const swatch = (kind) => h("span", { class: "tl-swatch", dataset: { state: kind } });
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Timeline"), toggle, summary),
    banner,
    h(
      "div",
      { class: "panel timeline" },
      h("div", { class: "tl-lane tl-axis" }, h("div", { class: "tl-label" }), ticks),
      lanes,
      empty,
    ),
    h(
      "div",
      { class: "tl-legend muted small" },
      swatch("loading"), "loading",
      swatch("ready"), "ready",
      swatch("stopping"), "stopping",
      swatch("sleeping"), "asleep",
      h("span", { class: "tl-mark", dataset: { kind: "stop" } }), "stopped (hover for why)",
      h("span", { class: "tl-mark", dataset: { kind: "crashed" } }), "crashed or failed",
    ),
  );

  /** The last answer of GET /api/timeline. */
  let data = null;
  /** Server clock minus this browser's, in seconds (bands are in the server's time). */
  let offset = 0;
  /** Model id -> {lane, track, items: Map(key -> element)}. */
  const drawn = new Map();
  let gone = false;
  let fetching = false;
  let again = false;

  const serverNow = () => Date.now() / 1000 + offset;

  async function refresh() {
    if (fetching) {
      again = true;
      return;
    }
    fetching = true;
    try {
      const since = serverNow() - range.seconds;
      const answer = await apiJson(`/api/timeline?since=${since.toFixed(3)}`);
      if (gone) return;
      offset = answer.now - Date.now() / 1000;
      data = answer;
      banner.hidden = true;
      draw();
    } catch (error) {
      if (gone) return;
      banner.hidden = false;
      banner.textContent =
        error instanceof ApiError && error.status === 404
          ? "This trio-swap keeps no timeline (GET /api/timeline is missing)."
          : `Could not read the timeline: ${error.message}`;
    } finally {
      fetching = false;
      if (again && !gone) {
        again = false;
        refresh();
      }
    }
  }

  /** Models in the config's order, then any the timeline still has (removed by a reload). */
  function laneModels() {
    const models = [...state.models.keys()];
    for (const lane of data?.lanes ?? []) if (!state.models.has(lane.model)) models.push(lane.model);
    return models;
  }

  function drawTicks(left, now) {
    const labels = [];
    // None right at the edges, where its label would stick out of the track.
    const first = Math.ceil((left + range.seconds * 0.03) / range.tick) * range.tick;
    for (let t = first; t <= now - range.seconds * 0.04; t += range.tick) {
      const label = new Date(t * 1000).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" });
      const tick = h("span", { class: "tl-tick" }, label);
      tick.style.left = `${((t - left) / range.seconds) * 100}%`;
      labels.push(tick);
    }
    ticks.replaceChildren(...labels);
  }

  function laneFor(model) {
    let entry = drawn.get(model);
    if (!entry) {
      const track = h("div", { class: "tl-track" });
      const lane = h(
        "div",
        { class: "tl-lane", dataset: { model } },
        h("div", { class: "tl-label model-id", title: model }, model),
        track,
      );
      entry = { lane, track, items: new Map() };
      drawn.set(model, entry);
    }
    return entry;
  }

  /** The element for `key` on a lane, made by `make` the first time. */
  function item(entry, seen, key, make) {
    seen.add(key);
    let element = entry.items.get(key);
    if (!element) {
      element = make();
      entry.items.set(key, element);
      entry.track.append(element);
    }
    return element;
  }

  /** Positions go through element.style (CSSOM): the CSP forbids style attributes. */
  function placeBand(element, from, to, left, now) {
    const start = Math.max(from, left);
    const end = Math.min(to, now);
    element.style.left = `${((start - left) / range.seconds) * 100}%`;
    element.style.width = `${(Math.max(0, end - start) / range.seconds) * 100}%`;
  }

  function placeMark(element, at, left) {
    element.style.left = `${((at - left) / range.seconds) * 100}%`;
  }

  function draw() {
    if (!data) return;
    const now = serverNow();
    const left = now - range.seconds;
    drawTicks(left, now);
    const bandsByModel = new Map((data.lanes ?? []).map((lane) => [lane.model, lane.bands]));
    const models = laneModels();
    models.forEach((model, index) => {
      const entry = laneFor(model);
      if (lanes.children[index] !== entry.lane) lanes.insertBefore(entry.lane, lanes.children[index] ?? null);
      const seen = new Set();
      for (const band of bandsByModel.get(model) ?? []) {
        if ((band.end ?? now) < left) continue;
        const element = item(entry, seen, `band ${band.start}`, () => h("div", { class: "tl-band" }));
        element.dataset.state = band.state;
        element.dataset.open = String(band.end === null);
        if (band.reason) element.dataset.reason = band.reason;
        element.title = bandTitle(band, now);
        placeBand(element, band.start, band.end ?? now, left, now);
        const mark = markOf(band, now);
        if (mark && mark.at >= left) {
          const marker = item(entry, seen, `mark ${band.start}`, () => h("span", { class: "tl-mark" }));
          marker.dataset.kind = mark.kind;
          if (band.reason) marker.dataset.reason = band.reason;
          if (band.evicted_by) marker.dataset.evictedBy = band.evicted_by;
          marker.title = mark.title;
          placeMark(marker, mark.at, left);
        }
      }
      for (const [key, element] of entry.items) {
        if (!seen.has(key)) {
          element.remove();
          entry.items.delete(key);
        }
      }
    });
    for (const [model, entry] of drawn) {
      if (!models.includes(model)) {
        entry.lane.remove();
        drawn.delete(model);
      }
    }
    summary.textContent = summaryText(data.counts, range);
    empty.hidden = models.length > 0;
    empty.textContent = "No models configured.";
  }

  let soon = null;
  const refreshSoon = () => {
    clearTimeout(soon);
    soon = setTimeout(refresh, EVENT_DELAY_MS);
  };
  const timers = [setInterval(refresh, REFRESH_MS), setInterval(draw, REDRAW_MS)];
  const stops = [on("models", refreshSoon), on("model", refreshSoon)];
  refresh();
  return () => {
    gone = true;
    clearTimeout(soon);
    timers.forEach(clearInterval);
    stops.forEach((stop) => stop());
  };
}
