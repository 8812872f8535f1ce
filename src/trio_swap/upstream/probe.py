"""The readiness probe: one ``GET <checkEndpoint>`` on a fresh connection, closed after.

Why not the pooled forwarder or httpx: a probe's connection must never stay
open. llama-server answers a SIGTERM in ~8 ms when no client holds a
connection to it and ~110 ms when an idle keep-alive connection is open (its
HTTP server polls), and a probe pool left behind would be exactly that idle
connection when the model is later stopped. So each probe dials, sends one
request with ``Connection: close`` and hangs up. On loopback a connect costs
tens of microseconds; h11 is the engine the forwarder already uses, so no
third HTTP stack is needed (docs/benchmarks.md compares it with httpx).

:class:`HealthProbe` is the seam: :class:`~trio_swap.upstream.process.ModelProcess`
takes any callable of that shape, and tests pass a fake that answers from a
fake child's state on trio's virtual clock.
"""

from __future__ import annotations

import ssl
from typing import Final, Protocol
from urllib.parse import quote

import h11
import trio

from trio_swap.config.address import Upstream

__all__ = ["HealthProbe", "http_health_probe"]

_READ_SIZE: Final = 16 * 1024
_ssl_context: ssl.SSLContext | None = None


class HealthProbe(Protocol):
    """Whether the server at ``upstream`` answers ``GET path`` with 200 right now."""

    async def __call__(self, upstream: Upstream, path: str, *, timeout: float) -> bool: ...


async def http_health_probe(upstream: Upstream, path: str, *, timeout: float) -> bool:
    """One health request; any failure (refused, reset, garbage, timeout) is "not ready"."""
    with trio.move_on_after(timeout):
        try:
            return await _get_status(upstream, path) == 200
        # ValueError: a name the resolver cannot encode (the config refuses those)
        except (OSError, ValueError, trio.BrokenResourceError, h11.ProtocolError):
            return False
    return False


def _request_target(path: str) -> bytes:
    """``checkEndpoint`` as a request target: blanks and non-ASCII percent-encoded, as
    httpx (the probe's earlier client) did; what is already encoded stays as it is."""
    return quote(path, safe="/?&=%:@!$'()*+,;~[]").encode("ascii")


async def _get_status(upstream: Upstream, path: str) -> int | None:
    global _ssl_context
    stream: trio.abc.Stream = await trio.open_tcp_stream(upstream.host, upstream.port)
    async with stream:
        if upstream.tls:
            if _ssl_context is None:
                _ssl_context = ssl.create_default_context()
            tls = trio.SSLStream(stream, _ssl_context, server_hostname=upstream.host)
            await tls.do_handshake()
            stream = tls
        conn = h11.Connection(h11.CLIENT)
        request = h11.Request(
            method=b"GET",
            target=upstream.target(_request_target(path), b""),
            headers=[(b"host", upstream.authority), (b"connection", b"close")],
        )
        await stream.send_all((conn.send(request) or b"") + (conn.send(h11.EndOfMessage()) or b""))
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some(_READ_SIZE)
                if not data:
                    return None
                conn.receive_data(bytes(data))
            elif isinstance(event, h11.Response):
                return event.status_code
            elif not isinstance(event, h11.InformationalResponse):
                return None
