// Playground: a streamed chat with any model through POST /v1/chat/completions,
// exactly as an OpenAI client would send it (so it loads and swaps like one).

import { api, ApiError } from "../api.js";
import { h, number } from "../dom.js";
import { navigate } from "../router.js";
import { on, state } from "../store.js";
import { readEvents } from "../sse.js";

export const title = "Playground";

/** The conversation survives switching pages (not reloads). */
const conversation = { model: "", messages: [] };

export function mount(root, params) {
  conversation.model = params.get("model") || conversation.model;
  let controller = null;

  const picker = h("select", { id: "chat-model", "aria-label": "model" });
  const clearButton = h("button", { type: "button", onclick: clearChat }, "Clear");
  const messages = h("div", { class: "messages", id: "chat-messages" });
  const prompt = h("textarea", {
    id: "chat-prompt",
    rows: 2,
    placeholder: "Message (Ctrl+Enter sends)",
    "aria-label": "message",
  });
  const send = h("button", { type: "submit", class: "primary", id: "chat-send" }, "Send");
  const stop = h("button", { type: "button", id: "chat-stop", hidden: true, onclick: () => controller?.abort() }, "Stop");
  const form = h("form", { class: "composer", onsubmit: submit }, prompt, send, stop);
  root.append(
    h("div", { class: "page-head" }, h("h1", {}, "Playground"), picker, h("span", { class: "spacer" }), clearButton),
    h("div", { class: "panel chat" }, messages, form),
  );

  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) form.requestSubmit();
  });
  picker.addEventListener("change", () => {
    conversation.model = picker.value;
    navigate(`/ui/playground?model=${encodeURIComponent(picker.value)}`, { replace: true });
  });

  function fillPicker() {
    const ids = [...state.models.values()].filter((model) => !model.unlisted).map((model) => model.id);
    if (!conversation.model || !ids.includes(conversation.model)) conversation.model = ids[0] ?? conversation.model;
    picker.replaceChildren(...ids.map((id) => h("option", { value: id, selected: id === conversation.model }, id)));
  }

  function bubble(role, text) {
    const element = h("div", { class: `message ${role}` }, text);
    messages.append(element);
    messages.scrollTop = messages.scrollHeight;
    return element;
  }

  function clearChat() {
    controller?.abort();
    conversation.messages = [];
    messages.replaceChildren();
  }

  function setBusy(busy) {
    send.hidden = busy;
    stop.hidden = !busy;
    picker.disabled = busy;
  }

  async function submit(event) {
    event.preventDefault();
    const text = prompt.value.trim();
    if (!text || controller || !conversation.model) return;
    prompt.value = "";
    conversation.messages.push({ role: "user", content: text });
    bubble("user", text);
    const reply = bubble("assistant", "");
    reply.dataset.streaming = "true";
    const reasoning = h("span", { class: "reasoning" });
    const content = h("span", { class: "content" });
    reply.append(reasoning, content);
    controller = new AbortController();
    setBusy(true);
    const started = performance.now();
    let chunks = 0;
    let firstToken = null;
    let usage = null;
    let timings = null;
    try {
      const response = await api("/v1/chat/completions", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "text/event-stream" },
        body: JSON.stringify({ model: conversation.model, messages: conversation.messages, stream: true }),
        signal: controller.signal,
      });
      for await (const { data } of readEvents(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk.error.message ?? JSON.stringify(chunk.error));
        usage = chunk.usage ?? usage;
        timings = chunk.timings ?? timings;
        const delta = chunk.choices?.[0]?.delta ?? {};
        if (delta.reasoning_content) reasoning.textContent += delta.reasoning_content;
        if (delta.content) {
          firstToken ??= performance.now();
          chunks += 1;
          content.textContent += delta.content;
        }
        messages.scrollTop = messages.scrollHeight;
      }
      conversation.messages.push({ role: "assistant", content: content.textContent });
      reply.append(h("span", { class: "stats" }, stats(started, firstToken, chunks, usage, timings)));
    } catch (error) {
      conversation.messages.pop(); // the question stays on screen; ask again to retry it
      if (error.name === "AbortError") reply.append(h("span", { class: "stats" }, "stopped"));
      else {
        reply.classList.add("error");
        reply.append(h("span", { class: "stats" }, error.message));
      }
    } finally {
      delete reply.dataset.streaming;
      controller = null;
      setBusy(false);
      prompt.focus();
    }
  }

  fillPicker();
  for (const message of conversation.messages) bubble(message.role, message.content);
  const stops = [on("models", fillPicker)];
  return () => {
    stops.forEach((stop) => stop());
    controller?.abort();
  };
}

/** "48 tokens · 52.1 tokens/s · first token after 0.41 s", from the server's numbers when it sent them. */
function stats(started, firstToken, chunks, usage, timings) {
  const tokens = usage?.completion_tokens ?? chunks;
  let speed = timings?.predicted_per_second;
  if (!(speed > 0) && firstToken !== null && chunks > 1) {
    speed = (chunks - 1) / ((performance.now() - firstToken) / 1000);
  }
  const parts = [`${tokens} tokens`];
  if (speed > 0) parts.push(`${number(speed, 1)} tokens/s`);
  if (firstToken !== null) parts.push(`first token after ${number((firstToken - started) / 1000, 2)} s`);
  return parts.join(" · ");
}
