"""Shared harness: real responder processes behind a real trio-swap, real HTTP.

Rules for every test here: loopback only, port 0 or a port from ``free_port()``,
an absolute per-test limit (``fail_after``), and every process started is gone
when the test ends (the server's own shutdown stops them; tests that kill
trio-swap check the process groups themselves). A test waits for a condition
(an event, or ``wait_for``), never for a guessed length of time.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import inspect
import itertools
import os
import socket
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Final, TypeVar, overload

import httpx
import trio
from hypothesis import HealthCheck, settings

from trio_swap.config.model import Config, ModelConfig
from trio_swap.server import RunningServer, serve

# Property tests run beside real processes and other test workers: a slow
# example is the machine, not the code (the state machines bound their own size).
settings.register_profile("trio-swap", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("trio-swap")

T = TypeVar("T")

# --- ports ---------------------------------------------------------------------------

#: Ports handed out together by one ``free_port()`` call (see its docstring).
PORT_BLOCK: Final = 16
#: The lowest port ever handed out: well above the config default (startPort 5800)
#: and the usual development servers.
_POOL_FLOOR: Final = 20000
#: The file whose lock and contents make blocks unique across processes.
_COUNTER_FILE: Final = Path(tempfile.gettempdir()) / f"trio-swap-test-ports.{os.getuid()}"


def _ephemeral_range() -> tuple[int, int]:
    """The kernel's range for automatically chosen local ports (connect, bind to 0)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


@functools.cache
def _pool() -> range:
    """Block start ports: the larger gap outside the ephemeral range, above the floor."""
    low, high = _ephemeral_range()
    below = range(_POOL_FLOOR, max(_POOL_FLOOR, low), PORT_BLOCK)
    above = range(max(_POOL_FLOOR, high + 1), 65536 - PORT_BLOCK, PORT_BLOCK)
    pool = max(below, above, key=len)
    if len(pool) < 64:
        raise RuntimeError(f"no room for test ports outside the ephemeral range {low}-{high}")
    return pool


_local_counter = itertools.count(os.getpid())


def _next_block_index() -> int:
    """The next block number: shared by every process of this user through a locked file."""
    try:
        with open(_COUNTER_FILE, "a+") as counter:
            fcntl.flock(counter, fcntl.LOCK_EX)  # released when the file closes
            counter.seek(0)
            text = counter.read().strip()
            index = int(text) if text.isdigit() else os.getpid()
            counter.seek(0)
            counter.truncate()
            counter.write(str((index + 1) % len(_pool())))
            return index
    except OSError:  # no writable temp dir: unique within this process only
        return next(_local_counter)


def _block_is_free(start: int) -> bool:
    """True if every port of the block can be bound right now (nobody listens or lingers)."""
    for port in range(start, start + PORT_BLOCK):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def free_port() -> int:
    """A loopback port for a test's server that nothing else will take meanwhile.

    Binding port 0 and closing it (the usual trick) is racy here: the kernel
    hands that same number out again for the next outgoing connection, and these
    tests open connections constantly, so the server bound moments later could
    find its port taken. Instead ports come from below the kernel's ephemeral
    range (``/proc/sys/net/ipv4/ip_local_port_range``), which the kernel never
    picks by itself, in blocks of ``PORT_BLOCK``:

    - a counter in a file in the temp directory, read and advanced under
      ``fcntl.flock``, numbers the blocks, so every process of this user (pytest
      workers, two test runs at once) gets different blocks; without a writable
      temp directory a per-process counter seeded with the pid stands in;
    - a block is used only if each of its ports binds now (a server still
      listening there, or a connection in TIME_WAIT, makes us skip it); the
      counter wraps around the pool, and by the time it comes back the tests
      that held a block are long done.

    The port returned is the second of its block, so a caller may also use it
    as ``startPort`` and hand ``${PORT}`` to up to ``PORT_BLOCK - 2`` models above
    it, and the one port below it (a reload that moves ``startPort`` down).
    """
    pool = _pool()
    for _ in range(len(pool)):
        start = pool[_next_block_index() % len(pool)]
        if _block_is_free(start):
            return start + 1
    raise RuntimeError(f"no free block of {PORT_BLOCK} ports in {pool.start}-{pool.stop}")


@functools.cache
def _config_start_port() -> int:
    """``startPort`` for ``make_config``: one block per process, so that two configs
    built by ``make_config`` never differ in it (a reload would report the change)."""
    return free_port()


# --- waiting -------------------------------------------------------------------------


@overload
async def wait_for(
    predicate: Callable[[], Awaitable[T | None]],
    *,
    what: str,
    timeout: float = ...,
    interval: float = ...,
) -> T: ...
@overload
async def wait_for(
    predicate: Callable[[], T | None], *, what: str, timeout: float = ..., interval: float = ...
) -> T: ...
async def wait_for(
    predicate: Callable[[], object],
    *,
    what: str,
    timeout: float = 10.0,
    interval: float = 0.02,
) -> object:
    """Poll ``predicate`` (sync or async) until it returns something true; return that
    (so a predicate may return the value it looked at, or None to keep waiting).

    For conditions nothing signals (another process's state, a row written just
    after a response). ``timeout`` is a hang guard, not an expectation: keep it
    generous. Raises AssertionError naming ``what`` if the condition never holds.
    """
    with trio.move_on_after(timeout):
        while True:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result
            await trio.sleep(interval)
    raise AssertionError(f"gave up after {timeout}s waiting for {what}")


# --- configs and processes -----------------------------------------------------------


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
    """A config of ``models`` as if loaded from a file; ``startPort`` from ``free_port()``."""
    return Config(
        source="<test>",
        models={m.id: m for m in models},
        health_check_timeout=health_check_timeout,
        start_port=_config_start_port(),
        log_to_stdout="none",
    )


def sockets_to(port: int) -> int:
    """This process's TCP sockets whose *remote* port is ``port``, in any state (from
    /proc, not from trio-swap's bookkeeping): an in-process trio-swap's connections
    to a model server, idle, in use or left in CLOSE-WAIT."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                if int(fields[2].rsplit(":", 1)[1], 16) == port:
                    inodes.add(fields[9])
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            count += link.startswith("socket:[") and link[8:-1] in inodes
    return count


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

    async def wait_for_state(self, model: str, state: str, *, timeout: float = 10.0) -> None:
        """Poll ``/api/models`` until ``model`` is in ``state`` (``ready``, ``stopped``...)."""

        async def reached() -> bool:
            return (await self.models())[model]["state"] == state

        await wait_for(reached, what=f"model {model} to be {state}", timeout=timeout)


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
