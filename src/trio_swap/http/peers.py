"""Forwarding requests to peers: remote OpenAI-compatible servers (llama-swap's ``peers``).

A peer is another machine (another trio-swap or llama-swap, OpenRouter...),
so unlike the local model servers it is reached with httpx: TLS, proxy
environment variables (``HTTPS_PROXY``, ``NO_PROXY``...) and an unknown
network are what httpx is for, and the per-request CPU it costs is small next
to a round trip to another host.

:class:`PeerForwarder` sends one request and streams the answer back through
ASGI ``send`` as it arrives, so server-sent events reach the client token by
token, through the same body relay as local models
(:func:`~trio_swap.http.relay.relay_body`; this module maps httpx's errors
to :class:`~trio_swap.errors.PeerFailed` for it). Failures before the
response starts become a 502 ``peer proxy error`` body in the client's error
style; a failure after it started can only cut the body short (see
:meth:`PeerForwarder.forward`).

The request body is sent as given: choosing the peer and rewriting ``model``
and the filters happen before, in the caller.
"""

from __future__ import annotations

import http.cookiejar
import logging
import math
from collections.abc import Iterable
from types import TracebackType
from typing import Final, Self, final
from urllib.parse import quote_from_bytes, urlsplit, urlunsplit

import httpx
import msgspec
import trio
from hypercorn.typing import ASGISendCallable

from trio_swap.config.model import PeerConfig
from trio_swap.errors import ErrorStyle, PeerFailed
from trio_swap.http.relay import forward_header_bytes, relay_body

__all__ = ["PeerForwarder"]

log = logging.getLogger("trio_swap.http.peers")

#: Response headers the ASGI server writes itself or that belong to the peer's hop.
_NOT_RELAYED: Final = frozenset({b"date", b"server"})
#: Client credentials replaced by the peer's ``apiKey``.
_CREDENTIALS: Final = frozenset({b"authorization", b"x-api-key"})
_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
#: The longest a cancelled or finished exchange may spend closing the peer's response.
_CLOSE_TIMEOUT: Final = 5.0


class _NoCookies(http.cookiejar.DefaultCookiePolicy):
    """Never store a peer's cookies: the client is shared by every trio-swap client."""

    def set_ok(self, cookie: http.cookiejar.Cookie, request: object) -> bool:
        return False


