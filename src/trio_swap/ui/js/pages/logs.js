// Logs: trio-swap's own log, all upstreams together, or one model; live, with autoscroll.

import { h } from "../dom.js";
import { navigate } from "../router.js";
import { logLines, on, state } from "../store.js";

export const title = "Logs";

/** Lines shown at once; older ones leave the page (the store keeps as many). */
const MAX_SHOWN = 2000;

function lineClass(line) {
  if (/^\[trio-swap: \d+ lines dropped\]$/.test(line)) return "line gap";
  if (/\[(ERROR|CRITICAL)\]|\b(error|fatal|traceback)\b/i.test(line)) return "line error";
  if (/\[WARNING\]|\bwarn(ing)?\b/i.test(line)) return "line warn";
  return "line";
}

export function mount(root, params) {
  let source = params.get("source") || "proxy";
  let filter = "";
  const picker = h("select", { id: "log-source", "aria-label": "log" });
  const follow = h("input", { type: "checkbox", id: "log-follow", checked: true });
  const search = h("input", { type: "text", placeholder: "filter", "aria-label": "filter lines", size: 18 });
  const count = h("span", { class: "muted small" });
  const output = h("div", { class: "log", id: "log-output", role: "log", "aria-live": "off" });
  root.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Logs"),
      h("div", { class: "log-tools" }, picker, search, h("label", { class: "check" }, follow, "Follow"), count),
    ),
    h("div", { class: "panel" }, output),
  );

  function fillPicker() {
    const sources = [
      ["proxy", "trio-swap (proxy)"],
      ["upstream", "all upstreams"],
      ...[...state.models.keys()].map((id) => [id, id]),
    ];
    if (!sources.some(([value]) => value === source)) sources.push([source, source]);
    picker.replaceChildren(...sources.map(([value, label]) => h("option", { value, selected: value === source }, label)));
  }

  const matches = (line) => !filter || line.toLowerCase().includes(filter);

  function show(lines) {
    output.append(...lines.filter(matches).map((line) => h("div", { class: lineClass(line) }, line)));
    while (output.childElementCount > MAX_SHOWN) output.firstElementChild.remove();
    count.textContent = `${output.childElementCount} lines`;
    if (follow.checked) output.scrollTop = output.scrollHeight;
  }

  function showAll() {
    output.replaceChildren();
    show(logLines(source).slice(-MAX_SHOWN));
    if (!output.childElementCount) count.textContent = "no lines yet";
  }

  picker.addEventListener("change", () => {
    navigate(`/ui/logs?source=${encodeURIComponent(picker.value)}`, { replace: true });
  });
  search.addEventListener("input", () => {
    filter = search.value.trim().toLowerCase();
    showAll();
  });
  follow.addEventListener("change", () => {
    if (follow.checked) output.scrollTop = output.scrollHeight;
  });
  // Scrolling up stops following; scrolling back to the end follows again.
  output.addEventListener("scroll", () => {
    follow.checked = output.scrollHeight - output.scrollTop - output.clientHeight < 24;
  });

  fillPicker();
  showAll();
  const stops = [
    on("models", fillPicker),
    on("logs-reset", showAll),
    on("log", ({ source: from, line }) => {
      if (from === source) show([line]);
      else if (source === "upstream" && from !== "proxy") show([`[${from}] ${line}`]);
    }),
  ];
  return () => stops.forEach((stop) => stop());
}
