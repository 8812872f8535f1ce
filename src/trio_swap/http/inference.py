"""The model-routed POST endpoints as a lean ASGI handler in front of the Quart app.

Measured (docs/benchmarks.md): Quart's per-request machinery (request and
app contexts, werkzeug header objects, signals, a task pair per request) cost
more CPU than everything else a proxied request does, and these routes need
none of it: read the body, peek at ``model``, wait for the router's grant,
relay bytes. So ``/v1/chat/completions``, ``/v1/completions`` and
``/v1/embeddings`` are served here, directly on the ASGI interface, and every
other route goes on to the Quart app.

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
from collections.abc import Awaitable, Callable
from typing import Final, final

import msgspec
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from trio_swap.config.model import Config
from trio_swap.errors import (
    BadRequest,
    BodyTooLarge,
    MethodNotAllowed,
    ModelNotFound,
    SwapError,
    UpstreamFailed,
)
from trio_swap.http.loading import CHAT_COMPLETIONS, LoadingProgress
from trio_swap.http.relay import forward_header_bytes, response_header_bytes
from trio_swap.http.upstream_client import Upstream, UpstreamClient, UpstreamResponse
from trio_swap.router import Lease, Router

__all__ = ["JSON_MODEL_ROUTES", "InferenceRoutes"]

log = logging.getLogger("trio_swap.http")

#: Routes whose JSON body names the model.
JSON_MODEL_ROUTES: Final = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings"})

AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


class _Envelope(msgspec.Struct):
    """The only part of a request body trio-swap reads; msgspec skips the rest."""

    model: str | None = None
    #: Only read to decide whether a loading-progress stream applies.
    stream: bool | None = None


_decode_envelope = msgspec.json.Decoder(_Envelope).decode
_JSON_HEADERS: Final = [(b"content-type", b"application/json")]


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


@final
class InferenceRoutes:
    """ASGI app: model-routed POSTs here, everything else to ``fallback`` (the Quart app)."""

    def __init__(
        self,
        fallback: AsgiApp,
        *,
        config: Config,
        router: Router,
        client: UpstreamClient,
        max_body_bytes: int,
    ) -> None:
        self._fallback = fallback
        self._config = config
        self._router = router
        self._client = client
        self._max_body_bytes = max_body_bytes
        self._upstreams = {mid: Upstream(m.proxy) for mid, m in config.models.items()}
        #: Models whose streaming chat clients get loading progress (``sendLoadingState``).
        self._loading_state = frozenset(
            mid for mid, m in config.models.items() if m.send_loading_state
        )

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http" and scope["path"] in JSON_MODEL_ROUTES:
            if scope["method"] == "POST":
                await self._serve(scope, receive, send)
            else:
                await _send_error(send, MethodNotAllowed(scope["method"], scope["path"]), scope)
        else:
            await self._fallback(scope, receive, send)

    async def _serve(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        try:
            body = await self._read_body(scope, receive)
            model_id, body, envelope = self._route(body)
        except _ClientGone:
            return
        except SwapError as error:
            await _send_error(send, error, scope)
            return
        lease: Lease | None = None
        answer: UpstreamResponse | None = None
        progress: LoadingProgress | None = None
        if (
            envelope.stream
            and model_id in self._loading_state
            and scope["path"] == CHAT_COMPLETIONS
            and not self._router.is_ready(model_id)
        ):
            progress = LoadingProgress(self._router, model_id, envelope.model or model_id, send)
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
                    upstream = self._upstreams[model_id]
                    answer = await self._client.send(
                        upstream,
                        method=b"POST",
                        target=upstream.target(
                            scope["raw_path"] or scope["path"].encode(), scope["query_string"]
                        ),
                        headers=forward_header_bytes(scope["headers"]),
                        body=body,
                        model=model_id,
                    )
                except SwapError as error:
                    if progress is not None and progress.streaming:
                        await progress.fail(error)
                    else:
                        await _send_error(send, error, scope)
                else:
                    if progress is not None and progress.streaming:
                        await progress.relay(answer)
                    else:
                        await self._relay(answer, model_id, send)
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
                return b"".join(pieces)

    def _too_large(self) -> BodyTooLarge:
        return BodyTooLarge(f"request body larger than the {self._max_body_bytes} byte limit")

    def _route(self, body: bytes) -> tuple[str, bytes, _Envelope]:
        """The model id, the body to send (``useModelName`` applied), and the decoded envelope."""
        try:
            envelope = _decode_envelope(body)
        except msgspec.ValidationError as exc:
            raise BadRequest(f"invalid request body: {exc}") from exc
        except msgspec.DecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from exc
        if not envelope.model:
            raise BadRequest("the request body has no 'model' field")
        model_id = self._config.resolve(envelope.model)
        if model_id is None:
            raise ModelNotFound(envelope.model)
        rename = self._config.models[model_id].use_model_name
        if rename:
            payload = msgspec.json.decode(body)
            payload["model"] = rename
            body = msgspec.json.encode(payload)
        return model_id, body, envelope

    async def _relay(self, answer: UpstreamResponse, model_id: str, send: ASGISendCallable) -> None:
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
            error = UpstreamFailed(model_id, f"response cut off: {exc.message}")
            event = b"data: " + msgspec.json.encode(error.body()) + b"\n\n"
            await send({"type": "http.response.body", "body": event, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _send_error(send: ASGISendCallable, error: SwapError, scope: HTTPScope) -> None:
    if error.status >= 500:
        log.warning("POST %s -> %d: %s", scope["path"], error.status, error.message)
    headers = [
        *_JSON_HEADERS,
        *((k.lower().encode(), v.encode()) for k, v in error.headers().items()),
    ]
    body = msgspec.json.encode(error.body())
    await send(
        {
            "type": "http.response.start",
            "status": error.status,
            "headers": headers,
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})
