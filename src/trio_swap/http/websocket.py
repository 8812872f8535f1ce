"""Websocket proxying: a client's websocket relayed to its model's server, message by message.

The access middleware lets a websocket through only to a websocket route
(:mod:`trio_swap.http.websocket_paths`), after the ``Host`` and key checks; the
inference routes hand it here. One connection goes:

1. **resolve** like an HTTP request (:func:`~trio_swap.http.resolve.resolve`):
   ``/upstream/<model>/<rest>`` names the model in its path (``<rest>`` goes
   upstream); every other websocket route names it in ``?model=`` (profiles and
   selectors apply, as for the HTTP query routes), and the path goes upstream
   as it is. A scoped key may not reach a model outside its scope (403).
2. **wait for the model**: the router's lease, as any request (the model loads,
   it counts in flight, its TTL waits, a swap away from it waits like for a
   long stream) — unless the model has ``compat.ignoreWebsockets``: then no
   lease at all (nothing loads, nothing counts, nothing waits for it), the
   model's address is read from its process while it is ready, and a model not
   ready gets 409. A peer model takes no lease either (its machine schedules).
3. **connect upstream** (trio-websocket, on wsproto): the same path and query,
   the client's subprotocols and its end-to-end headers (minus the hop-by-hop
   and ``Sec-WebSocket-*`` ones; a peer's ``apiKey`` replaces the client's key).
4. **accept** the client with the subprotocol the upstream chose, then relay
   text and binary messages both ways until either side closes. Pings are
   answered by each side's library (hypercorn's and wsproto's).

Until the client is accepted, every failure is an HTTP answer to its
handshake (ASGI's websocket denial response, which hypercorn supports): the
router's error (503 a model that cannot start, 429 ``concurrencyLimit``, ...),
409 an ignored websocket's model not ready, the upstream's own refusal (status
and body relayed), 502 an upstream that cannot be reached. A client that leaves
meanwhile cancels the wait. After acceptance:

* the upstream closes: the client gets its code and reason (an upstream gone
  without a close frame, 1006, becomes 1011);
* trio-swap begins to shut down: both sides get 1001 (going away) at once,
  rather than a cut at the drain deadline;
* the client closes or goes away: the upstream gets 1000 (hypercorn reports
  every client close as 1006, so the client's own code cannot be passed on).

The lease is released however the socket ends.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections.abc import Awaitable, Callable, Iterable
from typing import Final, cast, final

import msgspec
import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, WebsocketScope
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from trio_swap.config.address import Upstream
from trio_swap.config.model import Config, PeerConfig
from trio_swap.errors import PeerFailed, SwapError, UpstreamFailed, error_style
from trio_swap.http.grants import target_refusal
from trio_swap.http.relay import forward_header_bytes
from trio_swap.http.resolve import LocalModel, Outbound, PeerModel, Redirect, resolve
from trio_swap.http.routes import PASSTHROUGH_PREFIX, VERSIONLESS_PATHS, ModelSource, Route
from trio_swap.http.selection import Choice, Selection
from trio_swap.router import Lease, Router

__all__ = ["CONNECT_TIMEOUT", "GOING_AWAY", "MAX_MESSAGE_BYTES", "ModelNotReady", "WebsocketProxy"]

log = logging.getLogger("trio_swap.http")

#: Seconds to open the upstream connection and finish its handshake (a local model's).
CONNECT_TIMEOUT: Final = 30.0
#: Seconds the upstream gets to answer our close frame.
CLOSE_TIMEOUT: Final = 5.0
#: Largest message taken from the upstream: hypercorn's limit for the client's side.
MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
_RECEIVE_BUFFER: Final = 64 * 1024

_PATH_ROUTE: Final = Route(ModelSource.PATH)
_QUERY_ROUTE: Final = Route(ModelSource.QUERY)
#: Response headers of an upstream's refusal that are not relayed (hypercorn writes its own).
_NOT_RELAYED: Final = frozenset({b"content-length", b"connection", b"date", b"server"})
#: Codes that never travel in a close frame (RFC 6455 §7.4.1): no status, abnormal, TLS.
_LOCAL_ONLY: Final = frozenset({1005, 1006, 1015})
_UPSTREAM_LOST: Final = 1011
#: The close code (and reason) every relayed socket gets when trio-swap shuts down.
GOING_AWAY: Final = 1001
_SHUTDOWN: Final = "trio-swap is shutting down"
#: Close codes when the server cannot send a denial response: try again later / policy.
_RETRY_LATER: Final = 1013
_POLICY: Final = 1008


class ModelNotReady(SwapError):
    """409: a websocket to a ``compat.ignoreWebsockets`` model that is not ready."""

    status = 409
    error_type = "invalid_request_error"
    code = "model_not_ready"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model {model!r} is not ready, and its websockets never load it "
            "(compat.ignoreWebsockets): load it with a request first"
        )
        self.model = model


class _Rejected(Exception):
    """The upstream answered the handshake with an HTTP response: relayed as it is."""

    def __init__(self, status: int, headers: Iterable[tuple[bytes, bytes]], body: bytes) -> None:
        super().__init__(status)
        self.status = status
        self.headers = [(n.lower(), v) for n, v in headers if n.lower() not in _NOT_RELAYED]
        self.body = body


@final
class WebsocketProxy:
    """Relays websockets to models (module docstring); one for the server's life."""

    def __init__(self, router: Router) -> None:
        self._router = router
        #: Set when trio-swap begins to shut down: open sockets are closed with 1001.
        self._going_away = trio.Event()

    def close_all(self) -> None:
        """Shutdown: tell every relayed socket (client and upstream) 1001, going away,
        instead of leaving them to be cut at the drain deadline."""
        self._going_away.set()

    async def __call__(
        self,
        scope: WebsocketScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        *,
        config: Config,
        selection: Selection | None,
    ) -> None:
        """One websocket, from ``websocket.connect`` to its close (``config``: the one in
        effect when it arrived)."""
        if (await receive())["type"] != "websocket.connect":
            return
        # A spillover reservation lasts the socket, and ends however it ends.
        with contextlib.ExitStack() as stack:
            choose = stack.enter_context(selection.held()) if selection is not None else None
            try:
                resolved = _resolve(config, scope, choose)
            except SwapError as error:
                await _deny(scope, send, error)
                return
            if isinstance(resolved, Redirect):
                await _deny_redirect(scope, send, resolved)
                return
            choice = resolved.choice
            target = resolved.target
            if (
                choice is not None
                and selection is not None
                and isinstance(target, LocalModel)
                and config.models[target.id].compat.ignore_websockets
            ):
                # An ignored websocket takes no lease: it reserves nothing (reference §5.8).
                stack.close()
            chooser = choice.selector if choice is not None else None
            refused = target_refusal(scope, target, resolved.requested, chooser)
            if refused is not None:
                await _deny(scope, send, refused)
                return
            await self._proxy(resolved, config, scope, receive, send)

    async def _proxy(
        self,
        outbound: Outbound,
        config: Config,
        scope: WebsocketScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        """Wait for the model, connect, accept, relay; the lease is released however it ends."""
        lease: Lease | None = None
        try:
            # The handshake phase runs in `waiting`: a client that leaves cancels it.
            async with trio.open_nursery() as waiting:
                watching = trio.CancelScope()
                waiting.start_soon(_cancel_on_disconnect, receive, watching, waiting.cancel_scope)
                try:
                    target = outbound.target
                    headers = _upstream_headers(scope["headers"])
                    if isinstance(target, PeerModel):
                        upstream = Upstream(target.peer.proxy)
                        timeout = target.peer.connect_timeout
                        headers = _with_peer_key(headers, target.peer)
                    elif config.models[target.id].compat.ignore_websockets:
                        upstream, timeout = self._ready_upstream(target.id), CONNECT_TIMEOUT
                    else:
                        lease = await self._router.acquire(target.id)
                        upstream, timeout = lease.upstream, CONNECT_TIMEOUT
                    resource = upstream.target(outbound.path, outbound.query).decode("latin-1")

                    async def session(upstream_socket: WebSocketConnection) -> None:
                        watching.cancel()  # from here on the relay reads the client
                        await send(
                            {
                                "type": "websocket.accept",
                                "subprotocol": upstream_socket.subprotocol,
                                "headers": [],
                            }
                        )
                        log.info("websocket %s relayed to %s", scope["path"], upstream.url)
                        await _relay(upstream_socket, receive, send, self._going_away)

                    await _with_upstream(
                        upstream, resource, scope, headers, timeout, target, session
                    )
                except _Rejected as rejected:
                    await _deny_with(scope, send, rejected.status, rejected.headers, rejected.body)
                except SwapError as error:  # before the client was accepted
                    await _deny(scope, send, error)
                finally:
                    waiting.cancel_scope.cancel(reason="websocket over")
        finally:
            if lease is not None:
                self._router.release(lease)

    def _ready_upstream(self, model_id: str) -> Upstream:
        """Where a ready model listens, without a lease (``compat.ignoreWebsockets``).

        Raises:
            ModelNotReady: the model is not ready (stopped, loading, asleep, stopping).
        """
        process = self._router.processes.get(model_id)
        if process is None or not self._router.is_ready(model_id):
            raise ModelNotReady(model_id)
        return process.upstream


def _resolve(
    config: Config, scope: WebsocketScope, choose: Callable[[str], Choice] | None
) -> Outbound | Redirect:
    """The model and the upstream path, as :func:`resolve` finds them for HTTP."""
    path = scope["path"]
    raw_path = scope.get("raw_path") or path.encode()
    query = scope["query_string"]
    if path.startswith(PASSTHROUGH_PREFIX):
        return resolve(
            config, _PATH_ROUTE, method="GET", raw_path=raw_path, query=query,
            headers=scope["headers"], body=b"",
        )  # fmt: skip
    if path in VERSIONLESS_PATHS:
        raw_path = path[2:].encode()  # /v/chat/completions goes up as /chat/completions
    return resolve(
        config, _QUERY_ROUTE, method="GET", raw_path=raw_path, query=query,
        headers=scope["headers"], body=b"",
        choose=choose,
    )  # fmt: skip


async def _with_upstream(
    upstream: Upstream,
    resource: str,
    scope: WebsocketScope,
    headers: list[tuple[bytes, bytes]],
    timeout: float,
    target: LocalModel | PeerModel,
    session: Callable[[WebSocketConnection], Awaitable[None]],
) -> None:
    """Open a websocket to ``upstream`` and run ``session`` on it; closed after, however it
    ends.

    trio-swap opens and closes the TCP stream itself: trio-websocket's client leaves
    its stream open after an upstream's close or refusal (``open_websocket`` never
    closes it then), and a proxy must not leak a socket per connection.

    Raises:
        _Rejected: the upstream answered the handshake with an HTTP response.
        SwapError: 502, the upstream could not be reached or did not finish the
            handshake within ``timeout`` (``session`` never ran).
    """
    try:
        with trio.fail_after(timeout):
            stream = await _open_stream(upstream)
    except (OSError, trio.TooSlowError) as error:
        raise _unreachable(target, resource, error) from None
    refusal: ConnectionRejected | None = None
    handshake_done = False
    try:
        try:
            async with trio.open_nursery() as reader:  # trio-websocket's reader task
                with trio.move_on_after(timeout):
                    socket = await wrap_client_stream(
                        reader,
                        stream,
                        upstream.authority.decode("latin-1"),
                        resource,
                        subprotocols=list(scope.get("subprotocols") or []) or None,
                        extra_headers=headers,
                        max_message_size=MAX_MESSAGE_BYTES,
                        receive_buffer_size=_RECEIVE_BUFFER,
                    )
                    handshake_done = True
                if handshake_done:
                    try:
                        await session(socket)
                    finally:
                        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
                            await socket.aclose()  # no-op when already closed
                reader.cancel_scope.cancel(reason="websocket closed")
        except* ConnectionRejected as group:
            refusal = cast(ConnectionRejected, group.exceptions[0])
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):  # TLS may write a close_notify
            await stream.aclose()
    if refusal is not None:
        raise _Rejected(refusal.status_code, refusal.headers, refusal.body or b"")
    if not handshake_done:
        raise _unreachable(target, resource, trio.TooSlowError("no websocket handshake in time"))


