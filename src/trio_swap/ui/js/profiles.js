// The profile switcher: a <select> of the configured profiles (docs/selectors.md).
//
// Filled from GET /api/profiles; a choice is sent with PUT /api/profiles/active;
// the `profile` event of the live feed keeps it true when another tab or an API
// client switches. Hidden when the config has no profiles.

import { api, apiJson } from "./api.js";
import { h } from "./dom.js";
import { on, state } from "./store.js";

/** The switcher's element and its cleanup; `onError(message)` reports a failed switch. */
export function profileSwitcher(onError) {
  const select = h("select", { id: "profile", "aria-label": "active profile" });
  const element = h("label", { class: "profile-switch", hidden: true }, "Profile ", select);
  let names = [];

  function render() {
    select.replaceChildren(
      h("option", { value: "" }, "none"),
      ...names.map(({ id, description }) => h("option", { value: id, title: description || null }, id)),
    );
    select.value = state.profile ?? "";
    element.hidden = names.length === 0;
  }

  async function load() {
    try {
      const body = await apiJson("/api/profiles");
      names = body.profiles;
      state.profile = body.active;
      render();
    } catch (error) {
      onError(`Reading the profiles failed: ${error.message}`);
    }
  }

  select.addEventListener("change", async () => {
    const name = select.value || null;
    select.disabled = true;
    try {
      const response = await api("/api/profiles/active", {
        method: "PUT",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ name }),
      });
      state.profile = (await response.json()).active;
      onError("");
    } catch (error) {
      onError(`Switching the profile failed: ${error.message}`);
    } finally {
      select.disabled = false;
      render();
    }
  });

  load();
  // A snapshot follows a reload (new profiles, none active): read the list again.
  const stops = [on("profile", render), on("models", load)];
  return { element, stop: () => stops.forEach((stop) => stop()) };
}
