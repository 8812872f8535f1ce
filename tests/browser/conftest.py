"""Fixtures for the browser lane: Debian's headless Chromium driven by Playwright.

Run with ``just test-browser`` (``pytest -m browser tests/browser``); the default
test run deselects it. Playwright drives the system Chromium
(``apt-get install chromium``; no ``playwright install``), found at
``$TRIO_SWAP_CHROMIUM`` or ``/usr/bin/chromium``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = os.environ.get("TRIO_SWAP_CHROMIUM", "/usr/bin/chromium")


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: pip install -e '.[browser]'")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"no Chromium at {CHROMIUM}: `apt-get install -y --no-install-recommends chromium` "
            "or set TRIO_SWAP_CHROMIUM"
        )
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (empty localStorage) with a desktop-sized window."""
    from playwright.sync_api import expect

    expect.set_options(timeout=30_000)  # a model load is a real process start
    context = browser.new_context(viewport={"width": 1280, "height": 720})
    context.set_default_timeout(30_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    # A Content-Security-Policy violation is only a console message, not a page error.
    page.on(
        "console",
        lambda message: (
            errors.append(message.text)
            if message.type == "error" and "Content Security Policy" in message.text
            else None
        ),
    )
    try:
        yield page
    finally:
        context.close()
    assert errors == [], f"uncaught errors or CSP violations in the page: {errors}"
