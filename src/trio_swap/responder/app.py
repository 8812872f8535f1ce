"""The responder's ASGI 3 app: routing, the request log, streaming and disconnects.

Raw ASGI on purpose: benchmarks compare trio-swap against calling this app
directly, so every microsecond spent here is noise in their ratios. A request
costs one `receive()` for the body, one `match` and two `send()`s.

Routes (anything else is a 404, a known path with the wrong method a 405):

    GET  /health                200 {"status":"ok"} | 503 {"status":"loading"}
    GET  /v1/models             the one model, from --model
    POST /v1/chat/completions   chat.completion, or SSE chunks with "stream": true
    POST /v1/completions        text_completion, or SSE chunks
    POST /v1/embeddings         8 floats per input, hashed from its text
    GET  /debug/requests        the last 100 requests as received (not /debug/*)
    GET  /debug/pid             {"pid": ...}

POST endpoints take `?delay=S` to hold the response for S seconds. While the
model is "loading" (--load-delay, --never-healthy) the POST endpoints answer 503
like llama-server does, so a proxy that forwards too early is caught.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Final, Literal, final
from urllib.parse import parse_qs

import msgspec
import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGISendCallable,
    HTTPScope,
    Scope,
)

from trio_swap.responder.options import ResponderOptions
from trio_swap.responder.payloads import (
    BadRequest,
    Kind,
    StreamTemplate,
    completion_body,
    embeddings_body,
    error_body,
    parse_json_object,
    prompt_words,
    requested_tokens,
)

__all__ = ["RequestRecord", "ResponderApp", "log"]

_encode: Final = msgspec.json.Encoder().encode

# Bulk mode (--token-delay 0) puts this many SSE events in one ASGI body message.
# Each message is a trip through hypercorn, h11's chunked framing and one send()
# syscall, while an event costs a few hundred nanoseconds to build; batching
# keeps the responder above 100k events/s, so a relay benchmark measures the
# relay. Paced streams still send every event as its own message.
_BULK_BATCH: Final = 64
_HISTORY: Final = 100  # /debug/requests keeps this many requests
_KNOWN_PATHS: Final = frozenset(
    {
        "/health",
        "/v1/models",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/debug/requests",
        "/debug/pid",
    }
)
_JSON: Final = b"application/json"
_SSE_HEADERS: Final = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
]

Status = Literal["in_flight", "completed", "cancelled"]


def log(line: str) -> None:
    """One line to stdout, flushed: stdout is a pipe that trio-swap's log pump reads.

    Best effort: if the reader is gone (a broken pipe), keep serving.
    """
    with contextlib.suppress(OSError):
        print(line, flush=True)


@final
class RequestRecord:
    """One request as the responder received it, for /debug/requests.

    Tests compare these fields with what the client sent, so they are kept
    verbatim, as bytes; `as_json()` decodes them only when someone asks (the
    body as UTF-8 with errors replaced, header names lowercased, repeated
    headers joined with ", ").
    """

    __slots__ = (
        "body",
        "method",
        "path",
        "raw_headers",
        "raw_query",
        "response_status",
        "status",
        "tokens_sent",
    )

    def __init__(self, scope: HTTPScope) -> None:
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.raw_query: bytes = scope["query_string"]
        self.raw_headers: list[tuple[bytes, bytes]] = list(scope["headers"])
        self.body: bytes = b""
        # Invariant: "in_flight" until the response ends ("completed") or the client
        # goes away first ("cancelled"); it never changes after that.
        self.status: Status = "in_flight"
        self.tokens_sent: int = 0
        self.response_status: int | None = None

    def as_json(self) -> dict[str, object]:
        """The /debug/requests entry."""
        headers: dict[str, str] = {}
        for raw_name, raw_value in self.raw_headers:
            name = raw_name.decode("latin-1").lower()
            value = raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        return {
            "method": self.method,
            "path": self.path,
            "query": self.raw_query.decode("latin-1"),
            "headers": headers,
            "body": self.body.decode("utf-8", "replace"),
            "status": self.status,
            "tokens_sent": self.tokens_sent,
            "response_status": self.response_status,
        }


@final
class _Exchange:
    """One request/response pair: what a route handler needs, nothing else."""

    __slots__ = ("body", "ended", "receive", "record", "send")

    def __init__(
        self, receive: ASGIReceiveCallable, send: ASGISendCallable, record: RequestRecord
    ) -> None:
        self.receive = receive
        self.send = send
        self.record = record
        self.body: bytes = b""
        # Set just before the last body message: hypercorn reports the stream's
        # end as "http.disconnect" while that send is still running, which is
        # not the client going away.
        self.ended = False

    async def respond(self, status: int, body: bytes) -> None:
        """Send a whole JSON response."""
        self.record.response_status = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", _JSON), (b"content-length", b"%d" % len(body))],
            }
        )
        self.ended = True
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    async def start_stream(self) -> None:
        """Send the headers of a server-sent-events response."""
        self.record.response_status = 200
        await self.send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})

    async def stream(self, data: bytes, *, more: bool = True) -> None:
        """Send one body message of a streaming response; it leaves at once."""
        self.ended = not more
        await self.send({"type": "http.response.body", "body": data, "more_body": more})


@final
class ResponderApp:
    """The ASGI app. One instance serves the whole process.

    Built in the trio run that serves it (it reads `trio.current_time()`); all
    its state is touched only from that run's tasks, one at a time.
    """

    def __init__(self, options: ResponderOptions) -> None:
        self._options = options
        # Invariant: before this trio time /health answers 503 "loading".
        self._ready_at = trio.current_time() + options.load_delay
        self._requests: collections.deque[RequestRecord] = collections.deque(maxlen=_HISTORY)
        self._ids = itertools.count(1)
        self._models_body = _encode(
            {
                "object": "list",
                "data": [{"id": options.model, "object": "model", "owned_by": "responder"}],
            }
        )

    def __repr__(self) -> str:
        return f"<ResponderApp {self._options.model}: {len(self._requests)} requests recorded>"

    @property
    def requests(self) -> list[RequestRecord]:
        """The recorded requests, oldest first."""
        return list(self._requests)

    def loaded(self) -> bool:
        """Whether the simulated model has finished loading."""
        return not self._options.never_healthy and trio.current_time() >= self._ready_at

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            await self._handle_http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _handle_lifespan(receive, send)
        # Websockets: returning without accepting makes hypercorn refuse them.

    async def _handle_http(
        self, scope: HTTPScope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        method, path = scope["method"], scope["path"]
        log(f"request {method} {path}")
        record = RequestRecord(scope)
        if not path.startswith("/debug/"):  # reading the log must not change it
            self._requests.append(record)
        exchange = _Exchange(receive, send, record)
        try:
            body = await _read_body(receive)
            if body is None:
                self._cancelled(record)
                return
            exchange.body = record.body = body
            try:
                await self._route(exchange, method, path, scope["query_string"])
            except BadRequest as exc:
                await exchange.respond(400, error_body(exc.message, code=exc.code))
        except BaseException:
            # trio.Cancelled here means hypercorn tore the connection down
            # (shutdown); either way the client did not get a whole response.
            if record.status == "in_flight":
                record.status = "cancelled"
            raise
        if record.status == "in_flight":
            record.status = "completed"

    async def _route(self, exchange: _Exchange, method: str, path: str, query: bytes) -> None:
        match method, path:
            case "GET", "/health":
                if self.loaded():
                    await exchange.respond(200, b'{"status":"ok"}')
                else:
                    await exchange.respond(503, b'{"status":"loading"}')
            case "GET", "/v1/models":
                await exchange.respond(200, self._models_body)
            case "POST", "/v1/chat/completions":
                await self._completion(exchange, "chat", _query_delay(query))
            case "POST", "/v1/completions":
                await self._completion(exchange, "text", _query_delay(query))
            case "POST", "/v1/embeddings":
                await self._embeddings(exchange, _query_delay(query))
            case "GET", "/debug/requests":
                await exchange.respond(200, _encode([r.as_json() for r in self._requests]))
            case "GET", "/debug/pid":
                await exchange.respond(200, b'{"pid":%d}' % os.getpid())
            case _, known if known in _KNOWN_PATHS:
                message = f"method {method} not allowed on {path}"
                await exchange.respond(405, error_body(message, code="method_not_allowed"))
            case _:
                message = f"no route for {method} {path}"
                await exchange.respond(404, error_body(message, code="not_found"))

    async def _completion(self, exchange: _Exchange, kind: Kind, delay: float) -> None:
        """POST /v1/chat/completions and /v1/completions."""
        if not self.loaded():
            await _respond_loading(exchange)
            return
        request = parse_json_object(exchange.body)
        predicted_n = requested_tokens(request, self._options.tokens)
        model = request.get("model")
        model = model if isinstance(model, str) else self._options.model
        prompt_n = prompt_words(request.get("messages" if kind == "chat" else "prompt"))
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        completion_id = f"{prefix}-{os.getpid()}-{next(self._ids)}"
        created = int(time.time())
        token_delay = self._options.token_delay

        async def stream() -> None:
            await _pause(delay)
            template = StreamTemplate(
                kind=kind, completion_id=completion_id, created=created, model=model
            )
            await self._stream_tokens(exchange, template, prompt_n, predicted_n)

        async def whole() -> None:
            await _pause(delay)
            started = trio.current_time()
            # A non-streamed answer takes as long to "generate" as a streamed one.
            await _pause(token_delay * predicted_n)
            body = completion_body(
                kind=kind,
                completion_id=completion_id,
                created=created,
                model=model,
                prompt_n=prompt_n,
                predicted_n=predicted_n,
                elapsed_s=trio.current_time() - started,
            )
            await exchange.respond(200, body)
            exchange.record.tokens_sent = predicted_n

        if request.get("stream") is True:
            await self._until_disconnect(exchange, stream)
        elif delay > 0 or (token_delay > 0 and predicted_n > 0):
            await self._until_disconnect(exchange, whole)
        else:
            # Nothing to wait for: skip the watcher nursery, this is the
            # small-request benchmark path.
            await whole()

    async def _embeddings(self, exchange: _Exchange, delay: float) -> None:
        """POST /v1/embeddings."""
        if not self.loaded():
            await _respond_loading(exchange)
            return
        body = embeddings_body(parse_json_object(exchange.body), default_model=self._options.model)

        async def answer() -> None:
            await _pause(delay)
            await exchange.respond(200, body)

        if delay > 0:
            await self._until_disconnect(exchange, answer)
        else:
            await answer()

    async def _stream_tokens(
        self, exchange: _Exchange, template: StreamTemplate, prompt_n: int, predicted_n: int
    ) -> None:
        """Send a completion as SSE: role event, token events, final event and [DONE]."""
        record = exchange.record
        token_delay = self._options.token_delay
        crash_after = self._options.crash_after_tokens
        await exchange.start_stream()
        started = trio.current_time()
        if template.head:
            await exchange.stream(template.head)
        self._maybe_crash(0)
        if token_delay > 0:
            for index in range(predicted_n):
                await trio.sleep(token_delay)
                await exchange.stream(template.tokens(index, index + 1))
                record.tokens_sent = index + 1
                self._maybe_crash(index + 1)
        else:
            # Bulk mode: batch events, see _BULK_BATCH. A batch never runs past
            # --crash-after-tokens, so the crash cuts the stream at exactly N.
            sent = 0
            while sent < predicted_n:
                stop = min(sent + _BULK_BATCH, predicted_n)
                if crash_after is not None and sent < crash_after:
                    stop = min(stop, crash_after)
                await exchange.stream(template.tokens(sent, stop))
                record.tokens_sent = sent = stop
                self._maybe_crash(sent)
        tail = template.tail(
            prompt_n=prompt_n,
            predicted_n=predicted_n,
            elapsed_s=trio.current_time() - started,
        )
        await exchange.stream(tail, more=False)

    def _maybe_crash(self, tokens_sent: int) -> None:
        """--crash-after-tokens: die like a segfaulting server, mid-stream, no cleanup."""
        crash_after = self._options.crash_after_tokens
        if crash_after is not None and tokens_sent >= crash_after:
            print("fatal: simulated crash", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(3)

    async def _until_disconnect(
        self, exchange: _Exchange, respond: Callable[[], Awaitable[None]]
    ) -> None:
        """Run `respond` unless the client disconnects first, as starlette's StreamingResponse.

        The responder and a `receive()` watcher share one nursery, and the first to
        finish cancels the other. A disconnect marks the record "cancelled" and logs
        `request cancelled <path> after N tokens`: tests read that line to see a
        client's disconnect reach the upstream.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch_disconnect, exchange, nursery.cancel_scope)
            await respond()
            nursery.cancel_scope.cancel(reason="response complete")

    async def _watch_disconnect(self, exchange: _Exchange, scope: trio.CancelScope) -> None:
        while True:
            message = await exchange.receive()
            if message["type"] == "http.disconnect" and not exchange.ended:
                self._cancelled(exchange.record)
                scope.cancel(reason="client disconnected")
                return

    @staticmethod
    def _cancelled(record: RequestRecord) -> None:
        record.status = "cancelled"
        log(f"request cancelled {record.path} after {record.tokens_sent} tokens")


