// The Memory panel of the Models page (GET /api/fit): one bar per resource of the
// config's `resources`, as long as its capacity, with a segment per running model
// sized by what trio-swap reserves for it (its effective need, filled as far as it was
// last measured using), and what is left free.
//
// Hidden when trio-swap does not fit by memory (`enabled` false, or no /api/fit at
// all). Fetched every few seconds (footprints are measured while models run) and soon
// after a model row changes in the feed. Elements are kept across updates (keyed by
// resource and model), so a tooltip being read stays open.

import { ApiError, apiJson } from "./api.js";
import { bytes, h, seconds } from "./dom.js";
import { on } from "./store.js";

const REFRESH_MS = 5000;
const EVENT_DELAY_MS = 300;

/** Where a need comes from (`basis` in /api/fit). */
const BASIS_WORDS = {
  declared: "declared in the config",
  measured: "measured peak plus margin",
  estimated: "estimated from its model files",
  unknown: "unknown until measured",
};

function percent(part, whole) {
  return `${whole > 0 ? Math.min(100, (part / whole) * 100) : 0}%`;
}

function shareTitle(model, name, need, used) {
  const lines = [
    `${model.id} (${model.state})`,
    `needs ${bytes(need)} of ${name}: ${BASIS_WORDS[model.basis?.[name]] ?? "basis unknown"}`,
    used === null ? "not measured yet" : `last measured using ${bytes(used)}`,
  ];
  if (model.load_seconds != null) lines.push(`loads in ${seconds(model.load_seconds)} on average`);
  return lines.join("\n");
}

/** The panel element and `stop()`, which ends its timers and listeners. */
export function memoryPanel() {
  const bars = h("div", { class: "mem-bars" });
  const panel = h(
    "section",
    { class: "panel memory", id: "memory", hidden: true, "aria-label": "Memory" },
    h(
      "div",
      { class: "panel-head" },
      h("h2", {}, "Memory"),
      h("span", { class: "muted small" }, "what each running model needs of each resource; the fill is what it was last measured using"),
    ),
    bars,
  );
  /** Resource name -> {row, summary, bar, free, segments: Map(model id -> {element, used, label})}. */
  const drawn = new Map();
  let gone = false;
  let missing = false;

  function rowFor(name) {
    let entry = drawn.get(name);
    if (!entry) {
      const summary = h("span", { class: "muted small" });
      const free = h("div", { class: "mem-free" });
      const bar = h("div", { class: "mem-bar" }, free);
      const row = h(
        "div",
        { class: "mem-row", dataset: { resource: name } },
        h("div", { class: "mem-head" }, h("span", { class: "mem-name mono" }, name), summary),
        bar,
      );
      entry = { row, summary, bar, free, segments: new Map() };
      drawn.set(name, entry);
    }
    return entry;
  }

  function segmentFor(entry, id) {
    let segment = entry.segments.get(id);
    if (!segment) {
      const used = h("span", { class: "mem-used" });
      const label = h("span", { class: "mem-label" });
      const element = h("div", { class: "mem-seg", dataset: { model: id } }, used, label);
      segment = { element, used, label };
      entry.segments.set(id, segment);
      entry.bar.insertBefore(element, entry.free);
    }
    return segment;
  }

  function drawResource(name, resource, running) {
    const entry = rowFor(name);
    const shares = running
      .filter((model) => (model.needs?.[name] ?? 0) > 0)
      .map((model) => ({ model, need: model.needs[name], used: model.footprint?.[name] ?? null }));
    const needed = shares.reduce((total, share) => total + share.need, 0);
    const capacity = resource.capacity;
    const scale = Math.max(capacity, needed);
    const free = Math.max(0, capacity - needed);
    const seen = new Set();
    for (const { model, need, used } of shares) {
      seen.add(model.id);
      const segment = segmentFor(entry, model.id);
      const element = segment.element;
      element.dataset.state = model.state;
      element.dataset.basis = model.basis?.[name] ?? "unknown";
      element.style.width = percent(need, scale); // CSSOM: the CSP forbids style attributes
      segment.used.style.width = used === null ? "0%" : percent(used, need);
      segment.label.textContent = `${model.id} ${used === null ? "" : `${bytes(used)} / `}${bytes(need)}`;
      element.title = shareTitle(model, name, need, used);
    }
    for (const [id, segment] of entry.segments) {
      if (!seen.has(id)) {
        segment.element.remove();
        entry.segments.delete(id);
      }
    }
    entry.free.style.width = percent(free, scale);
    entry.free.textContent = free > 0 ? `${bytes(free)} free` : "";
    entry.free.title = `${bytes(free)} of ${bytes(capacity)} free`;
    entry.row.classList.toggle("over", needed > capacity);
    const over = needed > capacity ? ` · over by ${bytes(needed - capacity)}` : "";
    entry.summary.textContent =
      `${bytes(capacity)} · ${bytes(resource.reserved)} reserved · ${bytes(resource.used)} measured in use${over}`;
    return entry.row;
  }

  function draw(fit) {
    const resources = Object.entries(fit.resources ?? {});
    if (!fit.enabled || resources.length === 0) {
      panel.hidden = true;
      return;
    }
    const running = (fit.models ?? []).filter((model) => model.state !== "stopped");
    const rows = resources.map(([name, resource]) => drawResource(name, resource, running));
    for (const name of [...drawn.keys()]) {
      if (!fit.resources[name]) drawn.delete(name);
    }
    rows.forEach((row, index) => {
      if (bars.children[index] !== row) bars.insertBefore(row, bars.children[index] ?? null);
    });
    while (bars.children.length > rows.length) bars.lastElementChild.remove();
    panel.hidden = false;
  }

  async function refresh() {
    if (missing) return;
    try {
      const fit = await apiJson("/api/fit");
      if (!gone) draw(fit);
    } catch (error) {
      if (gone) return;
      panel.hidden = true;
      // No route: an older trio-swap, or fit not built in. Asked again after a reconnect.
      if (error instanceof ApiError && error.status === 404) missing = true;
      else console.warn("GET /api/fit failed", error);
    }
  }

  let soon = null;
  const refreshSoon = () => {
    clearTimeout(soon);
    soon = setTimeout(refresh, EVENT_DELAY_MS);
  };
  const timer = setInterval(refresh, REFRESH_MS);
  const stops = [
    on("models", () => {
      missing = false; // a new snapshot: trio-swap may have restarted or reloaded
      refreshSoon();
    }),
    on("model", refreshSoon),
  ];
  refresh();
  return {
    element: panel,
    stop() {
      gone = true;
      clearTimeout(soon);
      clearInterval(timer);
      stops.forEach((stop) => stop());
    },
  };
}
