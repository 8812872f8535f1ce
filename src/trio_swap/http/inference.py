"""The model-routed endpoints as a lean ASGI handler in front of the Quart app.

Measured (docs/benchmarks.md): Quart's per-request machinery (request and
app contexts, werkzeug header objects, signals, a task pair per request) cost
more CPU than everything else a proxied request does, and these routes need
none of it: read the body, find the model, wait for the router's grant, relay
bytes. So every model-routed route (:mod:`trio_swap.http.routes`: the JSON,
multipart, query-string and ``/upstream/`` families) is served here, directly
on the ASGI interface, and every other route goes on to the Quart app.

One request goes: read the body (bounded) → :func:`~trio_swap.http.resolve.resolve`
finds the model, the local model or peer it names, and the rewritten request
(pure, no I/O) → for a local model, wait for the router's lease and relay the
upstream's answer; for a peer, forward it there. Errors come back in the
style of the endpoint's SDK (OpenAI, or Anthropic on ``/v1/messages``).

Both kinds of exchange run under :func:`~trio_swap.http.relay.while_connected`
(a disconnect watcher beside the exchange; whichever finishes first cancels
the other) and send bodies through :func:`~trio_swap.http.relay.relay_body`.
The router lease and the upstream response are released in a ``finally``
that runs however the exchange ends.

A streaming chat request for a cold model with ``sendLoadingState`` waits
through :class:`~trio_swap.http.loading.LoadingProgress` instead, which
streams progress before the upstream's answer once the router says the
request waits; every other request pays one cheap test for it and nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import nullcontext
from typing import Final, final

import msgspec
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from trio_swap.config.model import Config, UpstreamTimeouts
from trio_swap.errors import (
    BodyTooLarge,
    ErrorStyle,
    MethodNotAllowed,
    SwapError,
    UpstreamFailed,
    error_style,
)
from trio_swap.http.grants import target_refusal
from trio_swap.http.loading import CHAT_COMPLETIONS, LoadingProgress
from trio_swap.http.passthrough import ignored_path_refusal
from trio_swap.http.peers import PeerForwarder
from trio_swap.http.quart_shim import shield_last_send
from trio_swap.http.relay import (
    forward_header_bytes,
    relay_body,
    response_header_bytes,
    upstream_cut_off,
    while_connected,
)
from trio_swap.http.resolve import LocalModel, Outbound, PeerModel, Redirect, resolve
from trio_swap.http.routes import Route, WrongMethod, classify
from trio_swap.http.selection import Selection
from trio_swap.http.upstream_client import UpstreamClient, UpstreamResponse
from trio_swap.http.websocket import WebsocketProxy
from trio_swap.observe.record import Observer, RequestRecord
from trio_swap.router import Lease, Router

__all__ = ["InferenceRoutes"]

log = logging.getLogger("trio_swap.http")

AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

_JSON_HEADERS: Final = [(b"content-type", b"application/json")]


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


@final
class InferenceRoutes:
    """ASGI app: model-routed requests here, everything else to ``fallback`` (the Quart app)."""

    def __init__(
        self,
        fallback: AsgiApp,
        *,
        config: Config,
        router: Router,
        client: UpstreamClient,
        peers: PeerForwarder | None = None,
        max_body_bytes: int,
        observer: Observer | None = None,
        selection: Selection | None = None,
    ) -> None:
        self._fallback = fallback
        #: Profiles and selectors (none: names are looked up as the client sent them).
        self._selection = selection
        #: Metrics and the activity log (none of either when not given).
        self._observer = observer if observer is not None else Observer()
        self._peers = peers
        self._config = config
        self._router = router
        self._client = client
        self._max_body_bytes = max_body_bytes
        #: Websockets on the model routes and /upstream/ (the access middleware lets no other in).
        self._websockets = WebsocketProxy(router)
        #: Models whose streaming chat clients get loading progress (``sendLoadingState``).
        self._loading_state = frozenset(
            mid for mid, m in config.models.items() if m.send_loading_state
        )

    def close_websockets(self) -> None:
        """Shutdown began: close every relayed websocket with 1001 (going away)."""
        self._websockets.close_all()

    @property
    def peers(self) -> PeerForwarder | None:
        """The peer forwarder, if any config so far had peers (close it at shutdown)."""
        return self._peers

    def swap_config(self, config: Config) -> None:
        """A reload: the next request resolves names, filters and peers with ``config``.

        Requests under way keep what they already read. The router must know
        the new models first (:meth:`Router.reconfigure`).
        """
        if config.peers and self._peers is None:
            self._peers = PeerForwarder()
        self._loading_state = frozenset(
            mid for mid, m in config.models.items() if m.send_loading_state
        )
        self._config = config
        if self._selection is not None:
            self._selection.switch(config)  # no profile is active after a reload

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "websocket":
            await self._websockets(
                scope, receive, send, config=self._config, selection=self._selection
            )
            return
        if scope["type"] != "http":
            await self._fallback(scope, receive, send)
            return
        try:
            route = classify(scope["method"], scope["path"])
        except WrongMethod as wrong:
            error = MethodNotAllowed(scope["method"], scope["path"], wrong.allowed)
            await _send_error(send, error, scope)
            return
        if route is None:
            await self._fallback(scope, receive, shield_last_send(send))
        else:
            # Shielded for the same reason as Quart's (quart_shim): the disconnect
            # watcher cancels the exchange while hypercorn recycles the connection
            # inside the last send, which left a keep-alive connection no idle
            # timeout or shutdown would ever close.
            record = self._observer.begin(scope, shield_last_send(send))
            try:
                await self._serve(route, scope, receive, record.send, record)
            finally:
                self._observer.finish(record)

    async def _serve(
        self,
        route: Route,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        record: RequestRecord,
    ) -> None:
        # A spillover reservation ends with the request, however it ends: also when
        # resolve refuses the body after the choice (a rewrite's 400).
        with self._selection.held() if self._selection is not None else nullcontext() as choose:
            try:
                body = await self._read_body(scope, receive)
                record.request_body(body, scope["headers"])  # for its capture, if any
                resolved = resolve(
                    self._config,
                    route,
                    method=scope["method"],
                    raw_path=scope["raw_path"] or scope["path"].encode(),
                    query=scope["query_string"],
                    headers=scope["headers"],
                    body=body,
                    choose=choose,
                )
            except _ClientGone:
                return
            except SwapError as error:
                await _send_error(send, error, scope)
                return
            choice = resolved.choice if isinstance(resolved, Outbound) else None
            if choice is not None:
                record.selector = choice.selector  # the activity log says which selector chose
            await self._dispatch(resolved, scope, receive, send, record)

    async def _dispatch(
        self,
        resolved: Outbound | Redirect,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        record: RequestRecord,
    ) -> None:
        """Send a resolved request where it goes (a scoped key may refuse it first)."""
        if isinstance(resolved, Outbound):  # a scoped API key: only models in its scope
            chooser = resolved.choice.selector if resolved.choice is not None else None
            refused = target_refusal(scope, resolved.target, resolved.requested, chooser)
            if refused is not None:
                target = resolved.target  # the activity log shows what was refused
                if isinstance(target, PeerModel):
                    record.routed(target.name, target.peer)
                else:
                    record.routed(target.id, None)
                await _send_error(send, refused, scope)
                return
        match resolved:
            case Redirect():
                await _send_redirect(send, resolved)
            case Outbound(target=LocalModel(id=model_id)):
                record.routed(model_id, None)
                ignored = ignored_path_refusal(  # upstream.ignorePaths: 409, no load
                    scope["path"],
                    resolved.path,
                    model_id,
                    self._config.ignore_paths,
                    self._router.is_ready,
                )
                if ignored is not None:
                    await _send_error(send, ignored, scope)
                    return
                await while_connected(
                    receive, self._exchange, resolved, model_id, scope, send, record
                )
            case Outbound(target=PeerModel() as target):
                record.routed(target.name, target.peer)
                await while_connected(receive, self._forward_to_peer, resolved, target, scope, send)

    async def _forward_to_peer(
        self, outbound: Outbound, target: PeerModel, scope: HTTPScope, send: ASGISendCallable
    ) -> None:
        """No lease and no swap: the peer machine schedules its own models."""
        if self._peers is None:
            raise RuntimeError("a config with peers needs a PeerForwarder")
        body = outbound.body
        await self._peers.forward(
            target.peer,
            method=scope["method"],
            raw_path=outbound.path,
            query=outbound.query,
            headers=forward_header_bytes(scope["headers"]),
            body=body if isinstance(body, bytes) else b"".join(body),
            send=send,
            style=error_style(scope["path"]),
        )

    async def _exchange(
        self,
        outbound: Outbound,
        model_id: str,
        scope: HTTPScope,
        send: ASGISendCallable,
        record: RequestRecord,
    ) -> None:
        """Wait for the model, send the request, relay the answer; release everything after.

        Runs under :func:`while_connected`: a disconnect cancels it anywhere,
        so the ``finally`` is shielded (and bounded).
        """
        lease: Lease | None = None
        answer: UpstreamResponse | None = None
        progress: LoadingProgress | None = None
        if (
            outbound.stream
            and model_id in self._loading_state
            and scope["path"] == CHAT_COMPLETIONS
            and not self._router.is_ready(model_id)
        ):
            progress = LoadingProgress(self._router, model_id, outbound.requested, send)
        try:
            try:
                if progress is None:
                    lease = await self._router.acquire(model_id)
                else:
                    lease = await progress.acquire()
                record.lease_granted()
                upstream = lease.upstream
                answer = await self._client.send(
                    upstream,
                    method=scope["method"].encode(),
                    target=upstream.target(outbound.path, outbound.query),
                    headers=forward_header_bytes(scope["headers"]),
                    body=outbound.body,
                    model=model_id,
                    timeouts=self._timeouts(model_id),
                )
                record.upstream_answered()
            except SwapError as error:
                if progress is not None and progress.streaming:
                    await progress.fail(error)
                else:
                    await _send_error(send, error, scope)
                return
            if progress is not None and progress.streaming:
                await progress.relay(answer)
            else:
                await _relay(answer, send, error_style(scope["path"]))
        finally:
            try:
                if answer is not None:
                    with trio.CancelScope(shield=True), trio.move_on_after(5):
                        await answer.aclose()
            finally:  # the slot is released however the close went
                if lease is None and progress is not None:
                    lease = progress.lease  # granted, but the handler was cancelled first
                if lease is not None:
                    self._router.release(lease)

    def _timeouts(self, model_id: str) -> UpstreamTimeouts | None:
        """The model's ``timeouts:`` (None once a reload removed it: client defaults)."""
        model = self._config.models.get(model_id)
        return model.timeouts if model is not None else None

    async def _read_body(self, scope: HTTPScope, receive: ASGIReceiveCallable) -> bytes:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self._max_body_bytes:
                raise self._too_large()
        pieces: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                raise _ClientGone
            request = message
            chunk = request.get("body", b"")
            size += len(chunk)
            if size > self._max_body_bytes:
                raise self._too_large()
            pieces.append(chunk)
            if not request.get("more_body", False):
                return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body larger than the {self._max_body_bytes} byte limit")


