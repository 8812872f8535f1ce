// Activity: recent model-routed requests, newest first (GET /api/activity), with
// new ones added live from the event feed's `activity` events. A row that has a
// capture (`has_capture`, captureBuffer) opens it below the table: the request's
// and the response's headers and bodies (GET /api/captures/<id>).

import { apiJson, ApiError } from "../api.js";
import { bytes, h, millis, number, when } from "../dom.js";
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

/** The session id (ui.activity.session_id headers), shortened; the whole one on hover. */
function sessionCell(row) {
  const id = row.session_id;
  if (!id) return h("td", { class: "mono", dataset: { field: "session_id" } }, h("span", { class: "muted" }, "–"));
  const shown = id.length > 18 ? `${id.slice(0, 16)}…` : id;
  return h("td", { class: "mono", title: id, dataset: { field: "session_id" } }, shown);
}

function rowElement(row, open) {
  const capture = row.has_capture
    ? h("button", { type: "button", class: "link", title: "the request and response as captured", onclick: () => open(row.id) }, "view")
    : h("span", { class: "muted", title: "not captured, or evicted from the captureBuffer" }, "–");
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
    sessionCell(row),
    h("td", { class: "actions", dataset: { field: "capture" } }, capture),
  );
}

// --- the capture panel ------------------------------------------------------------

function decodeBody(base64) {
  const raw = atob(base64);
  const data = new Uint8Array(raw.length);
  for (let i = 0; i < raw.length; i++) data[i] = raw.charCodeAt(i);
  return new TextDecoder("utf-8", { fatal: false }).decode(data);
}

/** A body as text (JSON pretty-printed when whole), or a note saying why it is not. */
function bodyView(capture, side, headers) {
  const size = capture[`${side}_body_size`];
  const kept = capture[`${side}_body_kept`];
  const omitted = capture[`${side}_body_omitted`];
  const notes = [];
  if (omitted) {
    const why = omitted === "binary" ? "binary body" : "compressed body";
    return h("p", { class: "muted capture-note", dataset: { field: `${side}_body` } }, `${why}, ${bytes(size)}: not kept`);
  }
  if (size === 0) return h("p", { class: "muted capture-note", dataset: { field: `${side}_body` } }, "(empty body)");
  let text = decodeBody(capture[`${side}_body`]);
  if (capture[`${side}_body_truncated`]) {
    notes.push(h("p", { class: "muted capture-note" }, `the first ${bytes(kept)} of ${bytes(size)}: the capture buffer was full`));
  } else if ((headers["content-type"] || "").includes("json")) {
    try {
      text = JSON.stringify(JSON.parse(text), null, 2);
    } catch {
      // not valid JSON after all: shown as sent
    }
  }
  return [...notes, h("pre", { class: "capture-body", dataset: { field: `${side}_body` } }, text)];
}

function headerTable(headers, field) {
  const names = Object.keys(headers);
  if (names.length === 0) return h("p", { class: "muted capture-note" }, "(none)");
  return h(
    "table",
    { class: "capture-headers", dataset: { field } },
    h("tbody", {}, names.map((name) => h("tr", {}, h("td", { class: "mono" }, name), h("td", { class: "mono wrap" }, headers[name])))),
  );
}

function captureView(capture, close) {
  const query = capture.req_query ? `?${capture.req_query}` : "";
  const status = capture.resp_status ?? "no response (the client left)";
  return [
    h(
      "div",
      { class: "panel-head" },
      h("h2", {}, `Capture #${capture.id}`),
      h("span", { class: "mono" }, `${capture.method} ${capture.req_path}${query} → ${status}`),
      h("span", { class: "muted small" }, `${bytes(capture.bytes)} of the capture buffer`),
      h("span", { class: "spacer" }),
      h("button", { type: "button", class: "link", onclick: close }, "close"),
    ),
    h(
      "div",
      { class: "capture-sides" },
      h("section", { dataset: { side: "request" } }, h("h3", {}, "Request headers"), headerTable(capture.req_headers, "req_headers"), h("h3", {}, "Request body"), bodyView(capture, "req", capture.req_headers)),
      h("section", { dataset: { side: "response" } }, h("h3", {}, "Response headers"), headerTable(capture.resp_headers, "resp_headers"), h("h3", {}, "Response body"), bodyView(capture, "resp", capture.resp_headers)),
    ),
  ];
}

export function mount(root) {
  const banner = h("div", { class: "error-banner", hidden: true, role: "alert" });
  const body = h("tbody");
  const empty = h("div", { class: "empty" }, "Loading…");
  const older = h("button", { type: "button", hidden: true, onclick: () => load(next) }, "Older requests");
  const newest = h("button", { type: "button", hidden: true, onclick: () => load(null) }, "Newest");
  const capturePanel = h("div", { class: "panel capture", id: "capture", hidden: true, "aria-live": "polite" });
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
            h("th", { title: "the request's session id header (ui.activity.session_id)" }, "Session"),
            h("th", { class: "actions", title: "the request and response, as captured (captureBuffer)" }, "Capture"),
          ),
        ),
        body,
      ),
      empty,
    ),
    h("div", { class: "page-foot" }, newest, older),
    capturePanel,
  );

  function closeCapture() {
    capturePanel.hidden = true;
    capturePanel.replaceChildren();
  }

  async function openCapture(id) {
    banner.hidden = true;
    try {
      const capture = await apiJson(`/api/captures/${id}`);
      capturePanel.replaceChildren(...captureView(capture, closeCapture));
      capturePanel.hidden = false;
      capturePanel.scrollIntoView({ block: "nearest" });
    } catch (error) {
      closeCapture();
      banner.hidden = false;
      banner.textContent =
        error instanceof ApiError && error.status === 404
          ? `Request ${id} is no longer captured (evicted from the captureBuffer).`
          : `Could not read capture ${id}: ${error.message}`;
    }
  }

  async function load(before) {
    banner.hidden = true;
    const query = new URLSearchParams({ limit: PAGE_ROWS });
    if (before != null) query.set("before", before);
    try {
      const page = await apiJson(`/api/activity?${query}`);
      onFirstPage = before == null;
      shown.clear();
      body.replaceChildren(...page.data.map((row) => (shown.add(row.id), rowElement(row, openCapture))));
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
    body.prepend(rowElement(row, openCapture));
    while (body.childElementCount > PAGE_ROWS) body.lastElementChild.remove();
    empty.hidden = true;
  }

  load(null);
  const stops = [on("activity", add), on("logs-reset", () => onFirstPage && load(null))];
  return () => stops.forEach((stop) => stop());
}