async def _open_stream(upstream: Upstream) -> trio.SocketStream | trio.SSLStream[trio.SocketStream]:
    if upstream.tls:
        context = ssl.create_default_context()
        return await trio.open_ssl_over_tcp_stream(
            upstream.host, upstream.port, ssl_context=context, https_compatible=True
        )
    return await trio.open_tcp_stream(upstream.host, upstream.port)


def _unreachable(target: LocalModel | PeerModel, resource: str, error: Exception) -> SwapError:
    detail = f"websocket connection failed: {error or type(error).__name__}"
    if isinstance(target, PeerModel):
        return PeerFailed(target.peer.id, f"{resource}: {detail}")
    return UpstreamFailed(target.id, detail)


async def _cancel_on_disconnect(
    receive: ASGIReceiveCallable, watching: trio.CancelScope, waiting: trio.CancelScope
) -> None:
    """Cancel ``waiting`` when the client leaves before it is accepted (then nothing
    but ``websocket.disconnect`` can arrive); ``watching`` ends the watch."""
    with watching:
        while (await receive())["type"] != "websocket.disconnect":
            pass
        waiting.cancel(reason="client left before the websocket was accepted")


async def _relay(
    upstream: WebSocketConnection,
    receive: ASGIReceiveCallable,
    send: ASGISendCallable,
    going_away: trio.Event,
) -> None:
    """Messages both ways until one side closes (the other side is told), or
    trio-swap shuts down (both are told 1001)."""
    client_left = False
    shutting_down = False
    async with trio.open_nursery() as relaying:

        async def from_client() -> None:
            nonlocal client_left
            await _client_to_upstream(upstream, receive)
            client_left = True
            relaying.cancel_scope.cancel(reason="client closed")

        async def until_shutdown() -> None:
            nonlocal shutting_down
            await going_away.wait()
            shutting_down = True
            relaying.cancel_scope.cancel(reason="trio-swap is shutting down")

        relaying.start_soon(from_client)
        relaying.start_soon(until_shutdown)
        await _upstream_to_client(upstream, send)
        relaying.cancel_scope.cancel(reason="upstream closed")
    if shutting_down and not client_left:
        with trio.move_on_after(CLOSE_TIMEOUT):
            await send({"type": "websocket.close", "code": GOING_AWAY, "reason": _SHUTDOWN})
            await upstream.aclose(GOING_AWAY, _SHUTDOWN)
        return
    if client_left:
        # hypercorn reports every client close as 1006: the client's code is unknown.
        with trio.move_on_after(CLOSE_TIMEOUT):
            await upstream.aclose(1000)


