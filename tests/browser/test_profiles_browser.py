"""The profile switcher on the Models page, in headless Chromium against a real trio-swap.

Switched in the page, the next request is routed by the profile's pin; switched
by another client over the API, the page follows through the live feed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser.support import TrioSwap, responder, start_trio_swap, stop_trio_swap

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser


@pytest.fixture
def trio_swap(tmp_path: Path) -> Iterator[TrioSwap]:
    profiles = {
        "night": {"description": "the small one", "pins": {"chat": "small"}},
        "day": {"pins": {"chat": "large"}},
    }
    models = {"small": responder("small"), "large": responder("large")}
    server = start_trio_swap(tmp_path, models, None, settings={"profiles": profiles})
    try:
        yield server
    finally:
        stop_trio_swap(server)


def answered_by(client: httpx.Client, name: str) -> str:
    body = {"model": name, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    return str(response.json()["model"])


def test_a_profile_is_switched_in_the_page_and_followed_live(
    trio_swap: TrioSwap, page: Page
) -> None:
    from playwright.sync_api import expect

    page.goto(f"{trio_swap.url}/ui/")
    switch = page.locator("#profile")
    expect(switch).to_be_visible()
    expect(switch).to_have_value("")  # none active at start
    expect(switch.locator("option")).to_have_text(["none", "day", "night"])
    switch.select_option("night")
    with httpx.Client(base_url=trio_swap.url, timeout=60) as client:
        for _ in range(100):  # the PUT is the page's: wait until it landed
            if client.get("/api/profiles").json()["active"] == "night":
                break
            page.wait_for_timeout(50)
        assert client.get("/api/profiles").json()["active"] == "night"
        assert answered_by(client, "chat") == "small"
        # Another client switches: the page follows through /api/events.
        client.put("/api/profiles/active", json={"name": "day"}).raise_for_status()
        expect(switch).to_have_value("day")
        assert answered_by(client, "chat") == "large"
        switch.select_option("")
        for _ in range(100):
            if client.get("/api/profiles").json()["active"] is None:
                break
            page.wait_for_timeout(50)
        assert client.get("/api/profiles").json()["active"] is None
