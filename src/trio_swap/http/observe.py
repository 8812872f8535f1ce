"""``GET /metrics`` (Prometheus text format), ``GET /api/activity`` (the request log)
and ``GET /api/timeline`` (what each model's process did over the last hour)."""

from __future__ import annotations

import math
import re
from typing import Final

from quart import Response, request
from quart_trio import QuartTrio

from trio_swap.errors import BadRequest
from trio_swap.http.errors import json_response
from trio_swap.http.state import AppState
from trio_swap.observe.metrics import CONTENT_TYPE
from trio_swap.observe.record import Observer

__all__ = ["register_observe_routes"]

DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
#: What SQLite stores as INTEGER.
_INT64: Final = range(-(2**63), 2**63)
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
