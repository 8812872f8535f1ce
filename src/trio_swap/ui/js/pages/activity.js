// Activity: recent model-routed requests, newest first (GET /api/activity), with
// new ones added live from the event feed's `activity` events.

import { apiJson, ApiError } from "../api.js";
import { h, millis, number, when } from "../dom.js";
import { on } from "../store.js";

export const title = "Activity";

const PAGE_ROWS = 50;

function tokens(row) {
  const prompt = row.prompt_tokens;
  const completion = row.completion_tokens;
  if (prompt == null && completion == null) return "–";
  return `${prompt ?? "?"} → ${completion ?? "?"}`;
}

function statusCell(row) {
  const ok = row.status >= 200 && row.status < 400;
  return h(
    "td",
    { class: `num ${ok ? "status-ok" : "status-bad"}`, title: row.error || null },
    row.status,
  );
}

function rowElement(row) {
  return h(
    "tr",
    { dataset: { id: row.id, model: row.model } },
    h("td", {}, when(new Date(row.time * 1000))),
    h("td", { class: "model-id" }, row.model || h("span", { class: "muted" }, "–")),
    h("td", { class: "mono" }, `${row.method ?? "POST"} ${row.endpoint}`, row.stream ? h("span", { class: "muted" }, " · stream") : null),
    statusCell(row),
    h("td", { class: "num" }, millis(row.duration_ms)),
    h("td", { class: "num", title: "queueing and loading before the request was forwarded" }, millis(row.wait_ms)),
    h("td", { class: "num" }, tokens(row)),
    h("td", { class: "num", dataset: { field: "tokens_per_second" } }, number(row.tokens_per_second, 1)),
  );
}

export function mount(root) {
  const banner = h("div", { class: "error-banner", hidden: true, role: "alert" });
  const body = h("tbody");
  const empty = h("div", { class: "empty" }, "Loading…");
  const older = h("button", { type: "button", hidden: true, onclick: () => load(next) }, "Older requests");
  const newest = h("button", { type: "button", hidden: true, onclick: () => load(null) }, "Newest");
  let next = null;
  /** Live rows are added only while the newest page is shown. */
  let onFirstPage = true;
  const shown = new Set();

  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Activity"), h("span", { class: "muted" }, "recent requests, newest first")),
    banner,
    h(
      "div",
      { class: "panel" },
      h(
        "table",
        { id: "activity" },
        h(
          "thead",
          {},
          h(
            "tr",
            {},
            h("th", {}, "Time"),
            h("th", {}, "Model"),
            h("th", {}, "Endpoint"),
            h("th", { class: "num" }, "Status"),
            h("th", { class: "num" }, "Duration"),
            h("th", { class: "num" }, "Wait"),
            h("th", { class: "num", title: "prompt → generated" }, "Tokens"),
            h("th", { class: "num" }, "Tokens/s"),
          ),
        ),
        body,
      ),
      empty,
    ),
    h("div", { class: "page-foot" }, newest, older),
  );

  async function load(before) {
    banner.hidden = true;
    const query = new URLSearchParams({ limit: PAGE_ROWS });
    if (before != null) query.set("before", before);
    try {
      const page = await apiJson(`/api/activity?${query}`);
      onFirstPage = before == null;
      shown.clear();
      body.replaceChildren(...page.data.map((row) => (shown.add(row.id), rowElement(row))));
      next = page.next ?? null;
      older.hidden = next === null;
      newest.hidden = onFirstPage;
      empty.hidden = page.data.length > 0;
      empty.textContent = "No requests yet. Try the Playground.";
    } catch (error) {
      empty.hidden = true;
      banner.hidden = false;
      banner.textContent =
        error instanceof ApiError && error.status === 404
          ? "This trio-swap has no activity log (GET /api/activity is missing)."
          : `Could not read the activity log: ${error.message}`;
    }
  }

  function add(row) {
    if (!onFirstPage || shown.has(row.id)) return;
    shown.add(row.id);
    body.prepend(rowElement(row));
    while (body.childElementCount > PAGE_ROWS) body.lastElementChild.remove();
    empty.hidden = true;
  }

  load(null);
  const stops = [on("activity", add), on("logs-reset", () => onFirstPage && load(null))];
  return () => stops.forEach((stop) => stop());
}
