"""The Hardware page in headless Chromium against a real trio-swap with a fake NVML.

trio-swap runs with ``tests/fake_nvml`` first on its ``PYTHONPATH``, so its own
NVML loading finds two fake GPUs (the second cannot report a temperature).
The ``canned`` tests answer ``/api/performance`` with fixed bodies (Playwright
routes): sampling disabled, and a machine without NVML.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.support import TrioSwap, screenshot, start_trio_swap, stop_trio_swap

if TYPE_CHECKING:
    from playwright.sync_api import Page, Route

pytestmark = pytest.mark.browser

FAKE_NVML = Path(__file__).parent.parent / "fake_nvml"


@pytest.fixture
def trio_swap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[TrioSwap]:
    """trio-swap (no models) sampling every 5 s, its NVML the fake."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(FAKE_NVML), os.environ.get("PYTHONPATH")]))
    )
    server = start_trio_swap(tmp_path, {}, None, settings={"performance": {"every": "5s"}})
    try:
        yield server
    finally:
        stop_trio_swap(server)


def test_the_hardware_page_shows_each_gpu_and_the_host(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    page.goto(trio_swap.url + "/ui/models")
    page.get_by_role("navigation").get_by_role("link", name="Hardware").click()
    expect(page).to_have_url(re.compile(r"/ui/hardware$"))
    expect(page.get_by_role("navigation").get_by_role("link", name="Hardware")).to_have_attribute(
        "aria-current", "page"
    )

    first = page.locator('#hw-gpus tr.hw-gpu[data-gpu="0"]')
    second = page.locator('#hw-gpus tr.hw-gpu[data-gpu="1"]')
    expect(first.locator('[data-field="name"]')).to_have_text("0: NVIDIA Fake A100 80GB")
    expect(first).to_contain_text("GPU-0f0f0f0f-aaaa-4bbb-8ccc-000000000000")
    expect(first.locator('[data-field="utilization"]')).to_have_text("37 %")
    expect(first.locator('[data-field="memory"]')).to_have_text("20.0 GiB / 80.0 GiB")
    expect(first.locator('[data-field="temperature"]')).to_have_text("61 °C")
    expect(first.locator('[data-field="power"]')).to_have_text("251.5 W")
    expect(first.locator("polyline")).to_have_attribute("points", re.compile(r"\d"))
    # The second GPU has no temperature sensor: that figure alone is missing.
    expect(second.locator('[data-field="name"]')).to_have_text("1: NVIDIA Fake RTX 4090")
    expect(second.locator('[data-field="temperature"]')).to_have_text(
        "\u2013"
    )  # an en dash: unknown
    expect(second.locator('[data-field="power"]')).to_have_text("35.3 W")
    expect(page.locator("#hw-no-gpus")).to_be_hidden()

    memory = page.locator('#hw-host [data-metric="memory"]')
    # Used / total of the real host: 825 MiB / 23.5 GiB on a quiet machine.
    used_of_total = re.compile(r"^[\d.]+ [KMGT]iB / [\d.]+ [KMGT]iB$")
    expect(memory.locator('[data-field="value"]')).to_have_text(used_of_total)
    expect(memory.locator('[data-field="detail"]')).to_contain_text("available")
    # The first sample has no CPU figure; the next fetch brings the second one's.
    cpu = page.locator('#hw-host [data-metric="cpu"]')
    expect(cpu.locator('[data-field="value"]')).to_have_text(re.compile(r"^\d+ %$"))
    expect(cpu.locator("polyline")).to_have_attribute("points", re.compile(r"\d"))
    expect(page.locator("#hw-summary")).to_contain_text("sampled every 5 s")


def test_canned_disabled_and_gpu_less_answers(trio_swap: TrioSwap, page: Page) -> None:
    from playwright.sync_api import expect

    answer: dict[str, object] = {"status": 503, "json": {"enabled": False}}

    def performance(route: Route) -> None:
        route.fulfill(status=answer["status"], json=answer["json"])  # type: ignore[arg-type]

    page.route(re.compile(r"/api/performance"), performance)
    page.goto(trio_swap.url + "/ui/hardware")
    banner = page.get_by_role("alert")
    expect(banner).to_have_text("Sampling is off: the config sets performance.disabled.")
    expect(page.locator("#hardware")).to_be_hidden()

    sample = {
        "time": 1_800_000_000.0,
        "cpu_utilization": 0.5,
        "memory_total_bytes": 64 << 30,
        "memory_used_bytes": 16 << 30,
        "memory_available_bytes": 48 << 30,
        "gpus": [],
    }
    answer.update(
        status=200,
        json={
            "enabled": True,
            "every": 5.0,
            "max_samples": 720,
            "gpus_found": False,
            "samples": [sample],
        },
    )
    page.reload()
    expect(page.locator("#hw-no-gpus")).to_contain_text("NVML is not available")
    expect(page.locator("#hw-gpus table")).to_be_hidden()
    host = page.locator("#hw-host")
    expect(host.locator('[data-metric="cpu"] [data-field="value"]')).to_have_text("50 %")
    expect(host.locator('[data-metric="memory"] [data-field="value"]')).to_have_text(
        "16.0 GiB / 64.0 GiB"
    )
    expect(host.locator('[data-metric="memory"] [data-field="detail"]')).to_have_text(
        "48.0 GiB available"
    )
    expect(page.get_by_role("alert")).to_be_hidden()

    # An hour of history: the lines span it, the latest figures are the last sample's.
    answer.update(status=200, json=canned_hour())
    page.reload()
    rows = page.locator("#hw-gpus tr.hw-gpu")
    expect(rows).to_have_count(2)
    expect(rows.first.locator('[data-field="utilization"]')).to_have_text("92 %")
    expect(rows.first.locator("polyline")).to_have_attribute(
        "points", re.compile(r"^0\.0,[\d.]+ (\S+ ){238}160\.0,[\d.]+$")
    )
    expect(page.locator("#hw-summary")).to_contain_text("sampled every 15 s")
    expect(page.locator("#hw-summary")).to_contain_text("lines over 60 min")
    screenshot(page, "hardware")


def canned_hour() -> dict[str, object]:
    """240 samples 15 s apart: a model loading on GPU 0 then generating, the host busy."""
    start = 1_800_000_000.0
    samples = []
    for i in range(240):
        busy = 0.92 if i >= 120 else (0.35 if i >= 100 else 0.03 + 0.02 * (i % 3))
        gpus = [
            {
                "index": 0,
                "name": "NVIDIA A100 80GB PCIe",
                "uuid": "GPU-5d3a6b0e-8c4f-4f7e-9a31-2b6f0c1d7e42",
                "utilization": busy,
                "memory_used_bytes": (62 << 30) if i >= 100 else (1 << 30),
                "memory_total_bytes": 80 << 30,
                "temperature_celsius": 71.0 if i >= 120 else 38.0,
                "power_watts": 281.4 if i >= 120 else 48.2,
            },
            {
                "index": 1,
                "name": "NVIDIA GeForce RTX 4090",
                "uuid": "GPU-9e1f4c2a-07b3-4d85-b6e0-3a8c5f1d2b97",
                "utilization": 0.18 * (1 + (i % 20) / 20) if i > 60 else 0.0,
                "memory_used_bytes": 9 << 30,
                "memory_total_bytes": 24 << 30,
                "temperature_celsius": None,
                "power_watts": 96.5,
            },
        ]
        samples.append(
            {
                "time": start + 15 * i,
                "cpu_utilization": None if i == 0 else 0.12 + (0.45 if 100 <= i < 120 else 0.0),
                "memory_total_bytes": 251 << 30,
                "memory_used_bytes": (74 << 30) if i >= 100 else (12 << 30),
                "memory_available_bytes": (177 << 30) if i >= 100 else (239 << 30),
                "gpus": gpus,
            }
        )
    return {
        "enabled": True,
        "every": 15.0,
        "max_samples": 240,
        "gpus_found": True,
        "samples": samples,
    }
