// Client-side navigation: pages change the URL with navigate(); main.js renders.

let render = () => {};

export function setRenderer(fn) {
  render = fn;
}

/** Go to `url` (a /ui/... path with a query) without reloading the page. */
export function navigate(url, { replace = false } = {}) {
  if (replace) history.replaceState(null, "", url);
  else history.pushState(null, "", url);
  render();
}
