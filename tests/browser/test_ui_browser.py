"""The web UI in a real headless Chromium against a real trio-swap process.

Each test starts trio-swap (``python -m trio_swap serve``) with responder models
and drives the pages as a user would: what it checks is what the user would see.
With ``TRIO_SWAP_SCREENSHOTS=docs`` the tour also saves ``docs/ui-*.png``.
"""

from __future__ import annotations

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

CHAT_LINE = "request POST /v1/chat/completions"


@pytest.fixture
def trio_swap(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[TrioSwap]:
    """trio-swap with two models: ``chat`` takes a second to load and streams at a readable pace."""
    api_key = getattr(request, "param", None)
    models = {
        "chat": {
            **responder("chat", "--load-delay", "1", "--token-delay", "0.05", "--tokens", "32"),
            "name": "Chat model",
            "description": "A fake chat model (the responder)",
            "aliases": ["gpt-4o-mini"],
        },
        "coder": {**responder("coder", "--token-delay", "0.01"), "name": "Code model"},
    }
    server = start_trio_swap(tmp_path, models, api_key)
    try:
        yield server
    finally:
        stop_trio_swap(server)


def test_a_tour_of_every_page_with_live_updates(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    # Models: the configured models, stopped.
    page.goto(trio_swap.url + "/")
    expect(page).to_have_url(re.compile(r"/ui/models$"))
    chat = page.locator('#models tr[data-model="chat"]')
    coder = page.locator('#models tr[data-model="coder"]')
    expect(chat).to_have_attribute("data-state", "stopped")
    expect(coder).to_have_attribute("data-state", "stopped")
    expect(chat).to_contain_text("Chat model")
    expect(chat).to_contain_text("gpt-4o-mini")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")
    page.evaluate("window.notReloaded = true")

    # Load: the state goes starting -> ready on screen, from the event feed.
    chat.get_by_role("button", name="Load", exact=True).click()
    expect(chat).to_have_attribute("data-state", "starting")
    expect(chat.get_by_role("button", name="Loading…")).to_be_disabled()
    expect(chat).to_have_attribute("data-state", "ready")
    expect(chat.locator('[data-field="start_count"]')).to_have_text("1")
    expect(chat.get_by_role("button", name="Unload", exact=True)).to_be_enabled()
    expect(page.get_by_text("1 of 2 running")).to_be_visible()

    # A request from elsewhere shows up as in flight while it streams.
    with httpx.Client(base_url=trio_swap.url, headers=trio_swap.headers(), timeout=60) as client:
        with client.stream("POST", "/v1/chat/completions", json=chat_body("chat")) as response:
            assert response.status_code == 200
            expect(chat.locator('[data-field="in_flight"]')).to_have_text("1")
            response.read()
        expect(chat.locator('[data-field="in_flight"]')).to_have_text("0")
    assert page.evaluate("window.notReloaded") is True
    screenshot(page, "models")

    # Logs: the model's output so far, then new lines as they are written.
    chat.get_by_role("link", name="logs").click()
    expect(page).to_have_url(re.compile(r"/ui/logs\?source=chat$"))
    output = page.locator("#log-output")
    expect(output).to_contain_text("responder chat listening")
    expect(page.locator("#log-source")).to_have_value("chat")
    lines_before = output.locator(".line", has_text=CHAT_LINE).count()
    with httpx.Client(base_url=trio_swap.url, headers=trio_swap.headers(), timeout=60) as client:
        assert client.post("/v1/chat/completions", json=chat_body("chat")).status_code == 200
    expect(output.locator(".line", has_text=CHAT_LINE)).to_have_count(lines_before + 1)
    # Following: the newest line is scrolled into view.
    expect(output.locator(".line").last).to_be_in_viewport()
    page.locator("#log-source").select_option("upstream")
    expect(output).to_contain_text(f"[chat] {CHAT_LINE}")
    page.locator("#log-source").select_option("proxy")
    expect(page).to_have_url(re.compile(r"/ui/logs\?source=proxy$"))
    expect(output).to_contain_text("model chat: ready in")
    screenshot(page, "logs")

    # Playground: a streamed chat, the answer growing token by token.
    page.get_by_role("navigation").get_by_role("link", name="Playground").click()
    expect(page.locator("#chat-model")).to_have_value("chat")
    page.locator("#chat-prompt").fill("Tell me something about trio.")
    page.locator("#chat-send").click()
    streaming = page.locator(".message.assistant[data-streaming] .content")
    expect(streaming).to_contain_text("tok0")  # seen while the stream is still open
    expect(page.locator("#chat-stop")).to_be_visible()
    answer = page.locator(".message.assistant").last
    expect(answer.locator(".stats")).to_contain_text("32 tokens")
    expect(answer.locator(".stats")).to_contain_text("tokens/s")
    expect(answer.locator(".content")).to_contain_text("tok31")
    expect(page.locator("#chat-send")).to_be_visible()
    screenshot(page, "playground")

    # Activity: the chat request (and the two before it), newest first.
    page.get_by_role("navigation").get_by_role("link", name="Activity").click()
    table = page.locator("#activity tbody")
    expect(table.locator("tr")).to_have_count(3)
    newest = table.locator("tr").first
    expect(newest).to_contain_text("chat")
    expect(newest).to_contain_text("/v1/chat/completions")
    expect(newest).to_contain_text("200")
    expect(newest.locator('[data-field="tokens_per_second"]')).to_have_text(re.compile(r"\d"))
    # A new request appears without a reload.
    with httpx.Client(base_url=trio_swap.url, headers=trio_swap.headers(), timeout=60) as client:
        body = {"model": "gpt-4o-mini", "prompt": "hi", "max_tokens": 4}
        assert client.post("/v1/completions", json=body).status_code == 200
    expect(table.locator("tr")).to_have_count(4)
    expect(table.locator("tr").first).to_contain_text("/v1/completions")
    screenshot(page, "activity")

    # Unload from the Models page: back to stopped, live.
    page.get_by_role("navigation").get_by_role("link", name="Models").click()
    chat.get_by_role("button", name="Unload", exact=True).click()
    expect(chat).to_have_attribute("data-state", "stopped")
    expect(chat.get_by_role("button", name="Load", exact=True)).to_be_enabled()
    expect(page.get_by_text("0 of 2 running")).to_be_visible()
    assert page.evaluate("window.notReloaded") is True

    # Air-gapped: nothing was fetched from anywhere but trio-swap.
    assert requested
    assert all(url.startswith(trio_swap.url + "/") for url in requested), requested


@pytest.mark.parametrize("trio_swap", ["sesame-0123"], indirect=True)
def test_with_api_keys_the_ui_asks_for_the_key_once(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    page.goto(trio_swap.url + "/ui/")
    dialog = page.locator("#key-dialog")
    expect(dialog).to_be_visible()
    expect(page.locator("#models tbody tr")).to_have_count(0)

    # A wrong key: asked again, saying why.
    page.locator("#key-input").fill("wrong")
    page.get_by_role("button", name="Use key").click()
    expect(dialog).to_be_visible()
    expect(dialog).to_contain_text("invalid API key")

    page.locator("#key-input").fill("sesame-0123")
    page.get_by_role("button", name="Use key").click()
    expect(dialog).to_be_hidden()
    expect(page.locator('#models tr[data-model="chat"]')).to_have_attribute("data-state", "stopped")
    expect(page.locator("#connection")).to_have_attribute("data-state", "live")

    # Requests made with the key work: loading a model.
    page.locator('#models tr[data-model="coder"]').get_by_role(
        "button", name="Load", exact=True
    ).click()
    expect(page.locator('#models tr[data-model="coder"]')).to_have_attribute("data-state", "ready")

    # Kept in this browser: a reload does not ask again. "Forget key" asks again.
    page.reload()
    expect(page.locator('#models tr[data-model="coder"]')).to_have_attribute("data-state", "ready")
    expect(dialog).to_be_hidden()
    page.get_by_role("button", name="Forget key").click()
    expect(dialog).to_be_visible()


def chat_body(model: str) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True}
