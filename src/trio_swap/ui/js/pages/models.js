// Models: every configured model with its live state; load and unload buttons; and,
// when trio-swap fits models by memory, what each needs and the Memory panel.

import { api } from "../api.js";
import { bytes, clear, h, seconds } from "../dom.js";
import { memoryPanel } from "../memory.js";
import { profileSwitcher } from "../profiles.js";
import { modelPath, on, state } from "../store.js";

export const title = "Models";

/** Model id -> "load" | "unload" while that request is under way. */
const pending = new Map();

/** The optional columns the rows have data for (fit by memory fills them in). */
function optionalColumns(rows) {
  return {
    needs: rows.some((model) => model.needs && Object.keys(model.needs).length > 0),
    load: rows.some((model) => model.load_seconds != null),
  };
}

/** "ram 1.2 GiB · vram0 20.0 GiB"; the title says what was last measured. */
function needsCell(model) {
  const needs = Object.entries(model.needs ?? {});
  if (!needs.length) return h("td", { class: "num", dataset: { field: "needs" } }, h("span", { class: "muted" }, "–"));
  const measured = Object.entries(model.footprint ?? {}).map(([name, size]) => `${name} ${bytes(size)}`);
  return h(
    "td",
    {
      class: "num",
      dataset: { field: "needs" },
      title: measured.length ? `last measured: ${measured.join(", ")}` : "not measured yet",
    },
    needs.map(([name, size]) => `${name} ${bytes(size)}`).join(" · "),
  );
}

export function mount(root) {
  const banner = h("div", { class: "error-banner", hidden: true, role: "alert" });
  const summary = h("span", { class: "muted" });
  const unloadAll = h("button", { type: "button", onclick: () => act(null, "unload") }, "Unload all");
  const body = h("tbody");
  const head = h("thead");
  const table = h("table", { id: "models" }, head, body);
  const empty = h("div", { class: "empty" }, "Waiting for trio-swap…");
  const memory = memoryPanel();
  const profiles = profileSwitcher((message) => showError(message));
  root.append(
    h(
      "div",
      { class: "page-head" },
      h("h1", {}, "Models"),
      summary,
      h("span", { class: "spacer" }),
      profiles.element,
      unloadAll,
    ),
    banner,
    h("div", { class: "panel" }, table, empty),
    memory.element,
  );
  let columns = { needs: false, load: false };

  function renderHead() {
    head.replaceChildren(
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
        columns.load ? h("th", { class: "num", title: "time from start to ready, moving average" }, "Avg load") : null,
        columns.needs ? h("th", { class: "num", title: "memory reserved for it while it runs" }, "Needs") : null,
        h("th", { class: "num" }, "PID"),
        h("th", {}),
      ),
    );
  }

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
      columns.load ? h("td", { class: "num", dataset: { field: "load_seconds" } }, seconds(model.load_seconds)) : null,
      columns.needs ? needsCell(model) : null,
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
    columns = optionalColumns([...state.models.values()]);
    renderHead();
    clear(body).append(...[...state.models.values()].map(row));
    empty.hidden = state.models.size > 0;
    if (state.connection === "live" && state.models.size === 0) empty.textContent = "No models configured.";
    renderSummary();
  }

  function renderOne(model) {
    const wanted = optionalColumns([...state.models.values()]);
    if (wanted.needs !== columns.needs || wanted.load !== columns.load) {
      renderAll();
      return;
    }
    const old = body.querySelector(`tr[data-model="${CSS.escape(model.id)}"]`);
    if (old) old.replaceWith(row(model));
    else body.append(row(model));
    renderSummary();
  }

  renderAll();
  const stops = [on("models", renderAll), on("model", renderOne), memory.stop, profiles.stop];
  return () => stops.forEach((stop) => stop());
}
