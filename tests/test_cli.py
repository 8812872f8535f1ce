"""The ``trio-swap`` command as a user runs it: a real process, real signals."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import trio

from tests.conftest import alive, chat, free_port, group_alive, wait_for


def write_config(tmp_path: Path, *extra_args: str) -> Path:
    """A config of two responder models numbered by ``${PORT}`` from a ``free_port()`` block."""
    start = free_port()
    python = sys.executable
    flags = " ".join(extra_args)
    text = f"""\
healthCheckTimeout: 30
startPort: {start}
logLevel: debug
models:
  alpha:
    cmd: {python} -m trio_swap responder --port ${{PORT}} --model ${{MODEL_ID}} {flags}
  beta:
    cmd: |
      {python} -m trio_swap responder
        # comment lines are dropped
        --port ${{PORT}} --model ${{MODEL_ID}}
"""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return path


@asynccontextmanager
async def trio_swap(*args: str) -> AsyncIterator[tuple[trio.Process, str]]:
    """Start ``trio-swap serve ARGS`` on a free port; yield (process, base url)."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_swap", "serve", "--listen", f"127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with httpx.AsyncClient() as client:

            async def healthy() -> bool:
                try:
                    return (await client.get(url + "/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(healthy, what=f"trio-swap to answer {url}/health", timeout=20)
        yield process, url
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
        assert process.stdout is not None
        await process.stdout.aclose()


async def upstream_pids(url: str) -> list[int]:
    async with httpx.AsyncClient() as client:
        models = (await client.get(url + "/api/models")).json()["models"]
    return [m["pid"] for m in models if m["pid"]]


async def test_sigterm_exits_zero_and_stops_every_upstream(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    with trio.fail_after(60):
        async with trio_swap("--config", str(config)) as (process, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                assert (await client.post("/v1/chat/completions", json=chat("alpha"))).is_success
            pids = await upstream_pids(url)
            assert len(pids) == 1
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
            assert not any(alive(pid) for pid in pids)


async def test_sigkill_of_trio_swap_leaves_no_upstream_behind(tmp_path: Path) -> None:
    """Invariant 5, the hard case: no cleanup code of ours runs; the guard must act."""
    config = write_config(tmp_path, "--ignore-sigterm")
    with trio.fail_after(60):
        async with trio_swap("--config", str(config)) as (process, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                assert (await client.post("/v1/chat/completions", json=chat("alpha"))).is_success
            (pid,) = await upstream_pids(url)
            process.kill()  # SIGKILL to trio-swap alone, not its group
            await process.wait()
            # It ignores SIGTERM and its parent is gone: without the guard it lives on.
            await wait_for(lambda: not group_alive(pid), what="the guard to kill the upstream")
            assert not alive(pid)


async def test_demo_serves_out_of_the_box() -> None:
    with trio.fail_after(60):
        async with trio_swap() as (process, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                models = (await client.get("/v1/models")).json()["data"]
                assert len(models) >= 2
                response = await client.post("/v1/chat/completions", json=chat(models[0]["id"]))
                assert response.status_code == 200
                assert response.json()["choices"][0]["message"]["content"]
            process.send_signal(signal.SIGINT)  # Ctrl-C
            assert await process.wait() == 0
            assert process.stdout is not None
            output = (await process.stdout.receive_some(1 << 20)).decode()
            assert re.search(r"curl http://127\.0\.0\.1:\d+/v1/chat/completions", output)


def test_check_reports_a_bad_config_with_file_key_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("models:\n  qwen:\n    cmd: llama-server --port ${PORT}\n    ttl: -5\n")
    result = subprocess.run(
        [sys.executable, "-m", "trio_swap", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{bad}:4" in result.stderr
    assert "models.qwen.ttl" in result.stderr


def test_check_accepts_the_example_config() -> None:
    example = Path(__file__).parent.parent / "config.example.yaml"
    result = subprocess.run(
        [sys.executable, "-m", "trio_swap", "check", "--config", str(example)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr


def test_version_and_help() -> None:
    run = [sys.executable, "-m", "trio_swap"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, timeout=30)
    assert version.returncode == 0 and version.stdout.startswith("trio-swap ")
    helptext = subprocess.run([*run, "serve", "--help"], capture_output=True, text=True, timeout=30)
    assert "--config" in helptext.stdout and "--listen" in helptext.stdout


def test_schema_prints_a_json_schema_of_the_config() -> None:
    import json

    result = subprocess.run(
        [sys.executable, "-m", "trio_swap", "schema"], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert "$defs" in schema and "RawModel" in json.dumps(schema)


async def test_max_body_mib_limits_request_bodies(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    big = {"model": "alpha", "messages": [], "pad": "x" * 20_000}
    with trio.fail_after(60):
        async with (
            trio_swap("--config", str(config), "--max-body-mib", "0.01") as (_, url),
            httpx.AsyncClient(base_url=url, timeout=30) as client,
        ):
            response = await client.post("/v1/chat/completions", json=big)
            assert response.status_code == 413
            assert "10485 byte limit" in response.json()["error"]["message"]
        refused = await trio.run_process(
            [sys.executable, "-m", "trio_swap", "serve", "--max-body-mib", "0"],
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    assert refused.returncode == 2 and b"must be greater than 0" in refused.stderr
