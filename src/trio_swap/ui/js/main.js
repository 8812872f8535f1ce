// The single-page app: top bar, client-side routing between the pages, the live feed.
//
// Pages are /ui/models, /ui/logs, /ui/timeline, /ui/activity, /ui/hardware and /ui/playground
// (trio-swap answers index.html for any of them); a page's choices live in the query
// string (/ui/logs?source=m), so links can be shared and model ids need no escaping rules.

import { currentKey, forgetKey, onKeyChange } from "./api.js";
import * as activity from "./pages/activity.js";
import * as hardware from "./pages/hardware.js";
import * as logs from "./pages/logs.js";
import * as models from "./pages/models.js";
import * as playground from "./pages/playground.js";
import * as timeline from "./pages/timeline.js";
import { navigate, setRenderer } from "./router.js";
import { followEvents, on, state } from "./store.js";

const PAGES = { models, logs, timeline, activity, hardware, playground };
const DEFAULT_PAGE = "models";

const view = document.getElementById("view");
let unmount = null;

function pageName(pathname) {
  const name = pathname.replace(/^\/ui\/?/, "").split("/")[0];
  return PAGES[name] ? name : DEFAULT_PAGE;
}

function render() {
  const name = pageName(location.pathname);
  if (unmount) unmount();
  view.replaceChildren();
  for (const link of document.querySelectorAll("nav a[data-page]")) {
    if (link.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${PAGES[name].title} · trio-swap`;
  unmount = PAGES[name].mount(view, new URLSearchParams(location.search)) ?? null;
}

setRenderer(render);

document.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-nav]");
  if (!link || event.ctrlKey || event.metaKey || event.shiftKey || event.button !== 0) return;
  event.preventDefault();
  navigate(link.getAttribute("href"));
});
window.addEventListener("popstate", render);

// Top bar: connection dot, version, the "Forget key" button.
const connection = document.getElementById("connection");
on("connection", (value) => {
  connection.dataset.state = value;
  connection.querySelector(".label").textContent = value;
});
on("models", () => {
  document.getElementById("version").textContent = state.version ? `v${state.version}` : "";
});
const forget = document.getElementById("forget-key");
const showForget = () => (forget.hidden = !currentKey());
forget.addEventListener("click", () => {
  forgetKey();
  location.reload();
});
onKeyChange(showForget);
showForget();

if (location.pathname === "/ui/" || location.pathname === "/ui") {
  history.replaceState(null, "", `/ui/${DEFAULT_PAGE}${location.search}`);
}
render();
followEvents();
