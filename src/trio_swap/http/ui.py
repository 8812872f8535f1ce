"""The web UI: its static files at ``/ui``, its live feed at ``/api/events``, and model loading.

* ``GET /`` redirects to ``/ui/``; ``GET /ui`` too.
* ``GET /ui/<file>`` serves the files of ``trio_swap/ui`` (read once, at startup)
  with fixed content types, an ``ETag`` and ``Cache-Control: no-cache``: the
  file names carry no content hash, so the browser must revalidate (a 304 on
  loopback) or an upgrade could leave it running old modules next to new ones.
  Any other path whose last segment has no ``.`` is a page of the single-page
  app and gets ``index.html``; a missing file (``.js``, ``.css``, ...) is a 404.
* ``GET /api/events``: Server-Sent Events, see :func:`_feed`.
* ``POST /api/models/load/<model>``: load a model the way a request would (a
  lease taken from the router and released at once), answering once it is ready.

See docs/ui.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import sqlite3
from collections.abc import AsyncGenerator, Iterable
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Final, final

import msgspec
import trio
from quart import Response, redirect, request
from quart_trio import QuartTrio

from trio_swap import __version__
from trio_swap.errors import ModelNotFound
from trio_swap.http.errors import json_response, plain_error
from trio_swap.http.state import AppState, model_rows
from trio_swap.observe.activity import ActivityLog
from trio_swap.upstream.logs import Follower, LogBook, LogRing

__all__ = ["register_ui_routes"]

#: How often the feed looks at each model's process and router state.
POLL_INTERVAL: Final = 0.2
#: A comment line sent after this many seconds without an event, so proxies and
#: browsers keep an idle stream open and a dead client is noticed. Tests lower it.
HEARTBEAT_INTERVAL = 15.0
#: Lines of each log (proxy and every model) sent when a client connects.
LOG_HISTORY_LINES: Final = 500
#: How often the feed asks the activity log for new rows. It has no change
#: notification, and each query flushes the rows waiting to be written.
ACTIVITY_POLL_INTERVAL: Final = 1.0
#: Most activity rows sent per poll (more finished in a second: the page has them).
ACTIVITY_ROWS: Final = 100
#: Event batches queued for one client before the producers wait for it. A log
#: whose producer waits fills its follower's buffer, which then drops lines (and
#: says so), so a client that reads slowly holds at most this many batches of
#: :data:`LOG_BATCH` lines, plus its followers' buffers.
FEED_BUFFER: Final = 16
#: Most log lines in one batch.
LOG_BATCH: Final = 100

CONTENT_TYPES: Final = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
    ".ico": "image/x-icon",
    ".json": "application/json",
    ".txt": "text/plain; charset=utf-8",
}
#: The UI loads nothing from elsewhere and runs no inline script.
CONTENT_SECURITY_POLICY: Final = (
    "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
SSE_HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # nginx: pass events on as they come
}


@final
class _Asset(msgspec.Struct, frozen=True):
    body: bytes
    content_type: str
    etag: str


def load_assets(root: Traversable | None = None) -> dict[str, _Asset]:
    """Every UI file by its path under ``/ui/`` (``index.html``, ``pages/logs.js``, ...)."""
    if root is None:
        root = resources.files("trio_swap") / "ui"
    assets: dict[str, _Asset] = {}

    def walk(folder: Traversable, prefix: str) -> None:
        for entry in folder.iterdir():
            if entry.name.startswith((".", "_")):
                continue  # __pycache__, editor files
            if entry.is_dir():
                walk(entry, f"{prefix}{entry.name}/")
                continue
            suffix = "." + entry.name.rpartition(".")[2]
            content_type = CONTENT_TYPES.get(suffix)
            if content_type is None:
                continue
            body = entry.read_bytes()
            etag = hashlib.sha256(body).hexdigest()[:20]
            assets[prefix + entry.name] = _Asset(body, content_type, etag)

    walk(root, "")
    return assets


def register_ui_routes(app: QuartTrio, state: AppState, logs: LogBook | None) -> None:
    """Add ``/``, ``/ui...``, ``/api/events`` and ``POST /api/models/load/<model>``."""
    assets = load_assets()

    @app.get("/")
    async def root() -> Response:
        return redirect("/ui/", 302)  # type: ignore[return-value]

    @app.get("/ui")
    async def ui_bare() -> Response:
        return redirect("/ui/", 302)  # type: ignore[return-value]

    @app.get("/ui/")
    @app.get("/ui/<path:subpath>")
    async def ui_file(subpath: str = "index.html") -> Response:
        asset = assets.get(subpath)
        if asset is None:
            if "." in subpath.rpartition("/")[2] or "index.html" not in assets:
                return plain_error(
                    404, f"no UI file {request.path}", "invalid_request_error", "not_found"
                )
            asset = assets["index.html"]  # a page of the app: it routes on the client
        headers = {
            "Cache-Control": "no-cache",
            "ETag": f'"{asset.etag}"',
            "X-Content-Type-Options": "nosniff",
        }
        if asset.content_type.startswith("text/html"):
            headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
            headers["Referrer-Policy"] = "no-referrer"
        if asset.etag in request.if_none_match:
            return Response(b"", status=304, headers=headers)
        return Response(asset.body, content_type=asset.content_type, headers=headers)

    @app.get("/api/events")
    async def events() -> Response:
        if request.method == "HEAD":
            return Response(b"", content_type="text/event-stream", headers=SSE_HEADERS)
        return Response(
            _EventStream(state, logs), content_type="text/event-stream", headers=SSE_HEADERS
        )

    @app.post("/api/models/load/<path:name>")
    async def load_one(name: str) -> Response:
        model_id = state.config.resolve(name)
        if model_id is None or model_id not in state.processes:
            raise ModelNotFound(name)
        # Through the router, like a request: the policy swaps, queues and limits apply.
        lease = await state.router.acquire(model_id)
        state.router.release(lease)
        return json_response({"msg": "ok", "model": model_id})


# -- the event feed ------------------------------------------------------------------


def _event(name: str, data: object) -> bytes:
    # msgspec writes JSON on one line, so one ``data:`` line carries it.
    return b"event: " + name.encode() + b"\ndata: " + msgspec.json.encode(data) + b"\n\n"


def _log_events(entries: Iterable[tuple[str, str]]) -> bytes:
    return b"".join(_event("log", {"source": source, "line": line}) for source, line in entries)


HEARTBEAT: Final = b": keep-alive\n\n"
#: Sent by a producer to end the stream (compared by identity).
_END: Final = b""


@trio.as_safe_channel
async def _feed(state: AppState, logs: LogBook | None) -> AsyncGenerator[bytes, None]:
    """The events of one client, as SSE frames.

    1. ``snapshot``: ``{"models": [...], "swaps": n, "version": ...}``, the rows
       of ``GET /api/models``;
    2. ``log`` ``{"source": "proxy" or a model id, "line": ...}``: the last
       :data:`LOG_HISTORY_LINES` of each log, in the order written, then live;
    3. ``model``: a row, whenever anything in it changed. Process and router
       state have no change notifications, so the feed compares the rows every
       :data:`POLL_INTERVAL` seconds (a state seen for less than that may be
       skipped; the last state always arrives);
    4. ``activity``: each new row of the activity log (``GET /api/activity``
       rows), oldest first, looked for every :data:`ACTIVITY_POLL_INTERVAL`
       seconds; none when trio-swap keeps no activity log;
    5. ``profile`` ``{"active": name or null}``: the active profile changed
       (the snapshot carries it as ``profile``), looked for with the rows.

    The logs are followed live from the moment the history is read (no line
    lost or repeated). The stream ends when trio-swap shuts down (the log
    followers end), and when the set of models changes (a config reload): the
    client reconnects and starts again from a new snapshot, following the new
    models' logs.
    """
    activity = state.observer.activity if state.observer is not None else None
    newest = await _newest_activity_id(activity) if activity is not None else 0
    sources = _log_sources(logs)
    with contextlib.ExitStack() as stack:
        followers = {name: stack.enter_context(ring.subscribe()) for name, ring in sources.items()}
        # Subscribed and read with no await in between.
        history = list(
            heapq.merge(
                *(
                    [(seq, name, line) for seq, line in ring.entries()[-LOG_HISTORY_LINES:]]
                    for name, ring in sources.items()
                )
            )
        )
        rows = model_rows(state)
        yield _snapshot(state, rows)
        for start in range(0, len(history), LOG_BATCH):
            batch = history[start : start + LOG_BATCH]
            yield _log_events((name, line) for _, name, line in batch)
        send, receive = trio.open_memory_channel[bytes](FEED_BUFFER)
        async with trio.open_nursery() as nursery:
            for name, follower in followers.items():
                nursery.start_soon(_pump_log, name, follower, send.clone())
            nursery.start_soon(_watch_models, state, rows, send.clone())
            if activity is not None:
                nursery.start_soon(_watch_activity, activity, newest, send.clone())
            send.close()
            while True:
                frame = HEARTBEAT
                with trio.move_on_after(HEARTBEAT_INTERVAL):
                    frame = await receive.receive()
                if not frame:  # _END
                    break
                yield frame
            # Cancelled here, never from a child task while this generator is
            # suspended at ``yield`` (that Cancelled would surface outside its scope).
            nursery.cancel_scope.cancel(reason="event stream ended")


def _log_sources(logs: LogBook | None) -> dict[str, LogRing]:
    if logs is None:
        return {}
    # The upstream ring repeats the model rings' lines; the client merges them itself.
    return {"proxy": logs.proxy, **logs.models}


def _snapshot(state: AppState, rows: list[dict[str, object]]) -> bytes:
    body = {
        "models": rows,
        "swaps": state.router.swap_count,
        "version": __version__,
        "profile": _active_profile(state),
    }
    return _event("snapshot", body)


def _active_profile(state: AppState) -> str | None:
    return state.selection.active if state.selection is not None else None


async def _pump_log(
    source: str,
    follower: Follower,
    send: trio.MemorySendChannel[bytes],
) -> None:
    with send:
        while True:
            lines = await follower.receive_batch(LOG_BATCH)
            if not lines:  # trio-swap is shutting down: end the stream so HTTP can drain
                await send.send(_END)
                return
            await send.send(_log_events((source, line) for line in lines))


async def _watch_models(
    state: AppState,
    rows: list[dict[str, object]],
    send: trio.MemorySendChannel[bytes],
) -> None:
    with send:
        last = {str(row["id"]): row for row in rows}
        profile = _active_profile(state)
        while True:
            await trio.sleep(POLL_INTERVAL)
            current = {str(row["id"]): row for row in model_rows(state)}
            if current.keys() != last.keys():  # reloaded: the client starts again
                await send.send(_END)
                return
            changed = [row for model_id, row in current.items() if row != last[model_id]]
            if changed:
                await send.send(b"".join(_event("model", row) for row in changed))
            last = current
            if _active_profile(state) != profile:
                profile = _active_profile(state)
                await send.send(_event("profile", {"active": profile}))


async def _newest_activity_id(activity: ActivityLog) -> int:
    try:
        page = await activity.page(limit=1)
    except sqlite3.Error:
        return 0
    return page.data[0].id if page.data else 0


async def _watch_activity(
    activity: ActivityLog, newest: int, send: trio.MemorySendChannel[bytes]
) -> None:
    with send:
        while True:
            await trio.sleep(ACTIVITY_POLL_INTERVAL)
            try:
                page = await activity.page(limit=ACTIVITY_ROWS)
            except sqlite3.Error:
                continue  # logged by the activity log's writer; try again later
            fresh = [row for row in reversed(page.data) if row.id > newest]
            if fresh:
                newest = fresh[-1].id
                await send.send(b"".join(_event("activity", row) for row in fresh))


@final
class _EventStream:
    """The body of ``/api/events``: :func:`_feed`, entered on the first read.

    Quart closes the body (:meth:`aclose`) when the response ends, the client
    disconnecting included; that cancels the feed's tasks and detaches its log
    followers. A body never read never subscribed to anything.
    """

    def __init__(self, state: AppState, logs: LogBook | None) -> None:
        self._context = _feed(state, logs)
        self._channel: trio.abc.ReceiveChannel[bytes] | None = None
        self._done = False

    def __aiter__(self) -> _EventStream:
        return self

    async def __anext__(self) -> bytes:
        if self._done:
            raise StopAsyncIteration
        if self._channel is None:
            self._channel = await self._context.__aenter__()
        try:
            return await self._channel.receive()
        except trio.EndOfChannel:
            await self.aclose()
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        if self._channel is not None and not self._done:
            self._done = True
            await self._context.__aexit__(None, None, None)
        self._done = True
