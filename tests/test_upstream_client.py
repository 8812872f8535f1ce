"""The hot-path HTTP/1.1 client: URL handling, keep-alive reuse, stale-connection retry."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from tests.conftest import free_port, sockets_to
from trio_swap.errors import UpstreamFailed
from trio_swap.http.upstream_client import Upstream, UpstreamClient

BODY = b'{"model":"m","messages":[],"max_tokens":2}'


def test_upstream_target_joins_base_path_and_query() -> None:
    upstream = Upstream("http://127.0.0.1:5800/base/")
    assert (upstream.host, upstream.port, upstream.tls) == ("127.0.0.1", 5800, False)
    assert upstream.authority == b"127.0.0.1:5800"
    assert upstream.target(b"/v1/chat/completions", b"") == b"/base/v1/chat/completions"
    assert upstream.target(b"/x", b"a=1") == b"/base/x?a=1"
    assert Upstream("https://example.com").port == 443
    with pytest.raises(ValueError):
        Upstream("ftp://example.com")


@asynccontextmanager
async def responder(port: int) -> AsyncIterator[trio.Process]:
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_swap", "responder", "--port", str(port)],
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert process.stdout is not None
        await process.stdout.receive_some(4096)  # the "listening" line
        yield process
    finally:
        with contextlib.suppress(ProcessLookupError):  # a test may have killed it already
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()


async def ask(client: UpstreamClient, upstream: Upstream) -> bytes:
    answer = await client.send(
        upstream,
        method=b"POST",
        target=b"/v1/chat/completions",
        headers=[(b"content-type", b"application/json")],
        body=BODY,
        model="m",
    )
    try:
        assert answer.status == 200
        return b"".join([chunk async for chunk in answer.iter_raw()])
    finally:
        await answer.aclose()


async def test_connections_are_reused_and_a_stale_one_is_retried_once() -> None:
    port = free_port()
    upstream = Upstream(f"http://127.0.0.1:{port}")
    client = UpstreamClient()
    with trio.fail_after(20):
        async with responder(port):
            assert b"tok0" in await ask(client, upstream)
            (first,) = client._idle[("127.0.0.1", port)]
            assert b"tok0" in await ask(client, upstream)
            (second,) = client._idle[("127.0.0.1", port)]
            assert second is first  # keep-alive: one connection for both
            async with trio.open_nursery() as nursery:  # several at once: several connections
                for _ in range(4):
                    nursery.start_soon(ask, client, upstream)
            assert len(client._idle[("127.0.0.1", port)]) >= 2
        # the server went away and came back: every pooled connection is dead
        async with responder(port):
            assert b"tok0" in await ask(client, upstream)
            (third,) = client._idle[("127.0.0.1", port)]
            assert third is not first
        with pytest.raises(UpstreamFailed, match="cannot connect"):
            await ask(client, upstream)
    await client.aclose()


async def test_a_request_the_server_received_is_never_sent_twice() -> None:
    """The server reads the second request, then drops the connection: report, do not retry."""
    received: list[bytes] = []

    async def handler(stream: trio.SocketStream) -> None:
        buffer = b""
        while data := await stream.receive_some(65536):
            buffer += data
            while b"\r\n\r\n" in buffer:
                head, rest = buffer.split(b"\r\n\r\n", 1)
                length = next(
                    int(line.split(b":")[1])
                    for line in head.split(b"\r\n")
                    if line.lower().startswith(b"content-length")
                )
                body, buffer = rest[:length], rest[length:]
                received.append(body)
                if len(received) == 2:
                    await stream.aclose()  # a worker crash after reading the request
                    return
                await stream.send_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")

    client = UpstreamClient()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            port = listeners[0].socket.getsockname()[1]
            upstream = Upstream(f"http://127.0.0.1:{port}")
            first = await client.send(
                upstream, method=b"POST", target=b"/", headers=[], body=b"1", model="m"
            )
            assert b"".join([c async for c in first.iter_raw()]) == b"ok"
            await first.aclose()
            with pytest.raises(UpstreamFailed):
                await client.send(
                    upstream, method=b"POST", target=b"/", headers=[], body=b"2", model="m"
                )
            nursery.cancel_scope.cancel()
    assert received == [b"1", b"2"]
    await client.aclose()


async def keep_alive_server(
    headers: bytes, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED
) -> None:
    """Answers every request with ``ok`` and ``headers``; never closes a connection itself."""

    async def handler(stream: trio.SocketStream) -> None:
        buffer = b""
        with contextlib.suppress(trio.BrokenResourceError):
            while data := await stream.receive_some(65536):
                buffer += data
                while b"\r\n\r\n" in buffer:
                    head, buffer = buffer.split(b"\r\n\r\n", 1)
                    length = next(
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length")
                    )
                    buffer = buffer[length:]
                    await stream.send_all(
                        b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n" + headers + b"\r\nok"
                    )

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(trio.serve_tcp, handler, 0)
        task_status.started(listeners[0].socket.getsockname()[1])


async def post(client: UpstreamClient, upstream: Upstream) -> None:
    answer = await client.send(
        upstream, method=b"POST", target=b"/", headers=[], body=b"x", model="m"
    )
    try:
        assert b"".join([c async for c in answer.iter_raw()]) == b"ok"
    finally:
        await answer.aclose()


async def test_retire_closes_idle_connections_at_once_and_never_pools_one_in_use() -> None:
    client = UpstreamClient()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(keep_alive_server, b"")
            upstream = Upstream(f"http://127.0.0.1:{port}")
            await post(client, upstream)
            assert client.idle_connections(upstream) == 1
            assert sockets_to(port) == 1
            busy = await client.send(
                upstream, method=b"POST", target=b"/", headers=[], body=b"x", model="m"
            )
            client.retire(upstream)  # the model's process is told to stop
            # No checkpoint in between: the idle socket is already closed.
            assert client.idle_connections(upstream) == 0
            assert sockets_to(port) == 1  # only the one in use
            assert b"".join([c async for c in busy.iter_raw()]) == b"ok"
            await busy.aclose()  # its response is over: closed, not pooled
            assert client.idle_connections(upstream) == 0
            assert sockets_to(port) == 0
            await post(client, upstream)  # a new process there: new connections pool again
            assert client.idle_connections(upstream) == 1
            nursery.cancel_scope.cancel()
    await client.aclose()


async def test_idle_connections_expire_before_the_servers_keep_alive_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    client = UpstreamClient()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.run)
            short = await nursery.start(keep_alive_server, b"keep-alive: timeout=3, max=100\r\n")
            silent = await nursery.start(keep_alive_server, b"")
            three, default = (
                Upstream(f"http://127.0.0.1:{short}"),
                Upstream(f"http://127.0.0.1:{silent}"),
            )
            await post(client, three)
            await post(client, default)
            await trio.sleep(1.5)
            assert client.idle_connections(three) == 1
            await trio.sleep(1.0)  # 2.5 s idle: past 3 s minus the 1 s margin, swept
            assert client.idle_connections(three) == 0
            assert client.idle_connections(default) == 1  # no header: 4 s
            await trio.sleep(2.0)
            assert client.idle_connections(default) == 0
            assert sockets_to(short) == sockets_to(silent) == 0  # nothing left in CLOSE-WAIT
            nursery.cancel_scope.cancel()
    await client.aclose()


async def test_a_connection_that_carried_an_event_stream_is_not_pooled() -> None:
    """llama-server closes it after the stream, unannounced: reusing it was a 502."""
    client = UpstreamClient()
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await nursery.start(keep_alive_server, b"content-type: text/event-stream\r\n")
            upstream = Upstream(f"http://127.0.0.1:{port}")
            await post(client, upstream)
            assert client.idle_connections(upstream) == 0
            assert sockets_to(port) == 0
            nursery.cancel_scope.cancel()
    await client.aclose()


async def test_a_retire_or_sweep_racing_a_checkout_never_hands_out_a_bad_connection() -> None:
    """Another task's ``sweep()`` or ``retire()`` (a crash hook) at any checkpoint of a
    checkout that throws dead idle connections away: no connection handed out twice,
    no closed socket handed out (a ValueError from poll instead of UpstreamFailed)."""
    client = UpstreamClient()
    port = free_port()
    upstream = Upstream(f"http://127.0.0.1:{port}")
    original = client._discard
    inject: list[Callable[[], None]] = []

    async def discard_with_a_race(connection: Any) -> None:
        while inject:
            inject.pop()()  # what another task could do at this checkpoint
        await original(connection)

    client._discard = discard_with_a_race  # type: ignore[method-assign]
    with trio.fail_after(20):
        async with responder(port) as process:
            async with trio.open_nursery() as nursery:
                for _ in range(4):
                    nursery.start_soon(ask, client, upstream)
            assert client.idle_connections(upstream) >= 3
            client._idle[("127.0.0.1", port)][-1].expiry = 0.0  # discarded by the checkout
            inject.append(client.sweep)
            first = await client._checkout(upstream, "m", reuse=True)
            second = await client._checkout(upstream, "m", reuse=True)
            assert first is not second
            for connection in (first, second):
                await original(connection)
            os.killpg(process.pid, signal.SIGKILL)  # every pooled connection gets EOF
            await process.wait()
            await trio.sleep(0.1)
            inject.append(lambda: client.retire(upstream))
            with pytest.raises(UpstreamFailed):
                await ask(client, upstream)
    await client.aclose()
