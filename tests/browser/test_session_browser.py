"""The Activity page shows each request's session id (``ui.activity.session_id``),
in headless Chromium against a real trio-swap started from a config file."""

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

LONG = "conversation-" + "x" * 40


@pytest.fixture
def trio_swap(tmp_path: Path) -> Iterator[TrioSwap]:
    """One responder model; sessions read from X-Conversation, then X-Session-ID."""
    settings: dict[str, object] = {
        "ui": {"activity": {"session_id": ["X-Conversation", "X-Session-ID"]}}
    }
    server = start_trio_swap(tmp_path, {"chat": responder("chat")}, None, settings=settings)
    try:
        yield server
    finally:
        stop_trio_swap(server)


def test_the_activity_page_shows_the_session_id(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    body = {"model": "chat", "prompt": "hi", "max_tokens": 2}
    with httpx.Client(base_url=trio_swap.url, timeout=60) as client:
        for headers in ({"X-Session-ID": "s-1"}, {}, {"X-Conversation": LONG}):
            assert client.post("/v1/completions", json=body, headers=headers).status_code == 200

    page.goto(trio_swap.url + "/ui/activity")
    rows = page.locator("#activity tbody tr")
    expect(rows).to_have_count(3)
    newest = rows.nth(0).locator('[data-field="session_id"]')
    expect(newest).to_have_text(LONG[:16] + "…")
    expect(newest).to_have_attribute("title", LONG)
    expect(rows.nth(1).locator('[data-field="session_id"]')).to_have_text("\u2013")  # a dash
    expect(rows.nth(2).locator('[data-field="session_id"]')).to_have_text("s-1")
    expect(page.locator("#activity thead")).to_contain_text("Session")
