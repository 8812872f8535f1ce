"""The responder's websocket endpoints: ``/ws/echo`` (and OpenAI's ``/v1/realtime``, the
same echo, so a model route with ``?model=`` can be tested), for a proxy's websocket relay.

hypercorn serves it as an ASGI ``websocket`` scope (the same server and
library as the HTTP routes, no second stack). What a client sends comes back:

* a binary message: the same bytes;
* a text message: the same text, except two commands:
  ``close <code> [reason]`` closes the socket with that code and reason (an
  upstream-initiated close), and ``request`` answers with a JSON text message
  describing the handshake as received (``path``, ``query``, ``headers``,
  ``subprotocols``, ``subprotocol``), so a test can see what a proxy passed on.

The handshake takes the first subprotocol the client offers, if any. Any other
path is refused with 404, and so is every path while the model is "loading"
(503), as the HTTP routes do; refusals use the ASGI websocket denial response.
:class:`WebsocketCounts` counts sockets for ``/debug/websockets``, so a test can
see when a proxy's upstream connection really ended.
"""

from __future__ import annotations

from typing import Final, final

import msgspec
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, WebsocketScope

__all__ = ["ECHO_PATH", "ECHO_PATHS", "WebsocketCounts", "serve_websocket"]

ECHO_PATH: Final = "/ws/echo"
#: Every path that echoes (a model route's websocket keeps its path upstream).
ECHO_PATHS: Final = frozenset({ECHO_PATH, "/v1/realtime"})

_encode: Final = msgspec.json.Encoder().encode


@final
class WebsocketCounts:
    """Echo sockets accepted, still open, and how the last one ended (``/debug/websockets``)."""

    __slots__ = ("accepted", "last_close", "open")

    def __init__(self) -> None:
        self.accepted = 0
        self.open = 0
        #: "client <code>" (the client closed or went away) or "server <code>" (``close``).
        self.last_close: str | None = None

    def as_json(self) -> bytes:
        return _encode(
            {"accepted": self.accepted, "open": self.open, "last_close": self.last_close}
        )


async def serve_websocket(
    scope: WebsocketScope,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
    *,
    counts: WebsocketCounts,
    loaded: bool,
) -> None:
    """One websocket, from ``websocket.connect`` to its close."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if scope["path"] not in ECHO_PATHS:
        await _deny(scope, send, 404, f"no websocket route for {scope['path']}")
        return
    if not loaded:
        await _deny(scope, send, 503, "Loading model")
        return
    offered = list(scope.get("subprotocols") or [])
    subprotocol = offered[0] if offered else None
    await send({"type": "websocket.accept", "subprotocol": subprotocol, "headers": []})
    counts.accepted += 1
    counts.open += 1
    try:
        await _echo(scope, receive, send, counts, subprotocol)
    finally:
        counts.open -= 1


async def _echo(
    scope: WebsocketScope,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
    counts: WebsocketCounts,
    subprotocol: str | None,
) -> None:
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            counts.last_close = f"client {message.get('code', 1005)}"
            return
        if message["type"] != "websocket.receive":
            continue
        data = message.get("bytes")
        if data is not None:
            await send({"type": "websocket.send", "bytes": data, "text": None})
            continue
        text = message.get("text") or ""
        if text.startswith("close"):
            code, _, reason = text[len("close") :].strip().partition(" ")
            close_code = int(code) if code.isdigit() else 1000
            counts.last_close = f"server {close_code}"
            await send({"type": "websocket.close", "code": close_code, "reason": reason or None})
            return
        if text == "request":
            text = _request_json(scope, subprotocol)
        await send({"type": "websocket.send", "bytes": None, "text": text})


def _request_json(scope: WebsocketScope, subprotocol: str | None) -> str:
    headers: dict[str, str] = {}
    for raw_name, raw_value in scope["headers"]:
        name = raw_name.decode("latin-1").lower()
        value = raw_value.decode("latin-1")
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    described = {
        "path": scope["path"],
        "query": scope["query_string"].decode("latin-1"),
        "headers": headers,
        "subprotocols": list(scope.get("subprotocols") or []),
        "subprotocol": subprotocol,
    }
    return _encode(described).decode()


async def _deny(scope: WebsocketScope, send: ASGISendCallable, status: int, message: str) -> None:
    """Refuse the handshake with ``status`` and an OpenAI-style JSON error, where the
    server can send a response; else close before accepting (hypercorn: 403)."""
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008, "reason": message})
        return
    body = _encode({"error": {"message": message, "type": "invalid_request_error", "code": status}})
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
