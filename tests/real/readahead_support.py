"""Helpers for the read-ahead lane and its bench: a config with per-model keys, timed loads.

``real_support.start_trio_swap`` writes its own config (one ``cmd`` per model);
the read-ahead lane needs ``prefetch:`` per model and at the top, so this
module writes the config text it is given and starts trio-swap the same way.
"""

from __future__ import annotations

import shlex
import time
from pathlib import Path

import httpx
from real_support import LLAMA_SERVER_FLAGS, TrioSwapServer, free_port_range, serve_config


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
    server_bin = Path(shlex.split(models[0][1].split("cmd: ", 1)[1])[0])
    return serve_config(tmp, config, files, server_bin)


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