async def _client_to_upstream(upstream: WebSocketConnection, receive: ASGIReceiveCallable) -> None:
    """Relay the client's messages until it disconnects."""
    while True:
        message = await receive()
        if message["type"] == "websocket.disconnect":
            return
        if message["type"] != "websocket.receive":
            continue
        data = message.get("bytes")
        # ConnectionClosed: the upstream is closing, and the other direction tells the client.
        with contextlib.suppress(ConnectionClosed):
            await upstream.send_message(data if data is not None else message.get("text") or "")


async def _upstream_to_client(upstream: WebSocketConnection, send: ASGISendCallable) -> None:
    """Relay the upstream's messages until it closes, then close the client the same way."""
    while True:
        try:
            message = await upstream.get_message()
        except ConnectionClosed as closed:
            code, reason = _client_close(closed)
            await send({"type": "websocket.close", "code": code, "reason": reason})
            return
        if isinstance(message, bytes):
            await send({"type": "websocket.send", "bytes": message, "text": None})
        else:
            await send({"type": "websocket.send", "bytes": None, "text": message})


def _client_close(closed: ConnectionClosed) -> tuple[int, str | None]:
    """The close the client gets for the upstream's: the same, but for local-only codes."""
    reason = closed.reason
    if reason is None or reason.code == 1005:
        return 1000, None
    if reason.code in _LOCAL_ONLY:
        return _UPSTREAM_LOST, "the upstream connection was lost"
    return reason.code, reason.reason


