// Hardware: the machine's CPU, memory and GPUs (GET /api/performance, the `performance:`
// key): the latest figures and a line over time (up to the last hour) for each.
//
// Live: the whole history is fetched once, then every few seconds only the samples
// taken since the newest one held (`?since=`). Elements are kept across updates (keyed
// by GPU index), so a tooltip being read stays open. Sparklines are SVG polylines whose
// points are attributes (the Content-Security-Policy refuses style attributes).

import { ApiError, apiJson } from "../api.js";
import { bytes, clockTime, h } from "../dom.js";

export const title = "Hardware";

/** How often new samples are fetched. */
const REFRESH_MS = 5000;
/** The sparklines' time span: what the samples held cover, from a minute to the
 * hour trio-swap keeps, so a fresh server's first minutes are not a dot at the edge. */
const MIN_SPAN_SECONDS = 60;
const MAX_SPAN_SECONDS = 3600;
const SVG = "http://www.w3.org/2000/svg";
const SPARK_WIDTH = 160;
const SPARK_HEIGHT = 30;

/** "5 s", "12 min", "1 h": a sampling interval or a span. */
function duration(value) {
  if (value < 120) return `${Math.round(value)} s`;
  if (value < 7200) return `${Math.round(value / 60)} min`;
  return `${Math.round(value / 360) / 10} h`;
}

function percent(ratio) {
  return ratio === null || ratio === undefined ? "–" : `${Math.round(ratio * 100)} %`;
}

function celsius(value) {
  return value === null || value === undefined ? "–" : `${Math.round(value)} °C`;
}

function watts(value) {
  return value === null || value === undefined ? "–" : `${value.toFixed(1)} W`;
}

function usedOfTotal(used, total) {
  if (used === null || used === undefined) return "–";
  return total ? `${bytes(used)} / ${bytes(total)}` : bytes(used);
}

function svg(tag, attributes = {}) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attributes)) element.setAttribute(name, String(value));
  return element;
}

/** An empty sparkline: {element, line}; draw() sets the line's points. */
function sparkline(label) {
  const line = svg("polyline", { class: "hw-line" });
  const element = svg("svg", {
    class: "hw-spark",
    viewBox: `0 0 ${SPARK_WIDTH} ${SPARK_HEIGHT}`,
    preserveAspectRatio: "none",
    role: "img",
    "aria-label": label,
  });
  element.append(svg("line", { class: "hw-base", x1: 0, y1: SPARK_HEIGHT, x2: SPARK_WIDTH, y2: SPARK_HEIGHT }), line);
  return { element, line };
}

