"""What one model-routed request did, taken as it passes: the hot path's share.

:class:`~trio_swap.http.inference.InferenceRoutes` opens a
:class:`RequestRecord` per request, sends every ASGI message through
:meth:`RequestRecord.send`, and marks the lease and the upstream's answer.
Per body chunk the record does O(1) work: an SSE stream keeps only its last
:data:`TAIL_CHUNKS` chunks (a deque of references, no copying), a JSON body
is kept whole only while it stays under :data:`~.usage.MAX_JSON_BYTES`, and
anything else is not kept. :meth:`Observer.finish` parses what was kept once,
then updates the metrics and queues the activity row.

With captures on (``captureBuffer``), the record also feeds a
:class:`~trio_swap.observe.captures.CaptureDraft` with the request body and
every response message; the draft counts and bounds its own bytes, and is
filed under the activity row's id when the row is queued.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, final

from hypercorn.typing import ASGISendCallable, ASGISendEvent, HTTPScope

from trio_swap.config.keys import grant_of
from trio_swap.config.model import PeerConfig
from trio_swap.observe import usage as parse
from trio_swap.observe.activity import ActivityLog, ActivityRow
from trio_swap.observe.captures import CaptureDraft, CaptureStore
from trio_swap.observe.metrics import Metrics
from trio_swap.observe.session import session_id_of

__all__ = ["Observer", "RequestRecord"]

log = logging.getLogger("trio_swap.observe")

#: Chunks of a stream kept for its final usage event (upstreams send it in the
#: last one or two; the deque bounds memory by count, chunks by the read size).
TAIL_CHUNKS: Final = 8
#: Status recorded when the client left before any response was sent (nginx's).
CLIENT_GONE: Final = 499
#: The ``endpoint`` label of every ``/upstream/<model>/...`` request (the path is open-ended).
PASSTHROUGH_ENDPOINT: Final = "/upstream"

_OFF: Final = 0
_JSON: Final = 1
_SSE: Final = 2


@final
class RequestRecord:
    """Times, status and the kept body bytes of one request."""

    __slots__ = (
        "_send",
        "answered",
        "arrived",
        "capture",
        "endpoint",
        "granted",
        "kept",
        "kept_bytes",
        "key_name",
        "method",
        "mode",
        "model",
        "path",
        "selector",
        "session_id",
        "started",
        "status",
        "tail",
    )

    def __init__(
        self, scope: HTTPScope, send: ASGISendCallable, capture: CaptureDraft | None = None
    ) -> None:
        self._send = send
        #: The request's capture in progress; None: captures are off (or full).
        self.capture = capture
        self.started = time.time()
        self.arrived = time.monotonic()
        #: Monotonic times of the lease and of the upstream's response head.
        self.granted: float | None = None
        self.answered: float | None = None
        self.path: str = scope["path"]
        self.method: str = scope["method"]
        self.endpoint = PASSTHROUGH_ENDPOINT if self.path.startswith("/upstream/") else self.path
        #: The model id, ``peer/model``, or "" until the request is routed.
        self.model = ""
        grant = grant_of(scope)
        #: The API key's name (``apiKeys``), never the key; None without keys.
        self.key_name = grant.name if grant is not None else None
        #: From the ``ui.activity.session_id`` headers (set by :meth:`Observer.begin`).
        self.session_id: str | None = None
        #: The selector that chose the model (``selectors:``); None: the client named it.
        self.selector: str | None = None
        self.status = CLIENT_GONE
        self.mode = _OFF
        self.kept: list[bytes] = []
        self.kept_bytes = 0
        self.tail: deque[bytes] = deque(maxlen=TAIL_CHUNKS)

    def routed(self, model_id: str, peer: PeerConfig | None) -> None:
        """The request goes to ``model_id`` (a peer's own model name when ``peer``)."""
        self.model = model_id if peer is None else peer.qualified(model_id)

    def lease_granted(self) -> None:
        self.granted = time.monotonic()

    def upstream_answered(self) -> None:
        self.answered = time.monotonic()

    def request_body(self, body: bytes, headers: Iterable[tuple[bytes, bytes]]) -> None:
        """The client's whole request body, as read (for the capture)."""
        if self.capture is not None:
            content_type = next((v for k, v in headers if k == b"content-type"), b"")
            self.capture.request_body(body, content_type)

    async def send(self, message: ASGISendEvent) -> None:
        """The ASGI ``send`` the handler uses: notes the status and keeps body bytes."""
        if message["type"] == "http.response.body":
            if self.capture is not None:
                self.capture.response_body(message.get("body", b""))
            if self.mode:
                chunk = message.get("body", b"")
                if self.mode == _SSE:
                    self.tail.append(chunk)
                else:
                    self.kept_bytes += len(chunk)
                    if self.kept_bytes <= parse.MAX_JSON_BYTES:
                        self.kept.append(chunk)
                    else:
                        self.mode = _OFF
                        self.kept = []
        elif message["type"] == "http.response.start":
            self.status = message["status"]
            self.mode = _mode(message["headers"])
            if self.capture is not None:
                self.capture.response_start(self.status, message["headers"])
        await self._send(message)

    def usage(self) -> parse.Usage | None:
        """Parse what was kept (once, after the response)."""
        if self.mode == _SSE:
            return parse.from_sse(_last_bytes(self.tail, parse.SSE_TAIL_BYTES))
        if self.mode == _JSON and self.kept:
            return parse.from_json(b"".join(self.kept))
        return None


def _last_bytes(chunks: deque[bytes], size: int) -> bytes:
    """The end of the stream: only as many of the kept chunks as ``size`` bytes need."""
    taken: list[bytes] = []
    total = 0
    for chunk in reversed(chunks):
        taken.append(chunk)
        total += len(chunk)
        if total >= size:
            break
    return b"".join(reversed(taken))[-size:]


def _mode(headers: Iterable[tuple[bytes, bytes]]) -> int:
    """Keep JSON and SSE bodies, unless compressed (never decoded here)."""
    mode = _OFF
    for name, value in headers:
        if name == b"content-type":
            if b"text/event-stream" in value:
                mode = _SSE
            elif b"json" in value:
                mode = _JSON
        elif name == b"content-encoding" and value not in (b"identity", b""):
            return _OFF
    return mode


@final
class Observer:
    """Turns finished requests into metrics and activity rows; either may be absent."""

    #: ``ui.activity.session_id`` as ASGI header names (observe/session.py); the
    #: server sets it, and again on a reload.
    session_headers: tuple[bytes, ...] = ()
    #: ``logRequests``: one proxy log line per finished request.
    log_requests: bool = False

    def __init__(
        self,
        metrics: Metrics | None = None,
        activity: ActivityLog | None = None,
        on_usage: Callable[[str, parse.Usage], None] | None = None,
        captures: CaptureStore | None = None,
    ) -> None:
        self.metrics = metrics
        self.activity = activity
        #: Request captures, filed by activity row id (so only with an activity log).
        self.captures = captures if activity is not None else None
        #: Told the usage of each 2xx answer (keepCache reads ``cache_n`` from it).
        self.on_usage = on_usage

    def begin(self, scope: HTTPScope, send: ASGISendCallable) -> RequestRecord:
        captures = self.captures
        draft = captures.begin(scope) if captures is not None and captures.enabled else None
        record = RequestRecord(scope, send, draft)
        if self.session_headers:
            record.session_id = session_id_of(scope["headers"], self.session_headers)
        return record

    def finish(self, record: RequestRecord) -> None:
        """The handler returned (however it ended): count and log the request.

        Runs in the handler's ``finally``: whatever an upstream reported, a
        failure here is logged, never raised over the request's own outcome.
        """
        try:
            self._account(record)
        except Exception:
            log.exception("accounting of %s %s failed", record.method, record.path)
        finally:
            if record.capture is not None:
                record.capture.discard()  # not filed under a row: its bytes go back

    def _account(self, record: RequestRecord) -> None:
        ended = time.monotonic()
        wait = latency = None
        if record.granted is not None:
            wait = record.granted - record.arrived
            if record.answered is not None:
                latency = record.answered - record.granted
        usage = record.usage()
        speed = None
        if usage is not None:
            speed = usage.tokens_per_second
            if speed is None and usage.completion_tokens and record.granted is not None:
                # Not reported: tokens over the time since forwarding (prompt included).
                speed = usage.completion_tokens / max(ended - record.granted, 1e-6)
        stream = record.mode == _SSE
        if self.log_requests:
            log.info(
                "request %s %s -> %d in %.0fms (model %s%s)",
                record.method,
                record.path,
                record.status,
                (ended - record.arrived) * 1000.0,
                record.model or "-",
                f", session {record.session_id}" if record.session_id else "",
            )
        metrics = self.metrics
        if metrics is not None:
            metrics.request_done(record.model, record.endpoint, record.status, wait, latency)
            if usage is not None and record.model:
                metrics.tokens(record.model, usage.prompt_tokens, usage.completion_tokens, speed)
        if self.on_usage is not None and usage is not None and 200 <= record.status < 300:
            self.on_usage(record.model, usage)
        if self.activity is not None:
            row_id = self.activity.add(
                ActivityRow(
                    time=record.started,
                    model=record.model,
                    endpoint=record.path,
                    method=record.method,
                    status=record.status,
                    duration_ms=_ms(ended - record.arrived),
                    wait_ms=None if wait is None else _ms(wait),
                    upstream_ms=None if latency is None else _ms(latency),
                    stream=stream,
                    prompt_tokens=usage.prompt_tokens if usage else None,
                    completion_tokens=usage.completion_tokens if usage else None,
                    cached_tokens=usage.cached_tokens if usage else None,
                    prompt_per_second=usage.prompt_per_second if usage else None,
                    tokens_per_second=None if speed is None else round(speed, 3),
                    # An error body, or an error event in a stream (a 200 that broke).
                    error=usage.error if usage and (record.status >= 400 or stream) else None,
                    key_name=record.key_name,
                    session_id=record.session_id,
                    selector=record.selector,
                )
            )
            if record.capture is not None:
                record.capture.finish(row_id)


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)
