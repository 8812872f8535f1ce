"""``GET /api/performance``: the hardware samples of the last hour (docs/api.md).

200 with ``{"enabled": true, "every", "max_samples", "gpus_found", "samples":
[...]}``, oldest sample first. ``?since=<unix seconds>`` keeps the samples
taken after it (a poller passes its newest sample's ``time``); llama-swap's
``?after=<RFC 3339>`` works too. With ``performance.disabled`` the answer is
llama-swap's 503 ``{"enabled": false}``.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from typing import Final

from quart import Response, request
from quart_trio import QuartTrio

from trio_swap.errors import BadRequest
from trio_swap.http.errors import json_response
from trio_swap.observe.performance import PerformanceMonitor

__all__ = ["register_performance_route"]

#: A plain decimal number (Python's float() also takes "nan", "inf", "1_0" and spaces).
_NUMBER: Final = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d{1,3})?", re.ASCII)


def register_performance_route(app: QuartTrio, monitor: PerformanceMonitor) -> None:
    @app.get("/api/performance")
    async def performance() -> Response:
        if not monitor.config.enabled:
            return json_response({"enabled": False}, 503)
        return json_response(monitor.snapshot(_since()))


def _since() -> float | None:
    """``since`` (Unix seconds) or ``after`` (RFC 3339), whichever is given; 400 if malformed."""
    since = request.args.get("since", "")
    after = request.args.get("after", "")
    if since and after:
        raise BadRequest("give since or after, not both")
    if since:
        if len(since) > 40 or _NUMBER.fullmatch(since) is None or not math.isfinite(float(since)):
            raise BadRequest(
                f"since must be a number of seconds since the epoch (got {since[:40]!r})"
            )
        return float(since)
    if after:
        try:
            moment = datetime.fromisoformat(after[:60])
        except ValueError:
            raise BadRequest(
                f"after must be an RFC 3339 time such as 2025-01-02T15:04:05Z (got {after[:60]!r})"
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return None
