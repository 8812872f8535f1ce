"""Forwarding one request to a model's server and streaming the answer back untouched.

The body is relayed with ``aiter_raw()``: whatever bytes have arrived go out in
one send, nothing is parsed or re-chunked on the hot path (SSE events reach the
client as the upstream writes them). The upstream response is closed by the
request's cleanup, so a client disconnect closes the upstream connection too,
and the upstream sees the request cancelled.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Iterable
from contextlib import aclosing
from typing import Final, cast, final

import httpx
import msgspec

from trio_swap.errors import UpstreamFailed

__all__ = ["RelayBody", "forward_headers", "open_upstream", "response_headers"]

log = logging.getLogger("trio_swap.relay")

#: Connection-level headers that must not cross a proxy (RFC 9110 §7.6.1), plus the
#: ones httpx and hypercorn compute themselves.
_HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)


def forward_headers(headers: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Client headers to send upstream: everything except hop-by-hop ones."""
    return [(name, value) for name, value in headers if name.lower() not in _HOP_BY_HOP]


def response_headers(response: httpx.Response) -> list[tuple[str, str]]:
    """Upstream headers to send to the client; content-length kept when the upstream set one."""
    kept = [
        (name, value)
        for name, value in response.headers.multi_items()
        if name.lower() not in _HOP_BY_HOP
    ]
    length = response.headers.get("content-length")
    if length is not None:
        kept.append(("content-length", length))
    if "text/event-stream" in response.headers.get("content-type", ""):
        kept.append(("x-accel-buffering", "no"))  # tell nginx in front not to buffer SSE
    return kept


async def open_upstream(
    client: httpx.AsyncClient,
    *,
    model: str,
    method: str,
    url: str,
    headers: list[tuple[str, str]],
    body: bytes,
) -> httpx.Response:
    """Send the request and return once the upstream's status and headers are in.

    The caller owns the response and must ``aclose()`` it.

    Raises:
        UpstreamFailed: could not connect, or the upstream broke the connection.
    """
    request = client.build_request(method, url, headers=headers, content=body)
    try:
        return await client.send(request, stream=True)
    except httpx.HTTPError as exc:
        raise UpstreamFailed(model, _describe(exc)) from exc


@final
class RelayBody:
    """The response body as an async iterator of raw upstream bytes.

    If the upstream breaks mid-body, an SSE stream gets a final ``error`` event
    (the OpenAI SDKs raise it as an APIError) so the client learns the answer
    is incomplete; other bodies just end (the status is already sent).
    """

    def __init__(self, response: httpx.Response, *, model: str) -> None:
        self._response = response
        self._model = model
        self._is_sse = "text/event-stream" in response.headers.get("content-type", "")

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[bytes]:
        try:
            raw = cast(AsyncGenerator[bytes, None], self._response.aiter_raw())  # it is a generator
            async with aclosing(raw) as chunks:
                async for chunk in chunks:
                    yield chunk
        except httpx.HTTPError as exc:
            detail = _describe(exc)
            log.warning("model %s: upstream broke the response: %s", self._model, detail)
            if self._is_sse:
                error = UpstreamFailed(self._model, f"response cut off: {detail}")
                yield b"data: " + msgspec.json.encode(error.body()) + b"\n\n"


def _describe(exc: httpx.HTTPError) -> str:
    text = str(exc) or type(exc).__name__
    return f"{type(exc).__name__}: {text}" if text != type(exc).__name__ else text
