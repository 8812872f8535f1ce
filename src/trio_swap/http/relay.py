"""Which headers cross the proxy, in each direction.

Bodies are relayed untouched by :mod:`trio_swap.http.inference`; headers are
filtered here: connection-level ones stay on their own hop, and the ones
hypercorn writes itself are not duplicated.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

import msgspec

from trio_swap.errors import ErrorStyle, SwapError
from trio_swap.http.upstream_client import UpstreamResponse

__all__ = ["forward_header_bytes", "response_header_bytes", "sse_error_event"]

#: Connection-level headers that must not cross a proxy (RFC 9110 §7.6.1), plus the
#: framing headers the client and hypercorn compute themselves.
_HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
        b"host",
        b"content-length",
    }
)
#: Response headers hypercorn writes itself; relaying the upstream's too would duplicate them.
_SERVER_OWNED: Final = frozenset({b"date", b"server"})
_NOT_RELAYED: Final = _HOP_BY_HOP | _SERVER_OWNED


def forward_header_bytes(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Client headers (ASGI: lower-case names) to send upstream, minus hop-by-hop ones.

    That includes any header the client's ``Connection`` header names (RFC 9110 §7.6.1).
    """
    kept: list[tuple[bytes, bytes]] = []
    connection = b""
    for name, value in headers:
        if name in _HOP_BY_HOP:
            if name == b"connection":
                connection += b"," + value
        else:
            kept.append((name, value))
    if not connection:
        return kept
    named = {token.strip().lower() for token in connection.split(b",")}
    return [(name, value) for name, value in kept if name not in named]


def response_header_bytes(response: UpstreamResponse) -> list[tuple[bytes, bytes]]:
    """Upstream headers for the client; ``content-length`` kept when the upstream set one."""
    kept = [(name, value) for name, value in response.headers if name not in _NOT_RELAYED]
    length = response.header(b"content-length")
    if length is not None:
        kept.append((b"content-length", length))
    if b"text/event-stream" in (response.header(b"content-type") or b""):
        kept.append((b"x-accel-buffering", b"no"))  # tell nginx in front not to buffer SSE
    return kept


def sse_error_event(error: SwapError, style: ErrorStyle) -> bytes:
    """The last event of a stream that broke after its 200 went out.

    The OpenAI SDKs raise on a ``data: {"error": ...}`` event; the Anthropic SDK
    skips unnamed events and raises only on one named ``error``.
    """
    data = msgspec.json.encode(error.body(style))
    if style == "anthropic":
        return b"event: error\ndata: " + data + b"\n\n"
    return b"data: " + data + b"\n\n"
