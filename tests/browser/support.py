"""Helpers for the browser lane: a trio-swap child process, its config, screenshots.

trio-swap runs as a child process (``python -m trio_swap serve``), so the browser
talks to exactly what users run, on a free port, with responder models.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.conftest import free_port  # race-free: blocks below the ephemeral range

if TYPE_CHECKING:
    from playwright.sync_api import Page

#: Set to a directory (``docs``) to save a screenshot of each page there.
SCREENSHOTS = os.environ.get("TRIO_SWAP_SCREENSHOTS", "")
#: How long trio-swap may take to answer /health after being spawned.
SERVE_START_TIMEOUT = 30.0


def responder(model_id: str, *flags: str) -> dict[str, object]:
    """A model entry run by trio-swap's own fake OpenAI server on a free port."""
    port = free_port()
    cmd = [sys.executable, "-m", "trio_swap", "responder", "--port", str(port)]
    cmd += ["--model", model_id, *flags]
    return {"cmd": shlex.join(cmd), "proxy": f"http://127.0.0.1:{port}"}


@dataclass
class TrioSwap:
    """A running ``python -m trio_swap serve`` child."""

    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    api_key: str | None

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


def start_trio_swap(
    tmp: Path,
    models: dict[str, dict[str, object]],
    api_key: str | None,
    *,
    settings: dict[str, object] | None = None,
) -> TrioSwap:
    """Write a config (``settings``: more top-level keys, such as ``resources``), spawn
    trio-swap in its own session, wait until /health answers."""
    lines = ["healthCheckTimeout: 30", "logLevel: info"]
    if api_key:
        lines += ["apiKeys:", f"  - {api_key}"]
    lines += [f"{key}: {json.dumps(value)}" for key, value in (settings or {}).items()]
    lines.append("models:")
    for model_id, entry in models.items():
        lines.append(f"  {json.dumps(model_id)}:")
        lines += [f"    {key}: {json.dumps(value)}" for key, value in entry.items()]
    config = tmp / "config.yaml"
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    log = tmp / "trio-swap.log"
    cmd = [sys.executable, "-m", "trio_swap", "serve", "--config", str(config)]
    cmd += ["--listen", f"127.0.0.1:{port}"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server = TrioSwap(proc, f"http://127.0.0.1:{port}", log, api_key)
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"trio-swap exited with {proc.returncode}:\n{server.log_tail()}")
            with contextlib.suppress(httpx.TransportError):
                if client.get(f"{server.url}/health").status_code == 200:
                    return server
            if time.monotonic() > deadline:
                stop_trio_swap(server)
                pytest.fail(
                    f"trio-swap not healthy after {SERVE_START_TIMEOUT}s:\n{server.log_tail()}"
                )
            time.sleep(0.05)


def stop_trio_swap(server: TrioSwap) -> None:
    """SIGTERM (trio-swap stops its models), then SIGKILL the whole session if it hangs."""
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
        try:
            server.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait(timeout=10)


def screenshot(page: Page, name: str) -> None:
    """Save ``docs/ui-<name>.png`` when TRIO_SWAP_SCREENSHOTS names a directory."""
    if SCREENSHOTS:
        folder = Path(SCREENSHOTS)
        folder.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(folder / f"ui-{name}.png"))