def _upstream_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """The client's end-to-end headers; the websocket handshake's own are the library's."""
    return [
        (name, value)
        for name, value in forward_header_bytes(headers)
        if not name.startswith(b"sec-websocket-")
    ]


def _with_peer_key(
    headers: list[tuple[bytes, bytes]], peer: PeerConfig
) -> list[tuple[bytes, bytes]]:
    """A peer's ``apiKey`` instead of the client's key, as for HTTP (http/peers.py)."""
    if not peer.api_key:
        return headers
    key = peer.api_key.encode()
    kept = [(n, v) for n, v in headers if n not in (b"authorization", b"x-api-key")]
    return [*kept, (b"authorization", b"Bearer " + key), (b"x-api-key", key)]


async def _deny(scope: WebsocketScope, send: ASGISendCallable, error: SwapError) -> None:
    """Refuse the handshake with ``error`` (its status and JSON body)."""
    if error.status >= 500:
        log.warning("websocket %s -> %d: %s", scope["path"], error.status, error.message)
    body = msgspec.json.encode(error.body(error_style(scope["path"])))
    headers = [
        (b"content-type", b"application/json"),
        *((k.lower().encode(), v.encode()) for k, v in error.headers().items()),
    ]
    await _deny_with(scope, send, error.status, headers, body)


async def _deny_redirect(scope: WebsocketScope, send: ASGISendCallable, redirect: Redirect) -> None:
    await _deny_with(scope, send, redirect.status, [(b"location", redirect.location)], b"")


async def _deny_with(
    scope: WebsocketScope,
    send: ASGISendCallable,
    status: int,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
) -> None:
    """An HTTP answer to the handshake; where the server cannot send one, a close before
    acceptance with 1013 (try again later) for 429 and 503, else 1008 (policy)."""
    if "websocket.http.response" not in (scope.get("extensions") or {}):
        code = _RETRY_LATER if status in (429, 503) else _POLICY
        await send({"type": "websocket.close", "code": code, "reason": None})
        return
    headers = [*headers, (b"content-length", b"%d" % len(body))]
    await send({"type": "websocket.http.response.start", "status": status, "headers": headers})
    await send({"type": "websocket.http.response.body", "body": body, "more_body": False})
