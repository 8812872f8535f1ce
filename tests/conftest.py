"""Shared harness: real responder processes behind a real trio-swap, real HTTP.

Rules for every test here: loopback only, port 0 or a freshly probed free
port, an absolute per-test limit (``fail_after``), and every process started
is gone when the test ends (the server's own shutdown stops them; tests that
kill trio-swap check the process groups themselves).
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

import httpx
import trio

from trio_swap.config.model import Config, ModelConfig
from trio_swap.server import RunningServer, serve


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def responder_model(model_id: str, *args: str, **fields: object) -> ModelConfig:
    """A model served by the built-in responder on a free port, with extra responder flags."""
    port = free_port()
    cmd = (
        sys.executable,
        "-m",
        "trio_swap",
        "responder",
        "--port",
        str(port),
        "--model",
        model_id,
        *args,
    )
    return ModelConfig(
        id=model_id,
        cmd=cmd,
        proxy=f"http://127.0.0.1:{port}",
        **fields,  # type: ignore[arg-type]
    )


def make_config(*models: ModelConfig, health_check_timeout: float = 30.0) -> Config:
    return Config(
        source="<test>",
        models={m.id: m for m in models},
        health_check_timeout=health_check_timeout,
        log_to_stdout="none",
    )


def alive(pid: int | None) -> bool:
    """True while ``pid`` exists and is not a zombie."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ", 1)[1][0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def group_alive(pgid: int) -> bool:
    """True while a process of group ``pgid`` runs (zombies awaiting a reaper do not count)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(") ", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


@dataclass
class Harness:
    server: RunningServer
    client: httpx.AsyncClient

    async def models(self) -> dict[str, dict[str, object]]:
        response = await self.client.get("/api/models")
        response.raise_for_status()
        return {row["id"]: row for row in response.json()["models"]}

    def pid(self, model: str) -> int | None:
        return self.server.processes[model].pid


@asynccontextmanager
async def running(config: Config, **serve_options: object) -> AsyncIterator[Harness]:
    """Run trio-swap in-process on a free port; stop it (and its upstreams) afterwards."""
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(
            partial(
                serve,
                config,
                host="127.0.0.1",
                port=0,
                handle_signals=False,
                shutdown_timeout=2.0,
                **serve_options,  # type: ignore[arg-type]
            )
        )
        try:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                yield Harness(server, client)
        finally:
            pids = [p.pid for p in server.processes.values()]
            server.stop()
    assert not any(alive(pid) for pid in pids), "an upstream outlived trio-swap"


def chat(model: str, content: str = "hi", **extra: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **extra}


def sse_data(lines: Sequence[str]) -> list[str]:
    return [line[len("data: ") :] for line in lines if line.startswith("data: ")]
