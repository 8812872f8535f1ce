"""Per-request cleanup that runs however the request ends.

Quart sends a streamed response *after* the handler returned, and a client
disconnect cancels that send, possibly before the body iterator ever started
(so its ``finally`` never runs). Releasing the router lease and closing the
upstream response therefore cannot live in the handler or the body. This thin
ASGI wrapper gives each HTTP request a list of callbacks, run in reverse order
in a shielded, time-bounded scope once the app is completely done with it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Final, cast, final

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
from quart import Request

__all__ = ["CleanupMiddleware", "on_request_end"]

log = logging.getLogger("trio_swap.http")

_SCOPE_KEY: Final = "trio_swap.cleanup"
#: Upper bound for all of one request's cleanup (closing an upstream connection).
CLEANUP_TIMEOUT: Final = 5.0

Cleanup = Callable[[], Awaitable[None] | None]
AsgiApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]


def on_request_end(request: Request, callback: Cleanup) -> None:
    """Run ``callback`` (sync or async) when the HTTP exchange is over, whatever happened."""
    callbacks = cast(list[Cleanup], cast(dict[str, object], request.scope)[_SCOPE_KEY])
    callbacks.append(callback)


@final
class CleanupMiddleware:
    def __init__(self, app: AsgiApp) -> None:
        self._app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        callbacks: list[Cleanup] = []
        cast(dict[str, object], scope)[_SCOPE_KEY] = callbacks
        try:
            await self._app(scope, receive, send)
        finally:
            if callbacks:
                with trio.CancelScope(shield=True), trio.move_on_after(CLEANUP_TIMEOUT):
                    for callback in reversed(callbacks):
                        try:
                            result = callback()
                            if result is not None:
                                await result
                        except Exception:
                            log.exception("request cleanup failed")
