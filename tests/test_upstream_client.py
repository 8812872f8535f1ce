"""The hot-path HTTP/1.1 client: URL handling, keep-alive reuse, stale-connection retry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import trio

from tests.conftest import free_port
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