async def _relay(answer: UpstreamResponse, send: ASGISendCallable, style: ErrorStyle) -> None:
    """Send the upstream's status, headers and body bytes as they arrive."""
    await send(
        {
            "type": "http.response.start",
            "status": answer.status,
            "headers": response_header_bytes(answer),
            "trailers": False,
        }
    )
    await relay_body(
        answer.iter_raw(),
        send,
        sse=b"text/event-stream" in (answer.header(b"content-type") or b""),
        style=style,
        broken=UpstreamFailed,
        cut_off=upstream_cut_off,
    )


async def _send_redirect(send: ASGISendCallable, redirect: Redirect) -> None:
    headers = [(b"location", redirect.location), (b"content-length", b"0")]
    await send(
        {
            "type": "http.response.start",
            "status": redirect.status,
            "headers": headers,
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_error(send: ASGISendCallable, error: SwapError, scope: HTTPScope) -> None:
    if error.status >= 500:
        log.warning("%s %s -> %d: %s", scope["method"], scope["path"], error.status, error.message)
    style: ErrorStyle = error_style(scope["path"])
    headers = [
        *_JSON_HEADERS,
        *((k.lower().encode(), v.encode()) for k, v in error.headers().items()),
    ]
    if isinstance(error, BodyTooLarge):
        # The rest of the body is never read: tell the client not to reuse the connection.
        headers.append((b"connection", b"close"))
    body = msgspec.json.encode(error.body(style))
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": headers,
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