async def _read_body(receive: ASGIReceiveCallable) -> bytes | None:
    """The whole request body, or None if the client disconnected first."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] == "http.request":
            chunks.append(message["body"])
            if not message.get("more_body", False):
                return b"".join(chunks)
        elif message["type"] == "http.disconnect":
            return None


async def _pause(seconds: float) -> None:
    """`trio.sleep`, minus the scheduler round trip of a zero sleep on the fast path.

    Skipping the checkpoint is safe: every caller sends next, and hypercorn's
    send checkpoints.
    """
    if seconds > 0:
        await trio.sleep(seconds)


def _query_delay(query: bytes) -> float:
    """The `?delay=S` of a POST request, 0.0 without one.

    Raises:
        BadRequest: if it is not a number of seconds >= 0.
    """
    if not query:
        return 0.0
    values = parse_qs(query.decode("latin-1")).get("delay")
    if not values:
        return 0.0
    try:
        delay = float(values[-1])
    except ValueError:
        delay = -1.0
    if not delay >= 0.0:  # also rejects NaN
        raise BadRequest(f"delay must be a number of seconds >= 0, got {values[-1]!r}")
    return delay


async def _respond_loading(exchange: _Exchange) -> None:
    """llama-server's answer while it loads weights."""
    body = error_body("Loading model", type_="unavailable_error", code=503)
    await exchange.respond(503, body)


async def _handle_lifespan(receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
    """Acknowledge startup and shutdown; the responder has nothing to set up."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
