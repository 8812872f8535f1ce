"""The Timeline page and the Memory panel in headless Chromium against a real trio-swap.

The timeline and memory tests against a real trio-swap check what a user sees after
real swaps; the ``canned`` tests answer ``/api/timeline`` and ``/api/fit`` with
fixed bodies (Playwright routes) to check the drawing itself: tooltips with who
evicted a model and why, bar and segment sizes, what is hidden when.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from tests.browser.support import TrioSwap, responder, screenshot, start_trio_swap, stop_trio_swap

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

pytestmark = pytest.mark.browser

MiB = 1 << 20
GiB = 1 << 30


@pytest.fixture
def trio_swap(tmp_path: Path) -> Iterator[TrioSwap]:
    """trio-swap with two quick models, ``resources: {ram: 1GiB}``; ``chat`` needs 256 MiB."""
    models = {
        "chat": {
            **responder("chat", "--hold-memory", "32MiB"),
            "needs": {"ram": "256MiB"},
        },
        "coder": {**responder("coder"), "needs": {"ram": "900MiB"}},
    }
    server = start_trio_swap(tmp_path, models, None, settings={"resources": {"ram": "1GiB"}})
    try:
        yield server
    finally:
        stop_trio_swap(server)


def ask(server: TrioSwap, model: str) -> None:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        response = client.post("/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text


def test_the_timeline_shows_each_models_bands_live(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    ask(trio_swap, "chat")
    ask(trio_swap, "coder")  # 256 MiB + 900 MiB > 1 GiB: chat is evicted

    page.goto(trio_swap.url + "/ui/timeline")
    expect(page.get_by_role("navigation").get_by_role("link", name="Timeline")).to_have_attribute(
        "aria-current", "page"
    )
    chat = page.locator('.tl-lane[data-model="chat"]')
    coder = page.locator('.tl-lane[data-model="coder"]')
    expect(chat.locator(".tl-band")).to_have_count(3)
    expect(chat.locator('.tl-band[data-state="loading"]')).to_have_count(1)
    expect(chat.locator('.tl-band[data-state="ready"]')).to_have_count(1)
    expect(chat.locator('.tl-band[data-state="stopping"][data-reason="swap"]')).to_have_count(1)
    expect(chat.locator('.tl-mark[data-reason="swap"][data-evicted-by="coder"]')).to_have_attribute(
        "title",
        re.compile("evicted by a swap for coder\n.*ram"),  # fit's reason names the resource
    )
    expect(coder.locator('.tl-band[data-state="ready"][data-open="true"]')).to_have_count(1)
    summary = page.locator("#timeline-summary")
    expect(summary).to_have_text(
        re.compile(r"^2 loads · 1 eviction · .* spent loading in the last hour$")
    )
    page.evaluate("window.notReloaded = true")

    # Live: a swap back shows up without a reload.
    ask(trio_swap, "chat")
    expect(coder.locator('.tl-band[data-state="stopping"]')).to_have_count(1)
    expect(chat.locator('.tl-band[data-state="ready"][data-open="true"]')).to_have_count(1)
    expect(summary).to_contain_text("3 loads · 2 evictions")

    # The window toggle: 15 minutes, kept in the URL.
    page.get_by_role("button", name="15 min").click()
    expect(page).to_have_url(re.compile(r"/ui/timeline\?window=15m$"))
    expect(page.get_by_role("button", name="15 min")).to_have_attribute("aria-pressed", "true")
    expect(summary).to_contain_text("in the last 15 minutes")
    expect(chat.locator(".tl-band")).to_have_count(5)
    assert page.evaluate("window.notReloaded") is True


def test_the_memory_panel_shows_the_running_models_share(trio_swap: TrioSwap, page: Page) -> None:
    """Needs ``GET /api/fit``."""
    from playwright.sync_api import expect

    page.goto(trio_swap.url + "/ui/models")
    ram = page.locator('#memory .mem-row[data-resource="ram"]')
    expect(ram).to_be_visible()
    expect(ram).to_contain_text("1.0 GiB")
    expect(ram.locator(".mem-seg")).to_have_count(0)
    expect(ram.locator(".mem-free")).to_have_text("1.0 GiB free")

    ask(trio_swap, "chat")
    chat = ram.locator('.mem-seg[data-model="chat"]')
    expect(chat).to_contain_text("chat")
    expect(chat).to_contain_text("256 MiB")
    expect(chat).to_have_attribute("data-basis", "declared")
    expect(ram.locator(".mem-free")).to_have_text("768 MiB free")
    expect(chat.locator(".mem-used")).to_have_attribute("style", re.compile(r"width: [1-9]"))
    # The models table shows the need.
    expect(page.locator('#models tr[data-model="chat"] [data-field="needs"]')).to_have_text(
        "ram 256 MiB"
    )
    screenshot(page, "memory")

    ask(trio_swap, "coder")  # chat is evicted: coder's share replaces it
    expect(ram.locator('.mem-seg[data-model="coder"]')).to_contain_text("900 MiB")
    expect(chat).to_have_count(0)


# -- canned answers: the drawing itself ------------------------------------------------

NOW = 1_800_000_000.0
WHY = "needs ram 1.2 GiB, 0.4 GiB free; cheapest to reload"


def canned_timeline(since: float) -> dict[str, object]:
    def band(state: str, start: float, end: float | None, **more: object) -> dict[str, object]:
        fields = {"reason": None, "evicted_by": None, "why": None, **more}
        return {
            "state": state,
            "start": NOW + start,
            "end": None if end is None else NOW + end,
            **fields,
        }

    return {
        "now": NOW,
        "since": since,
        "horizon": 3600.0,
        "lanes": [
            {
                "model": "chat",
                "bands": [
                    band("loading", -1800, -1790),
                    band("ready", -1790, -600),
                    band("stopping", -600, -599, reason="swap", evicted_by="coder", why=WHY),
                    band("loading", -300, -290, reason="failed"),
                ],
            },
            {"model": "coder", "bands": [band("loading", -600, -580), band("ready", -580, None)]},
        ],
        "counts": {
            "loads": 3,
            "failed_loads": 1,
            "evictions": 1,
            "crashes": 0,
            "loading_seconds": 40.0,
        },
    }


def test_canned_timeline_marks_say_who_evicted_and_why(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    def answer(route: Route) -> None:
        since = float(parse_qs(urlsplit(route.request.url).query)["since"][0])
        route.fulfill(json=canned_timeline(since))

    page.route("**/api/timeline?*", answer)
    page.goto(trio_swap.url + "/ui/timeline")
    chat = page.locator('.tl-lane[data-model="chat"]')
    mark = chat.locator('.tl-mark[data-evicted-by="coder"]')
    expect(mark).to_have_attribute(
        "title", re.compile(f"evicted by a swap for coder\n{re.escape(WHY)}")
    )
    stopping = chat.locator('.tl-band[data-state="stopping"]')
    expect(stopping).to_have_attribute(
        "title", re.compile(f"to make room for coder\n{re.escape(WHY)}")
    )
    failed = chat.locator('.tl-band[data-reason="failed"]')
    expect(failed).to_have_attribute("title", re.compile("the start failed"))
    expect(chat.locator('.tl-mark[data-kind="failed"]')).to_have_count(1)
    expect(page.locator("#timeline-summary")).to_have_text(
        "3 loads (1 failed) · 1 eviction · 40.0 s spent loading in the last hour"
    )
    # Placed by time: the eviction ten minutes before the right edge (now).
    box = chat.locator(".tl-track").bounding_box()
    mark_box = mark.bounding_box()
    assert box is not None and mark_box is not None
    centre = mark_box["x"] + mark_box["width"] / 2
    assert abs((centre - box["x"]) / box["width"] - 50 / 60) < 0.02
    screenshot(page, "timeline")  # an hour's worth, for docs/ui.md


def canned_fit(enabled: bool) -> dict[str, object]:
    def model(
        model_id: str, state: str, need: int, used: int | None, basis: str
    ) -> dict[str, object]:
        return {
            "id": model_id,
            "state": state,
            "needs": {"ram": need},
            "basis": {"ram": basis},
            "footprint": {} if used is None else {"ram": used},
            "load_seconds": 1.5,
            "eviction_cost": 1.5,
        }

    return {
        "enabled": enabled,
        "resources": {"ram": {"capacity": GiB, "reserved": 768 * MiB, "used": 300 * MiB}},
        "models": [
            model("chat", "ready", 512 * MiB, 256 * MiB, "measured"),
            model("coder", "starting", 256 * MiB, None, "estimated"),
            model("idle", "stopped", 512 * MiB, None, "declared"),
        ],
    }


def test_canned_fit_draws_a_bar_per_resource(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    mode = {"answer": "on"}

    def answer(route: Route) -> None:
        if mode["answer"] == "missing":
            error = {"message": "not found", "type": "invalid_request_error"}
            route.fulfill(status=404, json={"error": error})
        else:
            route.fulfill(json=canned_fit(enabled=mode["answer"] == "on"))

    page.route("**/api/fit", answer)
    page.goto(trio_swap.url + "/ui/models")
    panel = page.locator("#memory")
    ram = panel.locator('.mem-row[data-resource="ram"]')
    expect(ram.locator(".mem-seg")).to_have_count(2)  # the stopped model takes no room
    chat = ram.locator('.mem-seg[data-model="chat"]')
    expect(chat).to_have_text("chat 256 MiB / 512 MiB")
    expect(chat).to_have_attribute("title", re.compile("measured peak plus margin"))
    expect(ram.locator('.mem-seg[data-model="coder"]')).to_have_text("coder 256 MiB")
    expect(ram.locator(".mem-free")).to_have_text("256 MiB free")
    expect(ram).to_contain_text("1.0 GiB · 768 MiB reserved · 300 MiB measured in use")
    bar = ram.locator(".mem-bar").bounding_box()
    share = chat.bounding_box()
    assert bar is not None and share is not None
    assert abs(share["width"] / bar["width"] - 0.5) < 0.02

    # Fit turned off (a reload of the config without resources): the panel goes away,
    # and comes back when it is on again. Seen at the next poll, without a page reload.
    mode["answer"] = "off"
    expect(panel).to_be_hidden()
    mode["answer"] = "on"
    expect(panel).to_be_visible()
    # No /api/fit at all (a trio-swap without it): hidden, and no error on the page.
    mode["answer"] = "missing"
    expect(panel).to_be_hidden()