@final
class PeerForwarder:
    """Sends requests to peers over one shared ``httpx.AsyncClient``; close it when done.

    Proxy environment variables are honoured (``trust_env``), as llama-swap
    does. Each request waits up to the peer's ``timeouts.connect`` (default
    30 s) for a connection and its ``timeouts.responseHeader`` (default: no
    limit) for the response head; reading the body never times out, since a
    model may think for minutes between two tokens.
    """

    def __init__(self) -> None:
        self._client = httpx.AsyncClient(
            trust_env=True,
            timeout=httpx.Timeout(None, connect=30.0),
            limits=httpx.Limits(max_connections=None, max_keepalive_connections=32),
            cookies=http.cookiejar.CookieJar(policy=_NoCookies()),
        )
        # Only what the client sends goes out: without its Accept-Encoding the
        # peer must not compress (the body is relayed byte for byte).
        del self._client.headers["accept-encoding"]

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection to every peer."""
        await self._client.aclose()

    async def forward(
        self,
        peer: PeerConfig,
        *,
        method: str,
        raw_path: bytes,
        query: bytes,
        headers: list[tuple[bytes, bytes]],
        body: bytes,
        send: ASGISendCallable,
        style: ErrorStyle,
    ) -> int:
        """Send one request to ``peer`` and relay its answer through ``send``; returns the status.

        The URL is ``peer.proxy + raw_path`` (plus ``?query``). ``headers`` are
        the client's (ASGI: lower-case names) minus hop-by-hop ones; ``Host``
        becomes the peer's. With an ``apiKey``, ``Authorization: Bearer <key>``
        and ``x-api-key: <key>`` replace the client's.

        Errors before the response starts (no connection, TLS, no response head
        within ``timeouts.responseHeader``, a broken head) send a 502
        ``peer proxy error`` in ``style`` and return 502. Once the peer's status
        and headers went out, a broken body is logged; an SSE stream then gets
        a last event carrying the error (as the OpenAI and Anthropic SDKs read
        it) and ends normally, any other body raises :class:`PeerFailed` so the
        ASGI server aborts the connection (the response has started: do not
        turn that exception into an error response). Cancellation (the client
        went away) closes the peer's response before it propagates.
        """
        # httpx would re-encode non-ASCII text as UTF-8: escape raw bytes first.
        url = peer.proxy + quote_from_bytes(raw_path, safe=_URL_SAFE)
        if query:
            url += "?" + quote_from_bytes(query, safe=_URL_SAFE)
        response: httpx.Response | None = None
        try:
            try:
                request = self._client.build_request(
                    method,
                    url,
                    headers=_request_headers(headers, peer.api_key),
                    content=body,
                    timeout=httpx.Timeout(None, connect=peer.connect_timeout),
                )
                limit = peer.response_header_timeout or math.inf
                with trio.move_on_after(limit):
                    response = await self._client.send(request, stream=True)
            except (httpx.HTTPError, httpx.InvalidURL, OSError) as exc:
                error = PeerFailed(peer.id, f"{method} {_redacted(url)}: {_describe(exc)}")
                return await _send_error(send, error, style)
            if response is None:
                error = PeerFailed(
                    peer.id,
                    f"{method} {_redacted(url)}: no response headers within "
                    f"{peer.response_header_timeout:g}s (timeouts.responseHeader)",
                )
                return await _send_error(send, error, style)
            await self._relay(peer, response, send, style)
            return response.status_code
        finally:
            if response is not None:
                with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
                    await response.aclose()

    async def _relay(
        self, peer: PeerConfig, response: httpx.Response, send: ASGISendCallable, style: ErrorStyle
    ) -> None:
        is_sse = "text/event-stream" in response.headers.get("content-type", "")
        await send(
            {
                "type": "http.response.start",
                "status": response.status_code,
                "headers": _response_headers(response.headers.raw, is_sse=is_sse),
                "trailers": False,
            }
        )

        def cut_off(exc: httpx.HTTPError) -> PeerFailed:
            return PeerFailed(peer.id, f"response cut off: {_describe(exc)}")

        await relay_body(
            response.aiter_raw(),
            send,
            sse=is_sse,
            style=style,
            broken=httpx.HTTPError,
            cut_off=cut_off,
        )


def _request_headers(
    headers: Iterable[tuple[bytes, bytes]], api_key: str
) -> list[tuple[bytes, bytes]]:
    forwarded = forward_header_bytes(headers)
    if not api_key:
        return forwarded
    key = api_key.encode()
    kept = [(name, value) for name, value in forwarded if name.lower() not in _CREDENTIALS]
    return [*kept, (b"authorization", b"Bearer " + key), (b"x-api-key", key)]


def _response_headers(
    raw: Iterable[tuple[bytes, bytes]], *, is_sse: bool
) -> list[tuple[bytes, bytes]]:
    lowered = [(name.lower(), value) for name, value in raw]
    kept = [
        (name, value) for name, value in forward_header_bytes(lowered) if name not in _NOT_RELAYED
    ]
    # The peer's Content-Length still holds: the body is relayed raw (still encoded).
    kept.extend((name, value) for name, value in lowered if name == b"content-length")
    if is_sse:  # tell nginx in front not to buffer SSE (once: the peer may say so too)
        kept = [(name, value) for name, value in kept if name != b"x-accel-buffering"]
        kept.append((b"x-accel-buffering", b"no"))
    return kept


#: Printable ASCII goes out as the client wrote it (``%XX`` escapes included).
_URL_SAFE: Final = "".join(chr(c) for c in range(0x21, 0x7F))


def _redacted(url: str) -> str:
    """``url`` for an error message: a password in it (``user:pass@host``) is hidden."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{parts.username}:xxxxx@{host}"))


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


async def _send_error(send: ASGISendCallable, error: PeerFailed, style: ErrorStyle) -> int:
    log.warning("%s", error.message)
    body = msgspec.json.encode(error.body(style))
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": [*_JSON_HEADERS, (b"content-length", b"%d" % len(body))],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return error.status