/** Points of `values` ([time, 0..1] pairs, nulls skipped) over [right - span, right]. */
function points(values, right, span) {
  const left = right - span;
  return values
    .filter(([time, value]) => value !== null && value !== undefined && time >= left)
    .map(([time, value]) => {
      const x = ((time - left) / span) * SPARK_WIDTH;
      const y = SPARK_HEIGHT - Math.min(1, Math.max(0, value)) * (SPARK_HEIGHT - 2) - 1;
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(" ");
}

function card(metric, label) {
  const value = h("div", { class: "hw-value", dataset: { field: "value" } }, "–");
  const detail = h("div", { class: "muted small", dataset: { field: "detail" } });
  const spark = sparkline(`${label} over time`);
  const element = h(
    "div",
    { class: "hw-card", dataset: { metric } },
    h("div", { class: "hw-label muted small" }, label),
    value,
    detail,
    spark.element,
  );
  return { element, value, detail, spark };
}

export function mount(root) {
  const banner = h("div", { class: "error-banner", hidden: true, role: "alert" });
  const summary = h("span", { class: "muted", id: "hw-summary" });
  const cpu = card("cpu", "CPU");
  const memory = card("memory", "Memory");
  const gpuRows = h("tbody");
  const gpuTable = h(
    "table",
    { hidden: true },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", {}, "GPU"),
        h("th", { class: "num" }, "Utilisation"),
        h("th", { class: "num" }, "Memory"),
        h("th", { class: "num" }, "Temperature"),
        h("th", { class: "num" }, "Power"),
        h("th", {}, "Utilisation over time"),
      ),
    ),
    gpuRows,
  );
  const gpuEmpty = h("div", { class: "empty", id: "hw-no-gpus" }, "Loading…");
  const content = h(
    "div",
    { id: "hardware" },
    h(
      "section",
      { class: "panel", id: "hw-host", "aria-label": "Host" },
      h("div", { class: "panel-head" }, h("h2", {}, "Host"), h("span", { class: "muted small" }, "all cores together; memory used is total minus available")),
      h("div", { class: "hw-cards" }, cpu.element, memory.element),
    ),
    h(
      "section",
      { class: "panel hw-gpus", id: "hw-gpus", "aria-label": "GPUs" },
      h("div", { class: "panel-head" }, h("h2", {}, "GPUs"), h("span", { class: "muted small" }, "through NVML; the line is the utilisation")),
      gpuTable,
      gpuEmpty,
    ),
  );
  root.append(h("div", { class: "page-head" }, h("h1", {}, "Hardware"), summary), banner, content);

  /** Samples held, oldest first (at most the server's max_samples). */
  let samples = [];
  /** The last answer's settings: {every, max_samples, gpus_found}. */
  let info = null;
  /** GPU index -> {row, cells, spark}. */
  const gpus = new Map();
  let gone = false;
  let fetching = false;

  async function refresh() {
    if (fetching) return;
    fetching = true;
    try {
      const newest = samples.length ? samples[samples.length - 1].time : null;
      const query = newest === null ? "" : `?since=${newest}`;
      const answer = await apiJson(`/api/performance${query}`);
      if (gone) return;
      info = answer;
      samples = samples.concat(answer.samples).slice(-answer.max_samples);
      banner.hidden = true;
      content.hidden = false;
      draw();
    } catch (error) {
      if (gone) return;
      banner.hidden = false;
      if (error instanceof ApiError && error.status === 503) {
        samples = [];
        content.hidden = true;
        summary.textContent = "";
        banner.textContent = "Sampling is off: the config sets performance.disabled.";
      } else if (error instanceof ApiError && error.status === 404) {
        content.hidden = true;
        banner.textContent = "This trio-swap samples no hardware (GET /api/performance is missing).";
      } else {
        banner.textContent = `Could not read the hardware samples: ${error.message}`;
      }
    } finally {
      fetching = false;
    }
  }

  function gpuRow(gpu) {
    let entry = gpus.get(gpu.index);
    if (!entry) {
      const cell = (field) => h("td", { class: "num", dataset: { field } }, "–");
      const cells = {
        utilization: cell("utilization"),
        memory: cell("memory"),
        temperature: cell("temperature"),
        power: cell("power"),
      };
      const spark = sparkline(`GPU ${gpu.index} utilisation over time`);
      const row = h(
        "tr",
        { class: "hw-gpu", dataset: { gpu: gpu.index } },
        h("td", {}, h("div", { dataset: { field: "name" } }, `${gpu.index}: ${gpu.name || "unnamed GPU"}`), h("div", { class: "muted small mono" }, gpu.uuid)),
        cells.utilization,
        cells.memory,
        cells.temperature,
        cells.power,
        h("td", {}, spark.element),
      );
      entry = { row, cells, spark };
      gpus.set(gpu.index, entry);
    }
    return entry;
  }

  function draw() {
    const latest = samples[samples.length - 1];
    const every = `sampled every ${duration(info.every)}`;
    if (!latest) {
      summary.textContent = `${every} · no sample yet`;
      gpuEmpty.hidden = false;
      gpuEmpty.textContent = "Waiting for the first sample…";
      return;
    }
    const right = latest.time;
    const span = Math.min(MAX_SPAN_SECONDS, Math.max(MIN_SPAN_SECONDS, right - samples[0].time));
    summary.textContent = `${every} · last at ${clockTime(right)} · lines over ${duration(span)}`;
    cpu.value.textContent = percent(latest.cpu_utilization);
    cpu.detail.textContent = latest.cpu_utilization === null ? "known from the second sample on" : "busy";
    cpu.spark.line.setAttribute("points", points(samples.map((s) => [s.time, s.cpu_utilization]), right, span));
    memory.value.textContent = usedOfTotal(latest.memory_used_bytes, latest.memory_total_bytes);
    memory.detail.textContent = `${bytes(latest.memory_available_bytes)} available`;
    const share = (s) => (s.memory_total_bytes ? s.memory_used_bytes / s.memory_total_bytes : null);
    memory.spark.line.setAttribute("points", points(samples.map((s) => [s.time, share(s)]), right, span));

    const seen = new Set();
    latest.gpus.forEach((gpu, position) => {
      seen.add(gpu.index);
      const entry = gpuRow(gpu);
      if (gpuRows.children[position] !== entry.row) gpuRows.insertBefore(entry.row, gpuRows.children[position] ?? null);
      entry.cells.utilization.textContent = percent(gpu.utilization);
      entry.cells.memory.textContent = usedOfTotal(gpu.memory_used_bytes, gpu.memory_total_bytes);
      entry.cells.temperature.textContent = celsius(gpu.temperature_celsius);
      entry.cells.power.textContent = watts(gpu.power_watts);
      entry.row.title = `${gpu.name}\n${gpu.uuid}`;
      const history = samples.map((s) => [s.time, s.gpus.find((g) => g.index === gpu.index)?.utilization ?? null]);
      entry.spark.line.setAttribute("points", points(history, right, span));
    });
    for (const [index, entry] of gpus) {
      if (!seen.has(index)) {
        entry.row.remove();
        gpus.delete(index);
      }
    }
    gpuTable.hidden = latest.gpus.length === 0;
    gpuEmpty.hidden = latest.gpus.length > 0;
    gpuEmpty.textContent = info?.gpus_found
      ? "NVML reports no GPU."
      : "No GPU figures: NVML is not available (install trio-swap's gpu extra, nvidia-ml-py, on a machine with an NVIDIA driver).";
  }

  const timer = setInterval(refresh, REFRESH_MS);
  refresh();
  return () => {
    gone = true;
    clearInterval(timer);
  };
}
