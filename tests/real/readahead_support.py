"""Helpers for the read-ahead lane and its bench: a config with per-model keys, timed loads.

``real_support.start_trio_swap`` writes its own config (one ``cmd`` per model);
the read-ahead lane needs ``prefetch:`` per model and at the top, so this
module writes the config text it is given and starts trio-swap the same way.
"""

from __future__ import annotations

import shlex
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from real_support import (
    LLAMA_SERVER_FLAGS,
    SERVE_START_TIMEOUT,
    TrioSwapServer,
    free_port_range,
)
from tests.conftest import free_port


def model_lines(model_id: str, server: Path, model: Path, *extra: str) -> list[str]:
    """One llama-server model entry, as YAML lines; ``extra``: more keys (``prefetch: false``)."""
    cmd = f"{shlex.quote(str(server))} -m {shlex.quote(str(model))} --port ${{PORT}}"
    return [f"  {model_id}:", f"    cmd: {cmd} {LLAMA_SERVER_FLAGS}", *(f"    {e}" for e in extra)]


def start_with_config(
    tmp: Path, top: list[str], models: list[list[str]], files: dict[str, Path]
) -> TrioSwapServer:
    """Write ``top`` lines and the ``models`` entries as the config, start trio-swap on it,
    and wait until it answers /health. ``files``: model id -> its file (for cleanup)."""
    config = tmp / "config.yaml"
    lines = [*top, "healthCheckTimeout: 60", f"startPort: {free_port_range(10)}", "models:"]
    for entry in models:
        lines += entry
    config.write_text("\n".join(lines) + "\n")
    port = free_port()
    log = tmp / "trio-swap.log"
    cmd = [
        sys.executable,
        "-m",
        "trio_swap",
        "serve",
        "--config",
        str(config),
        "--listen",
        f"127.0.0.1:{port}",
        "--state-dir",
        str(tmp / "state"),
    ]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    server_bin = Path(shlex.split(models[0][1].split("cmd: ", 1)[1])[0])
    handle = TrioSwapServer(proc, f"http://127.0.0.1:{port}", config, log, files, server_bin)
    deadline = time.monotonic() + SERVE_START_TIMEOUT
    with httpx.Client(timeout=2.0) as client:
        while True:
            if proc.poll() is not None:
                handle.kill_everything()
                pytest.fail(f"trio-swap exited before listening:\n{handle.log_tail()}")
            try:
                if client.get(f"{handle.base_url}/health").status_code == 200:
                    return handle
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                handle.kill_everything()
                pytest.fail(
                    f"trio-swap not healthy in {SERVE_START_TIMEOUT}s:\n{handle.log_tail()}"
                )
            time.sleep(0.05)


def row(client: httpx.Client, model: str) -> dict[str, object]:
    """``model``'s row of ``/api/models``."""
    rows = client.get("/api/models").json()["models"]
    found: dict[str, object] = next(r for r in rows if r["id"] == model)
    return found


def timed_load(client: httpx.Client, model: str) -> float:
    """Load ``model`` (``POST /api/models/load``) and return its spawn-to-ready seconds."""
    response = client.post(f"/api/models/load/{model}")
    assert response.status_code == 200, f"{model}: {response.status_code} {response.text}"
    seconds = row(client, model)["last_ready_seconds"]
    assert isinstance(seconds, float)
    return seconds


def unload_all(client: httpx.Client) -> None:
    """Stop every model and wait until each is stopped (its file is then unmapped)."""
    client.post("/api/models/unload").raise_for_status()
    deadline = time.monotonic() + 30
    while any(r["state"] != "stopped" for r in client.get("/api/models").json()["models"]):
        assert time.monotonic() < deadline, "models did not stop"
        time.sleep(0.02)


def resident(client: httpx.Client, model: str, path: Path) -> tuple[int | None, int | None]:
    """(bytes, resident_bytes) of ``path`` in ``model``'s row."""
    files = row(client, model)["files"]
    assert isinstance(files, list)
    entry = next(f for f in files if f["path"] == str(path))
    return entry["bytes"], entry["resident_bytes"]
