"""The log endpoints, as llama-swap has them (see docs/logs.md).

* ``GET /logs``: proxy and upstream history merged in time order, ``text/plain``.
* ``GET /logs/stream``: the same, then live lines until the client leaves.
* ``GET /logs/stream/proxy``, ``/logs/stream/upstream``, ``/logs/stream/<model>``
  (an id or an alias; ids may contain ``/``): one log, history then live.

``?no-history`` (any value, or none) skips the history. A stream ends when the
client disconnects (quart-trio cancels the wait for the next line and closes
the body, which detaches the follower) or when trio-swap shuts down
(:meth:`LogBook.end_followers`). Streaming never slows a model: see
:mod:`trio_swap.upstream.logs` for how followers that fall behind drop lines.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import final

from quart import Response, request
from quart_trio import QuartTrio

from trio_swap.http.errors import plain_error
from trio_swap.upstream.logs import LogBook, LogRing, follow

__all__ = ["register_log_routes"]

TEXT_PLAIN = "text/plain; charset=utf-8"
STREAM_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass lines on as they come
    "X-Content-Type-Options": "nosniff",  # browsers: show text at once, do not sniff first
}


def _text(lines: list[str]) -> bytes:
    if not lines:
        return b""
    return ("\n".join(lines) + "\n").encode("utf-8", "replace")


def register_log_routes(
    app: QuartTrio, logs: LogBook, resolve: Callable[[str], str | None]
) -> None:
    """Add ``/logs`` and ``/logs/stream...`` to the admin app.

    ``resolve`` maps a model id or alias to its id under the config serving
    now (a reload can change it), or None.
    """

    @app.get("/logs")
    async def logs_history() -> Response:
        return Response(_text(logs.history()), content_type=TEXT_PLAIN)

    @app.get("/logs/stream")
    async def logs_stream_all() -> Response:
        return _stream([logs.proxy, logs.upstream], logs.history)

    @app.get("/logs/stream/<path:name>")
    async def logs_stream_one(name: str) -> Response:
        ring: LogRing | None
        if name == "proxy":
            ring = logs.proxy
        elif name == "upstream":
            ring = logs.upstream
        else:
            model_id = resolve(name)
            ring = logs.models.get(model_id) if model_id is not None else None
        if ring is None:
            return plain_error(
                400,
                f"no log for {name!r}: use a model id or alias, 'proxy' or 'upstream'",
                "invalid_request_error",
                "model_not_found",
            )
        return _stream([ring], ring.lines)


def _stream(rings: list[LogRing], history: Callable[[], list[str]]) -> Response:
    if request.method == "HEAD":
        return Response(b"", content_type=TEXT_PLAIN, headers=STREAM_HEADERS)
    lines = history() if "no-history" not in request.args else []
    return Response(_LogStream(rings, lines), content_type=TEXT_PLAIN, headers=STREAM_HEADERS)


@final
class _LogStream:
    """The body of a log stream: the history, then live lines until closed.

    The follower is attached here, in the handler, before the response headers
    go out: a client that has the headers sees every line written after them.
    Quart closes the body (:meth:`aclose`) when the response ends, the client
    disconnecting included (quart-trio cancels the wait for the next line).
    Should a body never be iterated at all, dropping it detaches the follower
    too (closing the ``follow`` context's generator).
    """

    def __init__(self, rings: list[LogRing], history: list[str]) -> None:
        self._subscription = follow(rings)
        self._follower = self._subscription.__enter__()
        # Subscribed and snapshotted with no await in between: no line lost or repeated.
        # Sent even when empty: the response's start goes out at once either way.
        self._first: bytes | None = _text(history)
        self._closed = False

    def __aiter__(self) -> _LogStream:
        return self

    async def __anext__(self) -> bytes:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        if not self._closed:
            lines = await self._follower.receive_batch()
            if lines:
                return _text(lines)
            self.close()  # ended: trio-swap is shutting down
        raise StopAsyncIteration

    async def aclose(self) -> None:
        self.close()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._subscription.__exit__(None, None, None)
