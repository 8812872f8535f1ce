"""The readiness probe against servers that misbehave: every failure is "not ready",
within its timeout, and no connection is left open (``upstream/probe.py``)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial

import pytest
import trio

from trio_swap.config.address import Upstream
from trio_swap.upstream.probe import http_health_probe

Behaviour = Callable[[trio.SocketStream], Awaitable[None]]


class Server:
    """A TCP server on a free port; each connection is handed to a behaviour."""

    def __init__(self, port: int) -> None:
        self.port = port
        #: What each connection sent first (the probe's request).
        self.seen: list[bytes] = []
        #: Connections whose handler has not finished (the client has not hung up).
        self.open = 0

    async def all_closed(self) -> None:
        """Wait until the probe's side of every connection is closed."""
        while self.open:
            await trio.sleep(0.01)


@asynccontextmanager
async def server(behaviour: Behaviour) -> AsyncIterator[Server]:
    served = Server(0)

    async def handle(stream: trio.SocketStream) -> None:
        served.open += 1
        try:
            async with stream:
                served.seen.append(await stream.receive_some(65536))
                with contextlib.suppress(trio.BrokenResourceError):
                    await behaviour(stream)
                while await stream.receive_some(65536):  # until the probe hangs up
                    pass
        finally:
            served.open -= 1

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, handle, 0, host="127.0.0.1"))
        served.port = listeners[0].socket.getsockname()[1]
        yield served
        nursery.cancel_scope.cancel()


def answer(data: bytes) -> Behaviour:
    async def reply(stream: trio.SocketStream) -> None:
        await stream.send_all(data)

    return reply


async def silence(stream: trio.SocketStream) -> None:
    """Accept, never answer (the handler then waits for the probe to hang up)."""


async def endless_continue(stream: trio.SocketStream) -> None:
    while True:
        await stream.send_all(b"HTTP/1.1 100 Continue\r\n\r\n")
        await trio.sleep(0.01)


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def probe(port: int, path: str = "/health", *, tls: bool = False, timeout: float = 5) -> bool:
    scheme = "https" if tls else "http"
    return await http_health_probe(Upstream(f"{scheme}://127.0.0.1:{port}"), path, timeout=timeout)


async def test_a_200_is_ready_and_the_connection_is_closed_after() -> None:
    ok = answer(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
    with trio.fail_after(10):
        async with server(ok) as served:
            before = fds()
            assert await probe(served.port, "/health")
            await served.all_closed()  # never returns if the probe kept its socket
            assert fds() == before
            (request,) = served.seen
            assert request.startswith(b"GET /health HTTP/1.1\r\n")
            assert b"connection: close" in request.lower()


@pytest.mark.parametrize(
    "behaviour",
    [
        answer(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\n\r\n"),
        answer(b"garbage that is not HTTP\r\n\r\n"),
        answer(b"HTTP/1.1 200 OK\r\ncontent-"),  # closes in the middle of the head
        answer(b""),  # closes without a byte
        endless_continue,  # 1xx forever: only the timeout ends it
        silence,  # accepts, never answers
    ],
    ids=["503", "garbage", "cut-head", "empty", "endless-1xx", "silence"],
)
async def test_any_failure_is_not_ready_within_the_timeout(behaviour: Behaviour) -> None:
    with trio.fail_after(10):
        async with server(behaviour) as served:
            before = fds()
            assert not await probe(served.port, timeout=0.3)
            await served.all_closed()  # never returns if the probe kept its socket
            assert fds() == before


async def test_tls_against_a_plain_server_is_not_ready() -> None:
    with trio.fail_after(10):
        async with server(answer(b"HTTP/1.1 200 OK\r\n\r\n")) as served:
            assert not await probe(served.port, tls=True, timeout=2)


async def test_nobody_listening_is_not_ready() -> None:
    async with server(silence) as served:
        pass  # the port is closed again
    assert not await probe(served.port, timeout=2)


async def test_a_check_endpoint_with_blanks_or_non_ascii_is_percent_encoded() -> None:
    ok = answer(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
    with trio.fail_after(10):
        async with server(ok) as served:
            assert await probe(served.port, "/health check/é?x=1")
            assert served.seen[0].startswith(b"GET /health%20check/%C3%A9?x=1 HTTP/1.1\r\n")
