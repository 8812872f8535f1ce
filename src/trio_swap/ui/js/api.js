// Talking to trio-swap: the API key, fetch with the key, and the key dialog on a 401.
//
// The key lives in localStorage and goes out as `Authorization: Bearer`. EventSource
// cannot send headers, so the live feed is a fetch() too (see sse.js).
// `credentials: "omit"`: trio-swap uses no cookies, and without credentials the
// browser never shows its own Basic-auth prompt for trio-swap's 401s.

const KEY_STORAGE = "trio-swap.apiKey";

export class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

export function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) || "";
  } catch {
    return "";
  }
}

function storeKey(key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key lasts until the page reloads
  }
  memoryKey = key;
  keyListeners.forEach((listener) => listener(key));
}

let memoryKey = storedKey();
const keyListeners = new Set();

export function onKeyChange(listener) {
  keyListeners.add(listener);
  return () => keyListeners.delete(listener);
}

export function forgetKey() {
  storeKey("");
}

export function currentKey() {
  return memoryKey;
}

let pendingKey = null;

/** Show the key dialog (once, however many requests were refused); resolves with the key. */
function askForKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = document.getElementById("key-dialog");
  const form = document.getElementById("key-form");
  const input = document.getElementById("key-input");
  document.getElementById("key-reason").textContent = memoryKey
    ? `The key in this browser was refused (${reason}).`
    : "This trio-swap asks for one of its apiKeys.";
  input.value = "";
  pendingKey = new Promise((resolve) => {
    const submit = (event) => {
      event.preventDefault();
      const key = input.value.trim();
      if (!key) return;
      form.removeEventListener("submit", submit);
      dialog.removeEventListener("cancel", keepOpen);
      dialog.close();
      pendingKey = null;
      storeKey(key);
      resolve(key);
    };
    const keepOpen = (event) => event.preventDefault(); // Escape: nothing works without it
    form.addEventListener("submit", submit);
    dialog.addEventListener("cancel", keepOpen);
  });
  dialog.showModal();
  input.focus();
  return pendingKey;
}

/** fetch() with the key; on a 401, ask for a key and try again. Throws ApiError on other errors. */
export async function api(path, options = {}) {
  for (;;) {
    const headers = new Headers(options.headers || {});
    if (memoryKey) headers.set("Authorization", `Bearer ${memoryKey}`);
    const response = await fetch(path, { ...options, headers, credentials: "omit" });
    if (response.status === 401) {
      await askForKey(await errorMessage(response));
      continue;
    }
    if (!response.ok) {
      throw new ApiError(response.status, await errorMessage(response));
    }
    return response;
  }
}

export async function apiJson(path, options = {}) {
  const response = await api(path, options);
  return response.json();
}

/** The message of an OpenAI- or Anthropic-style error body, else the status. */
export async function errorMessage(response) {
  const text = await response.text().catch(() => "");
  try {
    const body = JSON.parse(text);
    const error = body.error ?? body;
    if (typeof error === "string") return error;
    if (error && typeof error.message === "string") return error.message;
  } catch {
    // not JSON
  }
  return text.trim() || `${response.status} ${response.statusText}`;
}
