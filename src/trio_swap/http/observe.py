"""``GET /metrics`` (Prometheus text format), ``GET /api/activity`` (the request log),
``GET /api/captures/<id>`` (a request's capture) and ``GET /api/timeline`` (what
each model's process did over the last hour)."""

from __future__ import annotations

import math
import re
from typing import Final

from quart import Response, request
from quart_trio import QuartTrio

from trio_swap.errors import BadRequest, SwapError
from trio_swap.http.errors import json_response
from trio_swap.http.state import AppState
from trio_swap.observe.metrics import CONTENT_TYPE
from trio_swap.observe.record import Observer

__all__ = ["register_observe_routes"]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
#: What SQLite stores as INTEGER.
_INT64: Final = range(-(2**63), 2**63)
#: Most digits of a capture id (an activity row id: SQLite's 64-bit integer).
_ID_DIGITS: Final = 19
#: A plain decimal number (Python's float() also takes "nan", "inf", "1_0" and spaces).
_NUMBER: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?", re.ASCII)


def register_observe_routes(app: QuartTrio, observer: Observer, state: AppState) -> None:
    """Add the routes for what ``observer`` has (metrics, activity, or both), and the
    timeline when ``state`` has one."""
    metrics = observer.metrics
    activity = observer.activity
    timeline = state.timeline

    if timeline is not None:

        @app.get("/api/timeline")
        async def timeline_window() -> Response:
            """The bands overlapping ``[since, now]`` (default: the last hour) and their counts."""
            since = _float_arg("since")
            body = timeline.snapshot(since)
            body["counts"] = timeline.counts(since)
            return json_response(body)

    if metrics is not None:

        @app.get("/metrics")
        async def prometheus_metrics() -> Response:
            return Response(metrics.render(), content_type=CONTENT_TYPE)

    if activity is not None:

        @app.get("/api/activity")
        async def activity_page() -> Response:
            """Newest first; ``?before=<next>`` pages back; ``?model=`` (repeatable) filters."""
            limit = _int_arg("limit")
            if limit is None:
                limit = DEFAULT_LIMIT
            if not 1 <= limit <= MAX_LIMIT:
                raise BadRequest(f"limit must be between 1 and {MAX_LIMIT} (got {limit})")
            before = _int_arg("before")
            names = request.args.getlist("model")
            models = [state.config.resolve(name) or name for name in names]
            return json_response(await activity.page(limit=limit, before=before, models=models))

    captures = observer.captures
    if captures is not None:

        @app.get("/api/captures")
        async def capture_buffer() -> Response:
            """The buffer: its limit, the bytes it holds, how many captures, the id range."""
            return json_response(captures.stats())

        @app.get("/api/captures/<capture_id>")
        async def capture(capture_id: str) -> Response:
            """One request's capture (llama-swap's shape plus trio-swap's fields)."""
            valid = capture_id.isascii() and capture_id.isdigit() and len(capture_id) <= _ID_DIGITS
            if not valid or int(capture_id) <= 0:
                shown = capture_id[:40]
                raise BadRequest(f"a capture id is a positive integer (got {shown!r})")
            found = captures.get(int(capture_id))
            if found is None:
                raise CaptureNotFound(int(capture_id))
            return json_response(found.to_json())


class CaptureNotFound(SwapError):
    """No capture with this id: never captured (off, full, not a recorded request), or evicted."""

    status = 404
    error_type = "invalid_request_error"
    code = "capture_not_found"

    def __init__(self, capture_id: int) -> None:
        super().__init__(
            f"no capture {capture_id}: never captured, or evicted from the captureBuffer"
        )


def _int_arg(name: str) -> int | None:
    """A query integer: ASCII digits within SQLite's 64-bit range (larger ones failed the query)."""
    text = request.args.get(name, "")
    if not text:
        return None
    digits = text.removeprefix("-")
    valid = digits.isascii() and digits.isdigit() and len(digits) <= 19
    if not valid or int(text) not in _INT64:
        raise BadRequest(f"{name} must be a 64-bit integer (got {text[:40]!r})")
    return int(text)


def _float_arg(name: str) -> float | None:
    """A finite query number of seconds (``1733900000.5``)."""
    text = request.args.get(name, "")
    if not text:
        return None
    if len(text) > 40 or _NUMBER.fullmatch(text) is None or not math.isfinite(float(text)):
        raise BadRequest(f"{name} must be a number of seconds since the epoch (got {text[:40]!r})")
    return float(text)
