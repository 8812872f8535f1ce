"""The model-routed endpoints as a lean ASGI handler in front of the Quart app.

Measured (docs/benchmarks.md): Quart's per-request machinery (request and
app contexts, werkzeug header objects, signals, a task pair per request) cost
more CPU than everything else a proxied request does, and these routes need
none of it: read the body, find the model, wait for the router's grant, relay
bytes. So every model-routed route (:mod:`trio_swap.http.routes`: the JSON,
multipart, query-string and ``/upstream/`` families) is served here, directly
on the ASGI interface, and every other route goes on to the Quart app.

One request goes: read the body (bounded) → find the model name where the
route keeps it → resolve it to a local model or a peer → rewrite the body
(``useModelName``, ``filters``, a peer's own model name) → for a local model,
wait for the router's lease and relay the upstream's answer; for a peer,
forward it there. Errors come back in the style of the endpoint's SDK
(OpenAI, or Anthropic on ``/v1/messages``).

The exchange follows starlette's ``StreamingResponse``: the relay and a
disconnect watcher share one nursery, and whichever finishes first cancels
the other. The router lease and the upstream response are released in a
``finally`` that runs however the exchange ends.

A streaming chat request for a cold model with ``sendLoadingState`` waits
through :class:`~trio_swap.http.loading.LoadingProgress` instead, which
streams progress before the upstream's answer; every other request pays one
cheap test for it and nothing more.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Final, final
from urllib.parse import parse_qsl, urlencode

import msgspec
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from trio_swap.config.model import Config, FilterConfig, PeerConfig
from trio_swap.errors import (
    BadRequest,
    BodyTooLarge,
    ErrorStyle,
    MethodNotAllowed,
    ModelNotFound,
    SwapError,
    UpstreamFailed,
    error_style,
)
from trio_swap.http.filters import rewrite_json
from trio_swap.http.loading import CHAT_COMPLETIONS, LoadingProgress
from trio_swap.http.multipart import boundary_of, find_field
from trio_swap.http.passthrough import split_passthrough
from trio_swap.http.peers import PeerForwarder
from trio_swap.http.quart_shim import shield_last_send
from trio_swap.http.relay import forward_header_bytes, response_header_bytes, sse_error_event
from trio_swap.http.routes import ModelSource, Route, WrongMethod, classify
from trio_swap.http.upstream_client import Upstream, UpstreamClient, UpstreamResponse
from trio_swap.observe.record import Observer, RequestRecord
from trio_swap.router import Lease, Router

__all__ = ["InferenceRoutes"]

log = logging.getLogger("trio_swap.http")

AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]
Body = bytes | Sequence[bytes | memoryview]


class _Envelope(msgspec.Struct):
    """The only part of a request body trio-swap reads; msgspec skips the rest."""

    model: str | None = None
    #: Only read to decide whether a loading-progress stream applies.
    #: Any JSON value: servers take ``1`` or ``"true"`` too, so it is only tested for truth.
    stream: object = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_JSON_HEADERS: Final = [(b"content-type", b"application/json")]
_NO_FILTERS: Final = FilterConfig()


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class _Redirect(Exception):
    """``/upstream/<model>`` without the trailing slash: send the client to the slashed path."""

    def __init__(self, location: bytes, status: int) -> None:
        super().__init__(location)
        self.location = location
        self.status = status


@final
class _Outbound:
    """A request ready to go: which model, and exactly what to send where."""

    __slots__ = ("body", "model_id", "path", "peer", "query", "requested", "stream")

    def __init__(
        self,
        model_id: str,
        *,
        requested: str,
        body: Body,
        path: bytes,
        query: bytes,
        stream: bool = False,
        peer: PeerConfig | None = None,
    ) -> None:
        #: A local model id, or the peer's own name for the model.
        self.model_id = model_id
        #: Where a peer model is served; None for a local model.
        self.peer = peer
        #: The name the client asked for (an id or an alias).
        self.requested = requested
        self.body = body
        #: The raw path for the upstream (its base path is added by :class:`Upstream`).
        self.path = path
        self.query = query
        #: The client asked for a stream (only read for loading progress).
        self.stream = stream


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
    ) -> None:
        self._fallback = fallback
        #: Metrics and the activity log (none of either when not given).
        self._observer = observer if observer is not None else Observer()
        self._peers = peers
        self._config = config
        self._router = router
        self._client = client
        self._max_body_bytes = max_body_bytes
        #: By ``proxy`` URL: a lease names the one its process listens on (after a
        #: reload, an old process may still serve at the previous URL).
        self._upstreams = {m.proxy: Upstream(m.proxy) for m in config.models.values()}
        #: Models whose streaming chat clients get loading progress (``sendLoadingState``).
        self._loading_state = frozenset(
            mid for mid, m in config.models.items() if m.send_loading_state
        )

    @property
    def peers(self) -> PeerForwarder | None:
        """The peer forwarder, if any config so far had peers (close it at shutdown)."""
        return self._peers

    def swap_config(self, config: Config) -> None:
        """A reload: the next request resolves names, filters and peers with ``config``.

        Requests under way keep what they already read. The router must know
        the new models first (:meth:`Router.reconfigure`).
        """
        for model in config.models.values():
            if model.proxy not in self._upstreams:
                self._upstreams[model.proxy] = Upstream(model.proxy)
        if config.peers and self._peers is None:
            self._peers = PeerForwarder()
        self._loading_state = frozenset(
            mid for mid, m in config.models.items() if m.send_loading_state
        )
        self._config = config

    def _upstream(self, proxy: str) -> Upstream:
        upstream = self._upstreams.get(proxy)
        if upstream is None:  # a process started before the reload that dropped its URL
            upstream = self._upstreams[proxy] = Upstream(proxy)
        return upstream

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
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
            record = self._observer.begin(scope, send)
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
        try:
            body = await self._read_body(scope, receive)
            outbound = self._prepare(route, scope, body)
        except _ClientGone:
            return
        except _Redirect as redirect:
            await _send_redirect(send, redirect)
            return
        except SwapError as error:
            await _send_error(send, error, scope)
            return
        record.routed(outbound.model_id, outbound.peer)
        if outbound.peer is None:
            await self._exchange(outbound, scope, receive, send, record)
        else:
            await self._forward_to_peer(outbound, outbound.peer, scope, receive, send)

    async def _forward_to_peer(
        self,
        outbound: _Outbound,
        peer: PeerConfig,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
    ) -> None:
        """No lease and no swap: the peer machine schedules its own models."""
        if self._peers is None:
            raise RuntimeError("a config with peers needs a PeerForwarder")
        body = outbound.body
        async with trio.open_nursery() as nursery:

            async def watch_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                nursery.cancel_scope.cancel(reason="client disconnected")

            nursery.start_soon(watch_disconnect)
            await self._peers.forward(
                peer,
                method=scope["method"],
                raw_path=outbound.path,
                query=outbound.query,
                headers=forward_header_bytes(scope["headers"]),
                body=body if isinstance(body, bytes) else b"".join(body),
                send=send,
                style=error_style(scope["path"]),
            )
            nursery.cancel_scope.cancel(reason="response complete")

    async def _exchange(
        self,
        outbound: _Outbound,
        scope: HTTPScope,
        receive: ASGIReceiveCallable,
        send: ASGISendCallable,
        record: RequestRecord,
    ) -> None:
        """Wait for the model, send the request, relay the answer; release everything after."""
        model_id = outbound.model_id
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
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel(reason="client disconnected")

                nursery.start_soon(watch_disconnect)
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
                    )
                    record.upstream_answered()
                except SwapError as error:
                    if progress is not None and progress.streaming:
                        await progress.fail(error)
                    else:
                        await _send_error(send, error, scope)
                else:
                    if progress is not None and progress.streaming:
                        await progress.relay(answer)
                    else:
                        await self._relay(answer, model_id, send, error_style(scope["path"]))
                nursery.cancel_scope.cancel(reason="response complete")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(5):
                if answer is not None:
                    await answer.aclose()
                if lease is None and progress is not None:
                    lease = progress.lease  # granted, but the handler was cancelled first
                if lease is not None:
                    self._router.release(lease)

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

    # -- finding the model and rewriting the request -------------------------------------

    def _prepare(self, route: Route, scope: HTTPScope, body: bytes) -> _Outbound:
        """Where the request goes and what it carries there.

        Raises:
            SwapError: no model named, an unknown model, or a malformed body.
            _Redirect: a passthrough path that needs its trailing slash.
        """
        path = scope["raw_path"] or scope["path"].encode()
        query = scope["query_string"]
        match route.source:
            case ModelSource.JSON:
                if route.upstream_path is not None:
                    path = route.upstream_path.encode()
                return self._prepare_json(body, path, query)
            case ModelSource.MULTIPART:
                return self._prepare_multipart(scope, body, path, query)
            case ModelSource.QUERY:
                return self._prepare_query(body, path, query)
            case ModelSource.PATH:
                return self._prepare_passthrough(scope, body, path, query)

    def _lookup(self, requested: str) -> tuple[str, PeerConfig | None, str | None, FilterConfig]:
        """Where ``requested`` goes: (model id or the peer's name for it, the peer or None,
        the name to send instead of the client's, the filters to apply).

        Local models and aliases win over peer models of the same name.
        """
        model_id = self._config.resolve(requested)
        if model_id is not None:
            model = self._config.models[model_id]
            return model_id, None, model.use_model_name or None, model.filters
        found = self._config.resolve_peer(requested)
        if found is None:
            raise ModelNotFound(requested)
        peer_id, name = found
        peer = self._config.peers[peer_id]
        return name, peer, name if name != requested else None, peer.filters

    def _is_model(self, name: str) -> bool:
        return self._config.resolve(name) is not None or self._config.resolve_peer(name) is not None

    def _prepare_json(self, body: bytes, path: bytes, query: bytes) -> _Outbound:
        try:
            envelope = _decode_envelope(body)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid request body: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not envelope.model:
            raise BadRequest("the request body has no 'model' field")
        requested = envelope.model
        model_id, peer, rename, filters = self._lookup(requested)
        body = rewrite_json(body, filters=filters, rename=rename, requested=requested)
        return _Outbound(
            model_id,
            requested=requested,
            body=body,
            path=path,
            query=query,
            stream=envelope.stream not in (None, False, 0, "", "false"),
            peer=peer,
        )

    def _prepare_multipart(
        self, scope: HTTPScope, body: bytes, path: bytes, query: bytes
    ) -> _Outbound:
        content_type = _header(scope, b"content-type") or b""
        boundary = boundary_of(content_type.decode("latin-1"))
        field = find_field(body, boundary, "model")
        if field is None or not field.value:
            raise BadRequest("the multipart form has no 'model' field")
        model_id, peer, rename, _ = self._lookup(field.value)
        outgoing: Body = body
        if rename is not None and rename != field.value:
            outgoing = field.replaced(body, rename)
        return _Outbound(
            model_id, requested=field.value, body=outgoing, path=path, query=query, peer=peer
        )

    def _prepare_query(self, body: bytes, path: bytes, query: bytes) -> _Outbound:
        params = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        requested = next((value for name, value in params if name == "model"), "")
        if not requested:
            raise BadRequest("this endpoint needs the model in the query string: ?model=<name>")
        model_id, peer, rename, _ = self._lookup(requested)
        if rename is not None and rename != requested:
            params = [(name, rename if name == "model" else value) for name, value in params]
            query = urlencode(params).encode()
        return _Outbound(
            model_id, requested=requested, body=body, path=path, query=query, peer=peer
        )

    def _prepare_passthrough(
        self, scope: HTTPScope, body: bytes, path: bytes, query: bytes
    ) -> _Outbound:
        target = split_passthrough(path, self._is_model)
        if target.rest is None:
            location = path + b"/" + (b"?" + query if query else b"")
            status = 301 if scope["method"] in ("GET", "HEAD") else 308
            raise _Redirect(location, status)
        model_id, peer, _, _ = self._lookup(target.model)
        stream = ("stream", "true") in parse_qsl(query.decode("latin-1"))
        return _Outbound(
            model_id,
            requested=target.model,
            body=body,
            path=target.rest,
            query=query,
            stream=stream,
            peer=peer,
        )

    # -- answering -------------------------------------------------------------------------

    async def _relay(
        self, answer: UpstreamResponse, model_id: str, send: ASGISendCallable, style: ErrorStyle
    ) -> None:
        """Send the upstream's status, headers and body bytes as they arrive."""
        await send(
            {
                "type": "http.response.start",
                "status": answer.status,
                "headers": response_header_bytes(answer),
                "trailers": False,
            }
        )
        is_sse = b"text/event-stream" in (answer.header(b"content-type") or b"")
        try:
            async for chunk in answer.iter_raw():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        except UpstreamFailed as exc:
            log.warning("model %s: upstream broke the response: %s", model_id, exc.message)
            if not is_sse:
                # Ending cleanly would hand the client a truncated body that looks
                # complete; raising makes hypercorn abort the connection instead.
                raise
            # An SSE client learns it from a last event (the OpenAI SDKs raise it).
            error = UpstreamFailed(model_id, f"response cut off: {exc.detail}")
            event = sse_error_event(error, style)
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


def _header(scope: HTTPScope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key == name:
            return value
    return None


async def _send_redirect(send: ASGISendCallable, redirect: _Redirect) -> None:
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
