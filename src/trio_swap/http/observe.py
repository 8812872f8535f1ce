"""``GET /metrics`` (Prometheus text format) and ``GET /api/activity`` (the request log)."""

from __future__ import annotations

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


def register_observe_routes(app: QuartTrio, observer: Observer, state: AppState) -> None:
    """Add the routes for what ``observer`` has (metrics, activity, or both)."""
    metrics = observer.metrics
    activity = observer.activity

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
