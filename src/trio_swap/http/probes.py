"""``GET /livez`` and ``GET /readyz``: what an orchestrator (Kubernetes, a load balancer) asks.

``/health`` says only that the HTTP server answers. An orchestrator needs two
more precise answers (docs/api.md, "Health probes"; docs/kubernetes.md):

* **Liveness** (``/livez``): is the router task still taking events? Every
  routing decision goes through that one task; if it wedges, requests queue
  forever while ``/health`` still says OK, and only a restart helps. The
  signal is the systemd watchdog's own (:class:`~trio_swap.systemd.Watchdog`):
  a timer puts a tick into the router's channel every interval and the router
  stamps the time it handled it. Once no tick has been handled for longer
  than the bound (``WatchdogSec`` under systemd, else ``liveness_timeout``:
  two intervals), ``/livez`` answers 503. A slow model load, a long stop or
  a long generation does not count: none of them runs in the router task.
* **Readiness** (``/readyz``): does this instance take requests? 503 while it
  starts (listening, but not yet handling signals and reloads) and from the
  moment a shutdown begins (SIGTERM: the drain). A wedged router does not make
  it unready: that is liveness's call, and a restart's.

Both are open without an API key, like ``/health`` (:mod:`trio_swap.http.access`),
answer ``application/json`` and are never cached.
"""

from __future__ import annotations

from typing import Final, final

import trio
from quart import Response
from quart_trio import QuartTrio

from trio_swap.http.errors import json_response
from trio_swap.systemd import Watchdog

__all__ = ["DEFAULT_LIVENESS_TIMEOUT", "Probes", "register_probe_routes"]

#: Seconds the router may leave a tick unanswered when systemd set no watchdog:
#: the shipped unit's ``WatchdogSec=30``, so both supervisors see the same thing.
DEFAULT_LIVENESS_TIMEOUT: Final = 30.0

_NO_STORE: Final = {"Cache-Control": "no-store"}


@final
class Probes:
    """The state both probes read: the watchdog's last handled tick, startup, shutdown."""

    def __init__(self, watchdog: Watchdog, shutdown: trio.Event) -> None:
        """``watchdog``: its ticks are the liveness signal; ``shutdown``: set when the
        graceful stop begins (readiness ends at that moment)."""
        self._watchdog = watchdog
        self._shutdown = shutdown
        self._since = trio.current_time()
        self._started = False

    def started(self) -> None:
        """Startup is complete: listening, signals handled, reloads possible."""
        self._started = True

    def router_silence(self) -> float:
        """Seconds since the router last handled a tick (or since startup, before the first)."""
        last = self._watchdog.last_handled
        return trio.current_time() - (self._since if last is None else last)

    def liveness(self) -> tuple[int, dict[str, object]]:
        """``(status, body)`` of ``/livez``."""
        bound = self._watchdog.bound
        if bound is None:  # no ticks at all: nothing to judge by (never in serve())
            return 200, {"status": "ok"}
        silence = self.router_silence()
        if silence <= bound:
            return 200, {"status": "ok"}
        return 503, {
            "status": "wedged",
            "message": f"the router has not handled an event for {silence:.1f}s "
            f"(the bound is {bound:g}s)",
            "router_silent_seconds": round(silence, 3),
            "bound_seconds": bound,
        }

    def readiness(self) -> tuple[int, dict[str, object]]:
        """``(status, body)`` of ``/readyz``."""
        if self._shutdown.is_set():
            return 503, {"status": "stopping", "message": "shutting down: draining requests"}
        if not self._started:
            return 503, {"status": "starting", "message": "trio-swap is starting"}
        return 200, {"status": "ok"}


def register_probe_routes(app: QuartTrio, probes: Probes) -> None:
    """``GET /livez`` and ``GET /readyz`` (``HEAD`` too) on the admin app."""

    @app.get("/livez")
    async def livez() -> Response:
        status, body = probes.liveness()
        return json_response(body, status, dict(_NO_STORE))

    @app.get("/readyz")
    async def readyz() -> Response:
        status, body = probes.readiness()
        return json_response(body, status, dict(_NO_STORE))
