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
    POST /v1/responses          a completed Responses API object (no streaming)
    POST /v1/messages           Anthropic message, or its SSE events with "stream": true
    POST /v1/messages/count_tokens  {"input_tokens": N}
    POST /v1/rerank, /v1/reranking, /rerank, /reranking  results, best first
    POST /completion, /infill   llama-server's native answer, or SSE with "stream": true
    POST /v1/audio/transcriptions  multipart; {"text": what arrived: file, bytes, model}
    POST /v1/audio/speech       audio/mpeg: b"ID3" + the input text
    GET|POST /v1/audio/voices   {"voices": [...]}
    POST /v1/images/generations, /v1/images/edits (multipart)  base64 PNGs
    POST /sdapi/v1/txt2img, /sdapi/v1/img2img  AUTOMATIC1111's answer
    GET  /sdapi/v1/loras        []
    GET  /props                 llama-server's props, for ?model= or --model
    GET  /slots, POST /slots/{id}?action=save|restore|erase  llama-server's slots
                                (responder/slots.py; the actions need --slot-save-path)
    ANY  /echo/...              {"method", "path", "query", "body"} as received
    GET  /debug/requests        the last 100 requests as received (not /debug/*)
    GET  /debug/pid             {"pid": ...}
    GET  /debug/websockets      {"accepted", "open", "last_close"} of /ws/echo sockets
    WS   /ws/echo               websocket echo (responder/websocket.py)
    POST /sleep, /wake_up, ...  with --sleep-api vllm|sglang: vLLM's or SGLang's sleep
                                mode (responder/sleep.py)

The OpenAI paths also answer without `/v1` (`/chat/completions`, `/messages`,
...): that is where trio-swap sends its versionless `/v/...` routes. Every
answer names the `model` the request carried (else --model), so tests can see
trio-swap's `useModelName` rewriting.

POST endpoints take `?delay=S` to hold the response for S seconds. While the
model is "loading" (--load-delay, --never-healthy) every route but /health,
/v1/models and /debug/* answers 503 like llama-server does, so a proxy that
forwards too early is caught. So do they while asleep (--sleep-api), and
after a wake with --broken-after-wake they answer 500. Generating routes
(chat, completions, responses, messages, /completion, /infill) follow
--tokens, --token-delay and, when streamed, --crash-after-tokens.
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

# Each by its own name, not `from trio_swap.responder import ...`: the package's
# __init__ imports this module, so naming the package here would close a cycle.
import trio_swap.responder.anthropic as anthropic
import trio_swap.responder.llama as llama
import trio_swap.responder.media as media
from trio_swap.responder.memory import HeldMemory
from trio_swap.responder.options import ResponderOptions
from trio_swap.responder.payloads import (
    BadRequest,
    JSONObject,
    Kind,
    StreamTemplate,
    TokenStream,
    completion_body,
    embeddings_body,
    error_body,
    model_of,
    parse_json_object,
    prompt_words,
    requested_tokens,
    rerank_body,
    responses_body,
)
from trio_swap.responder.sleep import SleepApi
from trio_swap.responder.slots import SlotFaults, SlotTable, prompt_tokens
from trio_swap.responder.websocket import WebsocketCounts, serve_websocket

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
        "/chat/completions",
        "/v1/completions",
        "/completions",
        "/v1/embeddings",
        "/embeddings",
        "/v1/responses",
        "/responses",
        "/v1/messages",
        "/messages",
        "/v1/messages/count_tokens",
        "/messages/count_tokens",
        "/v1/rerank",
        "/v1/reranking",
        "/rerank",
        "/reranking",
        "/completion",
        "/infill",
        "/props",
        "/slots",
        "/v1/audio/transcriptions",
        "/v1/audio/speech",
        "/v1/audio/voices",
        "/v1/images/generations",
        "/v1/images/edits",
        "/sdapi/v1/txt2img",
        "/sdapi/v1/img2img",
        "/sdapi/v1/loras",
        "/debug/requests",
        "/debug/pid",
        "/debug/websockets",
    }
)
_RERANK_PATHS: Final = frozenset({"/v1/rerank", "/v1/reranking", "/rerank", "/reranking"})
_JSON: Final = b"application/json"
_VOICES: Final = b'{"voices":["alloy","echo"]}'
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

    async def respond(self, status: int, body: bytes, content_type: bytes = _JSON) -> None:
        """Send a whole response, JSON unless told otherwise.

        A HEAD request gets the headers only: h11 refuses a body for it.
        """
        self.record.response_status = status
        await self.send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", b"%d" % len(body)),
                ],
            }
        )
        self.ended = True
        if self.record.method == "HEAD":
            body = b""
        await self.send({"type": "http.response.body", "body": body, "more_body": False})

    def header(self, name: bytes) -> str:
        """The request header `name` (lowercase), "" if absent; the first if repeated."""
        for raw_name, raw_value in self.record.raw_headers:
            if raw_name.lower() == name:
                return raw_value.decode("latin-1")
        return ""

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

    def __init__(self, options: ResponderOptions, memory: HeldMemory | None = None) -> None:
        self._options = options
        #: --sleep-api's routes and state; None without it.
        self._sleep = SleepApi(options, memory) if options.sleep_api else None
        # Invariant: before this trio time /health answers 503 "loading".
        self._ready_at = trio.current_time() + options.load_delay
        self._requests: collections.deque[RequestRecord] = collections.deque(maxlen=_HISTORY)
        #: The /ws/echo sockets, for /debug/websockets.
        self._websockets = WebsocketCounts()
        self._ids = itertools.count(1)
        faults = SlotFaults(
            save_delay=options.slot_save_delay,
            save_fails=options.slot_save_fails,
            restore_delay=options.slot_restore_delay,
            restore_fails=options.slot_restore_fails,
            restore_noop=options.slot_restore_noop,
        )
        #: With --slot-save-path, completions run in these and report timings.cache_n.
        self._slots = SlotTable(options.parallel, options.slot_save_path, faults)
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

    async def _refused(self, exchange: _Exchange) -> bool:
        """Answer for a route that needs the model: 503 loading or asleep, 500 broken."""
        if not self.loaded():
            await _respond_loading(exchange)
            return True
        refusal = self._sleep.refusal() if self._sleep is not None else None
        if refusal is not None:
            await exchange.respond(*refusal)
            return True
        return False

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "http":
            await self._handle_http(scope, receive, send)
        elif scope["type"] == "websocket":
            log(f"websocket {scope['path']}")
            await serve_websocket(
                scope, receive, send, counts=self._websockets, loaded=self.loaded()
            )
        elif scope["type"] == "lifespan":
            await _handle_lifespan(receive, send)

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
            case "POST", "/v1/chat/completions" | "/chat/completions":
                await self._completion(exchange, "chat", _query_delay(query))
            case "POST", "/v1/completions" | "/completions":
                await self._completion(exchange, "text", _query_delay(query))
            case "POST", "/v1/embeddings" | "/embeddings":
                await self._embeddings(exchange, _query_delay(query))
            case "GET", "/debug/requests":
                await exchange.respond(200, _encode([r.as_json() for r in self._requests]))
            case "GET", "/debug/pid":
                await exchange.respond(200, b'{"pid":%d}' % os.getpid())
            case "GET", "/debug/websockets":
                await exchange.respond(200, self._websockets.as_json())
            case _, sleep_path if self._sleep is not None and self._sleep.owns(sleep_path):
                answer = self._sleep.handle(method, path, query, exchange.body)
                await exchange.respond(*await answer)
            case _:
                await self._route_more(exchange, method, path, query)

    async def _route_more(self, exchange: _Exchange, method: str, path: str, query: bytes) -> None:
        """The routes benchmarks do not hit, after the ones they do."""
        match method, path:
            case "POST", "/v1/messages" | "/messages":
                await self._messages(exchange, _query_delay(query))
            case "POST", "/v1/messages/count_tokens" | "/messages/count_tokens":
                build = self._json_answer(exchange, anthropic.count_tokens_body)
                await self._answer(exchange, _query_delay(query), build)
            case "POST", "/v1/responses" | "/responses":
                await self._responses(exchange, _query_delay(query))
            case "POST", rerank if rerank in _RERANK_PATHS:
                build = self._json_answer(exchange, self._rerank_body)
                await self._answer(exchange, _query_delay(query), build)
            case "POST", "/completion" | "/infill":
                await self._native(exchange, _query_delay(query))
            case "POST", "/v1/audio/transcriptions":
                build = self._form_answer(exchange, self._transcription_body)
                await self._answer(exchange, _query_delay(query), build)
            case "POST", "/v1/audio/speech":
                build = self._json_answer(exchange, media.speech_bytes)
                await self._answer(exchange, _query_delay(query), build, b"audio/mpeg")
            case "GET" | "POST", "/v1/audio/voices":
                await self._answer(exchange, 0.0, lambda: _VOICES)
            case "POST", "/v1/images/generations":
                build = self._json_answer(exchange, media.generations_body)
                await self._answer(exchange, _query_delay(query), build)
            case "POST", "/v1/images/edits":
                build = self._form_answer(exchange, media.edits_body)
                await self._answer(exchange, _query_delay(query), build)
            case "POST", "/sdapi/v1/txt2img" | "/sdapi/v1/img2img":
                build = self._json_answer(exchange, media.sdapi_body)
                await self._answer(exchange, _query_delay(query), build)
            case "GET", "/sdapi/v1/loras":
                await self._answer(exchange, 0.0, lambda: b"[]")
            case "GET", "/slots":
                await self._answer(exchange, 0.0, self._slots.list_body)
            case "POST", slot_path if slot_path.startswith("/slots/"):
                await self._slot_action(exchange, slot_path[len("/slots/") :], query)
            case "GET", "/props":
                model = _query_value(query, "model") or self._options.model
                await self._answer(exchange, 0.0, lambda: llama.props_body(model))
            case _, echo if echo == "/echo" or echo.startswith("/echo/"):
                await self._answer(exchange, 0.0, lambda: _echo_body(exchange.record))
            case _, known if known in _KNOWN_PATHS:
                message = f"method {method} not allowed on {path}"
                await exchange.respond(405, error_body(message, code="method_not_allowed"))
            case _:
                message = f"no route for {method} {path}"
                await exchange.respond(404, error_body(message, code="not_found"))

    async def _completion(self, exchange: _Exchange, kind: Kind, delay: float) -> None:
        """POST /v1/chat/completions and /v1/completions."""
        if await self._refused(exchange):
            return
        request = parse_json_object(exchange.body)
        predicted_n = requested_tokens(request, self._options.tokens)
        model = model_of(request, self._options.model)
        prompt = request.get("messages" if kind == "chat" else "prompt")
        prompt_n = prompt_words(prompt)
        cache_n: int | None = None
        if self._options.slot_save_path is not None:
            tokens = prompt_tokens(prompt)
            prompt_n = len(tokens)
            cache_n = self._slots.assign(tokens)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        completion_id = f"{prefix}-{os.getpid()}-{next(self._ids)}"
        created = int(time.time())

        def whole(elapsed_s: float) -> bytes:
            return completion_body(
                kind=kind,
                completion_id=completion_id,
                created=created,
                model=model,
                prompt_n=prompt_n,
                predicted_n=predicted_n,
                elapsed_s=elapsed_s,
                cache_n=cache_n,
            )

        def stream() -> TokenStream:
            return StreamTemplate(
                kind=kind,
                completion_id=completion_id,
                created=created,
                model=model,
                cache_n=cache_n,
            )

        await self._generate(exchange, delay, request, prompt_n, predicted_n, whole, stream)

    async def _slot_action(self, exchange: _Exchange, slot: str, query: bytes) -> None:
        """POST /slots/{id}?action=save|restore|erase (llama-server's slot files)."""
        if await self._refused(exchange):
            return
        action = _query_value(query, "action")

        async def answer() -> None:
            status, body = await self._slots.action(slot, action, exchange.body)
            log(f"slot {slot} {action}: {status}")
            await exchange.respond(status, body)

        await self._until_disconnect(exchange, answer)

    async def _messages(self, exchange: _Exchange, delay: float) -> None:
        """POST /v1/messages, Anthropic's API."""
        if await self._refused(exchange):
            return
        request = parse_json_object(exchange.body)
        predicted_n, stop = anthropic.message_tokens(request, self._options.tokens)
        model = model_of(request, self._options.model)
        prompt_n = anthropic.input_tokens(request)
        message_id = f"msg_{os.getpid()}_{next(self._ids)}"

        def whole(elapsed_s: float) -> bytes:
            del elapsed_s  # Anthropic has no timings
            return anthropic.message_body(
                message_id=message_id,
                model=model,
                prompt_n=prompt_n,
                predicted_n=predicted_n,
                stop=stop,
            )

        def stream() -> TokenStream:
            return anthropic.MessageStreamTemplate(
                message_id=message_id, model=model, prompt_n=prompt_n, stop=stop
            )

        await self._generate(exchange, delay, request, prompt_n, predicted_n, whole, stream)

    async def _responses(self, exchange: _Exchange, delay: float) -> None:
        """POST /v1/responses, OpenAI's Responses API, whole answers only."""
        if await self._refused(exchange):
            return
        request = parse_json_object(exchange.body)
        if request.get("stream") is True:
            raise BadRequest("the responder does not stream /v1/responses", code="unsupported")
        predicted_n = requested_tokens(request, self._options.tokens, ("max_output_tokens",))
        model = model_of(request, self._options.model)
        prompt_n = prompt_words(request.get("instructions")) + prompt_words(request.get("input"))
        response_id = f"resp_{os.getpid()}_{next(self._ids)}"
        created = int(time.time())

        def whole(elapsed_s: float) -> bytes:
            del elapsed_s
            return responses_body(
                response_id=response_id,
                created=created,
                model=model,
                prompt_n=prompt_n,
                predicted_n=predicted_n,
            )

        await self._generate(exchange, delay, request, prompt_n, predicted_n, whole, None)

    async def _native(self, exchange: _Exchange, delay: float) -> None:
        """POST /completion and /infill, llama-server's own API."""
        if await self._refused(exchange):
            return
        request = parse_json_object(exchange.body)
        predicted_n = llama.native_tokens(request, self._options.tokens)
        model = model_of(request, self._options.model)
        prompt_n = llama.native_prompt_words(request)

        def whole(elapsed_s: float) -> bytes:
            return llama.native_body(
                model=model, prompt_n=prompt_n, predicted_n=predicted_n, elapsed_s=elapsed_s
            )

        def stream() -> TokenStream:
            return llama.NativeStreamTemplate(model=model)

        await self._generate(exchange, delay, request, prompt_n, predicted_n, whole, stream)

    async def _generate(
        self,
        exchange: _Exchange,
        delay: float,
        request: JSONObject,
        prompt_n: int,
        predicted_n: int,
        whole: Callable[[float], bytes],
        stream: Callable[[], TokenStream] | None,
    ) -> None:
        """Answer a generating request after `delay`, paced by --token-delay.

        With `"stream": true` (and a `stream` template factory) the answer is the
        template's events; otherwise `whole(elapsed_s)`, sent once the tokens
        would have been generated.
        """
        if stream is not None and request.get("stream") is True:
            template = stream()

            async def streamed() -> None:
                await _pause(delay)
                await self._stream_tokens(exchange, template, prompt_n, predicted_n)

            await self._until_disconnect(exchange, streamed)
            return
        token_delay = self._options.token_delay

        async def at_once() -> None:
            await _pause(delay)
            started = trio.current_time()
            # A non-streamed answer takes as long to "generate" as a streamed one.
            await _pause(token_delay * predicted_n)
            await exchange.respond(200, whole(trio.current_time() - started))
            exchange.record.tokens_sent = predicted_n

        if delay > 0 or (token_delay > 0 and predicted_n > 0):
            await self._until_disconnect(exchange, at_once)
        else:
            # Nothing to wait for: skip the watcher nursery, this is the
            # small-request benchmark path.
            await at_once()

    async def _embeddings(self, exchange: _Exchange, delay: float) -> None:
        """POST /v1/embeddings."""
        build = self._json_answer(exchange, self._embeddings_body)
        await self._answer(exchange, delay, build)

    async def _answer(
        self,
        exchange: _Exchange,
        delay: float,
        build: Callable[[], bytes],
        content_type: bytes = _JSON,
    ) -> None:
        """Answer with one body: 503 while loading, else `build()` after `delay`.

        `build` runs before the delay, so a bad request is refused at once.
        """
        if await self._refused(exchange):
            return
        body = build()

        async def answer() -> None:
            await _pause(delay)
            await exchange.respond(200, body, content_type)

        if delay > 0:
            await self._until_disconnect(exchange, answer)
        else:
            await answer()

    @staticmethod
    def _json_answer(
        exchange: _Exchange, make: Callable[[JSONObject], bytes]
    ) -> Callable[[], bytes]:
        """A `build` for `_answer`: `make` applied to the request's JSON object."""
        return lambda: make(parse_json_object(exchange.body))

    def _embeddings_body(self, request: JSONObject) -> bytes:
        return embeddings_body(request, default_model=self._options.model)

    def _rerank_body(self, request: JSONObject) -> bytes:
        return rerank_body(request, default_model=self._options.model)

    @staticmethod
    def _form_answer(
        exchange: _Exchange, make: Callable[[media.Form], bytes]
    ) -> Callable[[], bytes]:
        """A `build` for `_answer`: `make` applied to the request's multipart form."""
        content_type = exchange.header(b"content-type")
        return lambda: make(media.parse_multipart(content_type, exchange.body))

    def _transcription_body(self, form: media.Form) -> bytes:
        return media.transcription_body(form, default_model=self._options.model)

    async def _stream_tokens(
        self, exchange: _Exchange, template: TokenStream, prompt_n: int, predicted_n: int
    ) -> None:
        """Send a generation as SSE: the head events, token events and the tail events."""
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


def _query_value(query: bytes, name: str) -> str | None:
    """The last `name=` value of a query string, or None."""
    values = parse_qs(query.decode("latin-1")).get(name)
    return values[-1] if values else None


def _echo_body(record: RequestRecord) -> bytes:
    """ANY /echo/...: the request as received, for testing raw passthrough."""
    return _encode(
        {
            "method": record.method,
            "path": record.path,
            "query": record.raw_query.decode("latin-1"),
            "body": record.body.decode("utf-8", "replace"),
        }
    )


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
