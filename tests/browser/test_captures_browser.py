"""A request's capture on the Activity page, in headless Chromium against a real trio-swap.

A client sends a chat request with an ``Authorization`` header; the Activity
page lists it with a capture, and opening it shows the prompt, the answer and
the header as ``[REDACTED]``, never the secret.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.browser.support import TrioSwap, responder, screenshot, start_trio_swap, stop_trio_swap

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

SECRET = "sk-browser-secret-0042"


@pytest.fixture
def trio_swap(tmp_path: Path) -> Iterator[TrioSwap]:
    """trio-swap with one responder model and a 1 MB capture buffer."""
    server = start_trio_swap(
        tmp_path, {"chat": responder("chat")}, None, settings={"captureBuffer": 1}
    )
    try:
        yield server
    finally:
        stop_trio_swap(server)


def test_a_capture_opens_with_its_bodies_and_secrets_redacted(
    trio_swap: TrioSwap, page: Page
) -> None:
    from playwright.sync_api import expect

    prompt = "What does the capture buffer keep?"
    body = {"model": "chat", "messages": [{"role": "user", "content": prompt}], "max_tokens": 5}
    with httpx.Client(base_url=trio_swap.url, timeout=60) as client:
        answer = client.post(
            "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {SECRET}"}
        )
        assert answer.status_code == 200
    reply = answer.json()["choices"][0]["message"]["content"]

    page.goto(trio_swap.url + "/ui/activity")
    row = page.locator("#activity tbody tr").first
    expect(row).to_contain_text("/v1/chat/completions")
    panel = page.locator("#capture")
    expect(panel).to_be_hidden()
    row.locator('[data-field="capture"]').get_by_role("button", name="view").click()

    expect(panel).to_be_visible()
    expect(panel).to_contain_text("POST /v1/chat/completions → 200")
    request_headers = panel.locator('[data-field="req_headers"]')
    expect(request_headers.locator("tr", has_text="authorization")).to_contain_text("[REDACTED]")
    expect(panel.locator('[data-field="req_body"]')).to_contain_text(prompt)
    expect(panel.locator('[data-field="resp_body"]')).to_contain_text(json.dumps(reply)[1:-1])
    expect(panel.locator('[data-field="resp_headers"]')).to_contain_text("application/json")
    expect(panel).not_to_contain_text(SECRET)
    screenshot(page, "capture")

    panel.get_by_role("button", name="close").click()
    expect(panel).to_be_hidden()
    expect(page).to_have_url(re.compile(r"/ui/activity$"))
