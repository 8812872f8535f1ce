"""Relaying an answer to the client: the body loop, the disconnect watcher, and which headers cross.

Every answer from elsewhere (a local model's server, the loading-progress
stream, a peer) reaches the client through :func:`relay_body`: whatever one
read of the upstream produced goes out as one ASGI send, unparsed (DESIGN.md:
the SSE relay target). When the upstream breaks the body, the end depends on
what the client was promised:

1. a non-SSE body: the error is raised, so hypercorn aborts the connection
   (ending cleanly would hand the client a truncated body that looks complete);
2. an SSE body: a last event carries the error in the endpoint's style (the
   OpenAI and Anthropic SDKs raise it), then the body ends.

:func:`while_connected` runs an exchange beside a disconnect watcher, as
starlette's ``StreamingResponse`` does: whichever finishes first cancels the
other, so a client that leaves cancels the wait for a model or closes the
upstream connection at once (under hypercorn the disconnect would otherwise
only surface at the next send).

Headers are filtered here too: connection-level ones stay on their own hop,
and the ones hypercorn writes itself are not duplicated.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Final, TypeVar, TypeVarTuple

import msgspec
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable

from trio_swap.errors import ErrorStyle, SwapError, UpstreamFailed
from trio_swap.http.upstream_client import UpstreamResponse

__all__ = [
    "forward_header_bytes",
    "relay_body",
    "response_header_bytes",
    "sse_error_event",
    "upstream_cut_off",
    "while_connected",
]

log = logging.getLogger("trio_swap.http")

_Broken = TypeVar("_Broken", bound=Exception)
_Args = TypeVarTuple("_Args")

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


def upstream_cut_off(exc: UpstreamFailed) -> UpstreamFailed:
    """What the client is told when a local model's server broke a body (``response cut off``)."""
    return UpstreamFailed(exc.model, f"response cut off: {exc.detail}")


async def relay_body(
    chunks: AsyncIterator[bytes],
    send: ASGISendCallable,
    *,
    sse: bool,
    style: ErrorStyle,
    broken: type[_Broken],
    cut_off: Callable[[_Broken], SwapError],
) -> None:
    """Send each piece of ``chunks`` as it arrives, then end the body (the head is already sent).

    ``broken`` is what ``chunks`` raises when the upstream breaks the body,
    and ``cut_off`` turns it into the error the client is told (the seam
    where an httpx error becomes a :class:`~trio_swap.errors.PeerFailed`).
    ``sse`` says whether the client was promised an event stream.

    Raises:
        SwapError: ``cut_off``'s error, for a body that is not ``sse`` (the
            response has started: let the server abort the connection, do not
            turn it into an error response).
    """
    try:
        async for chunk in chunks:
            if chunk:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
    except broken as exc:
        error = cut_off(exc)
        log.warning("%s", error.message)
        if not sse:
            raise error from exc
        event = sse_error_event(error, style)
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def while_connected(
    receive: ASGIReceiveCallable,
    exchange: Callable[[*_Args], Awaitable[None]],
    *args: *_Args,
) -> None:
    """Run ``exchange(*args)`` beside a disconnect watcher; whichever ends first cancels the other.

    Runs in the request handler's task and returns when ``exchange`` does,
    or when the client disconnects (``exchange`` is cancelled, so its
    cleanup must be shielded). The request body must be read already:
    from here on ``receive`` only reports the disconnect.
    """
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_watch_disconnect, receive, nursery.cancel_scope)
        await exchange(*args)
        nursery.cancel_scope.cancel(reason="response complete")


async def _watch_disconnect(receive: ASGIReceiveCallable, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel(reason="client disconnected")
