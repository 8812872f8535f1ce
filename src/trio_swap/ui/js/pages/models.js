// Models: every configured model with its live state; load and unload buttons.

import { api } from "../api.js";
import { clear, h, seconds } from "../dom.js";
import { modelPath, on, state } from "../store.js";

export const title = "Models";

/** Model id -> "load" | "unload" while that request is under way. */
const pending = new Map();

export function mount(root) {
  const banner = h("div", { class: "error-banner", hidden: true, role: "alert" });
  const summary = h("span", { class: "muted" });
  const unloadAll = h("button", { type: "button", onclick: () => act(null, "unload") }, "Unload all");
  const body = h("tbody");
  const table = h(
    "table",
    { id: "models" },
    h(
      "thead",
      {},
      h(
        "tr",
        {},
        h("th", {}, "State"),
        h("th", {}, "Model"),
        h("th", {}, "Name"),
        h("th", { class: "num" }, "In flight"),
        h("th", { class: "num" }, "Queued"),
        h("th", { class: "num" }, "Loads"),
        h("th", { class: "num", title: "time from start to ready, last load" }, "Ready in"),
        h("th", { class: "num" }, "PID"),
        h("th", {}),
      ),
    ),
    body,
  );
  const empty = h("div", { class: "empty" }, "Waiting for trio-swap…");
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Models"), summary, h("span", { class: "spacer" }), unloadAll),
    banner,
    h("div", { class: "panel" }, table, empty),
  );

  function showError(message) {
    banner.textContent = message;
    banner.hidden = !message;
  }

  async function act(id, action) {
    const key = id ?? "*";
    pending.set(key, action);
    renderAll();
    showError("");
    try {
      const path = id === null ? "/api/models/unload" : `/api/models/${action}/${modelPath(id)}`;
      await api(path, { method: "POST" });
    } catch (error) {
      showError(`${action === "load" ? "Loading" : "Unloading"} ${id ?? "every model"} failed: ${error.message}`);
    } finally {
      pending.delete(key);
      renderAll();
    }
  }

  function row(model) {
    const busy = pending.get(model.id) ?? (pending.has("*") ? "unload" : null);
    const running = model.state !== "stopped";
    return h(
      "tr",
      { dataset: { model: model.id, state: model.state } },
      h("td", {}, h("span", { class: "state", dataset: { state: model.state } }, h("span", { class: "dot" }), model.state)),
      h(
        "td",
        { class: "wrap" },
        h("span", { class: "model-id" }, model.id),
        model.unlisted ? h("span", { class: "aliases" }, " · unlisted") : null,
        model.aliases.length ? h("div", { class: "aliases" }, `aka ${model.aliases.join(", ")}`) : null,
      ),
      h("td", { class: "wrap", title: model.description || null }, model.name || h("span", { class: "muted" }, "–")),
      h("td", { class: "num", dataset: { field: "in_flight" } }, model.in_flight),
      h("td", { class: "num", dataset: { field: "queued" } }, model.queued),
      h("td", { class: "num", dataset: { field: "start_count" } }, model.start_count),
      h("td", { class: "num" }, seconds(model.last_ready_seconds)),
      h("td", { class: "num mono" }, model.pid ?? "–"),
      h(
        "td",
        { class: "actions" },
        h(
          "button",
          {
            type: "button",
            disabled: busy !== null || model.state === "ready",
            onclick: () => act(model.id, "load"),
          },
          busy === "load" ? "Loading…" : "Load",
        ),
        h(
          "button",
          { type: "button", disabled: busy !== null || !running, onclick: () => act(model.id, "unload") },
          busy === "unload" ? "Unloading…" : "Unload",
        ),
        h("a", { href: `/ui/logs?source=${encodeURIComponent(model.id)}`, "data-nav": true, class: "small" }, " logs"),
      ),
    );
  }

  function renderSummary() {
    const rows = [...state.models.values()];
    const loaded = rows.filter((model) => model.state !== "stopped").length;
    summary.textContent = rows.length ? `${loaded} of ${rows.length} running` : "";
    unloadAll.disabled = pending.has("*") || loaded === 0;
  }

  function renderAll() {
    clear(body).append(...[...state.models.values()].map(row));
    empty.hidden = state.models.size > 0;
    if (state.connection === "live" && state.models.size === 0) empty.textContent = "No models configured.";
    renderSummary();
  }

  function renderOne(model) {
    const old = body.querySelector(`tr[data-model="${CSS.escape(model.id)}"]`);
    if (old) old.replaceWith(row(model));
    else body.append(row(model));
    renderSummary();
  }

  renderAll();
  const stops = [on("models", renderAll), on("model", renderOne)];
  return () => stops.forEach((stop) => stop());
}
