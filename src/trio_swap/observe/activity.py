"""The activity log: one SQLite row per model-routed request, newest kept.

A request never waits for the database: :meth:`ActivityLog.add` appends to a
list, and the writer task (:meth:`ActivityLog.run`) inserts what piled up in
one transaction, :data:`FLUSH_SECONDS` after the first row of a batch or as
soon as :data:`BATCH_ROWS` wait. An in-memory database (the default) is
written on the trio thread: a batch insert is microseconds. A file database
is written in a worker thread, because a commit may wait for the disk.

Retention deletes the oldest rows after each batch, by id, so it costs one
index range: ``metricsMaxInMemory`` rows in memory, ``store.maxRows`` in a
file (0 keeps everything, as llama-swap does).

:meth:`ActivityLog.add` gives each row its id at once (not when SQLite writes
it), so a request's capture (:mod:`trio_swap.observe.captures`) can be filed
under its row's id before the row is written; a file's ids continue after the
highest it ever gave (``sqlite_sequence``). ``has_capture`` is not stored: it
is whether the capture store still holds the row's capture when the row is read.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Container, Sequence
from operator import attrgetter
from typing import Final, TypeVar, final

import msgspec
import trio

__all__ = ["DEFAULT_MAX_ROWS", "ActivityLog", "ActivityPage", "ActivityRow"]

log = logging.getLogger("trio_swap.activity")

T = TypeVar("T")

#: llama-swap's default for ``metricsMaxInMemory``.
DEFAULT_MAX_ROWS: Final = 1000
#: Longest a finished request waits before its row is written.
FLUSH_SECONDS: Final = 0.5
#: Write at once when this many rows wait.
BATCH_ROWS: Final = 256
#: Longest shutdown waits for the last rows to reach a file (a hung disk must not hang it).
SHUTDOWN_SECONDS: Final = 5.0


class ActivityRow(msgspec.Struct, kw_only=True):
    """One request, as stored and as ``GET /api/activity`` returns it."""

    id: int = 0
    #: Unix seconds when the request arrived.
    time: float
    #: Model id, ``peer/model`` for a peer's model, "" when no model was found.
    model: str
    #: The request path.
    endpoint: str
    method: str
    #: HTTP status sent to the client (499: the client left before any answer).
    status: int
    duration_ms: float
    #: From arrival to the router's lease: queueing plus loading. None: never leased.
    wait_ms: float | None = None
    #: From forwarding to the upstream's response head. None: nothing forwarded.
    upstream_ms: float | None = None
    stream: bool = False
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None
    prompt_per_second: float | None = None
    tokens_per_second: float | None = None
    error: str | None = None
    #: The ``name`` of the API key the request came with (never the key); None: no
    #: ``apiKeys``, or a request refused before its key was known.
    key_name: str | None = None
    #: The request's session id, from the first ``ui.activity.session_id`` header
    #: it carried (observe/session.py); None: none of them.
    session_id: str | None = None
    #: The selector that chose the model (llama-swap's ``metadata.selector``); None:
    #: the client named the model itself.
    selector: str | None = None
    #: Whether ``GET /api/captures/<id>`` has this request (not stored: captures
    #: live in memory, and the oldest are evicted).
    has_capture: bool = False


class ActivityPage(msgspec.Struct):
    """A page of rows, newest first; ``next`` is the ``before`` of the next page."""

    data: list[ActivityRow]
    next: int | None


#: Fields computed when a row is read, not stored.
_NOT_STORED: Final = frozenset({"has_capture"})
_COLUMNS: Final = tuple(
    field.name for field in msgspec.structs.fields(ActivityRow) if field.name not in _NOT_STORED
)
_VALUES: Final = attrgetter(*_COLUMNS)
_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS activity (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    model TEXT NOT NULL,
    endpoint TEXT NOT NULL,
    method TEXT NOT NULL,
    status INTEGER NOT NULL,
    duration_ms REAL NOT NULL,
    wait_ms REAL,
    upstream_ms REAL,
    stream INTEGER NOT NULL,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    cached_tokens INTEGER,
    prompt_per_second REAL,
    tokens_per_second REAL,
    error TEXT,
    key_name TEXT,
    session_id TEXT,
    selector TEXT
);
CREATE INDEX IF NOT EXISTS activity_model ON activity (model, id);
"""
#: Columns added after the first release, with their SQL type: a file written by an
#: older trio-swap gets them on open (its rows read them as NULL).
_ADDED_COLUMNS: Final = {"key_name": "TEXT", "session_id": "TEXT", "selector": "TEXT"}
_INSERT: Final = (
    f"INSERT INTO activity ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
)
_SELECT: Final = f"SELECT {', '.join(_COLUMNS)} FROM activity"


@final
class ActivityLog:
    """The store and its writer task. ``path`` None: an in-memory database."""

    def __init__(
        self,
        path: str | None = None,
        *,
        max_rows: int = DEFAULT_MAX_ROWS,
        captures: Container[int] | None = None,
    ) -> None:
        self.path = path
        #: Rows kept; 0 keeps every row.
        self.max_rows = max_rows
        #: The ids that have a capture (``has_capture``); None: none has.
        self.captures = captures
        #: The id the next row gets (set past a file's ids when it is opened).
        self._next_id = 1
        self._db: sqlite3.Connection | None = None
        self._pending: list[ActivityRow] = []
        self._has_rows = trio.Event()
        self._batch_full = trio.Event()
        # A file database is used from worker threads, one call at a time.
        self._lock = trio.Lock()

    # -- for the request path (never blocks) --------------------------------------------

    def add(self, row: ActivityRow) -> int:
        """Give the row its id and queue it; the writer task stores it within
        :data:`FLUSH_SECONDS`. Returns the id."""
        row.id = self._next_id
        self._next_id += 1
        self._pending.append(row)
        self._has_rows.set()
        if len(self._pending) >= BATCH_ROWS:
            self._batch_full.set()
        return row.id

    # -- the writer task ----------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open the database, then write batches until cancelled; the last batch is
        written and the database closed on the way out.

        Raises:
            OSError: the database cannot be opened (before ``task_status.started``).
        """
        await self._call(self._open)
        task_status.started()
        try:
            while True:
                await self._has_rows.wait()
                with trio.move_on_after(FLUSH_SECONDS):
                    await self._batch_full.wait()
                await self.flush()
        finally:
            # A hung disk must not hang shutdown: past the deadline the worker
            # thread is abandoned (it finishes or dies with the process).
            with trio.CancelScope(shield=True), trio.move_on_after(SHUTDOWN_SECONDS):
                await self.flush(abandon_on_cancel=True)
                await self._call(self._close, abandon_on_cancel=True)

    async def flush(self, *, abandon_on_cancel: bool = False) -> None:
        """Write the rows waiting now (a failed write is logged and its rows dropped).

        The rows are taken only once the database is free, so a caller cancelled
        while it waits (a ``page()`` of a client that left) loses none of them.
        """
        if self._db is None:
            return
        if self.path is None:  # in memory: no thread, no await, nothing to lose
            self._write_pending()
            return
        async with self._lock:
            rows = self._take_pending()
            if rows:
                try:
                    await trio.to_thread.run_sync(
                        lambda: self._write(rows), abandon_on_cancel=abandon_on_cancel
                    )
                except sqlite3.Error as exc:
                    log.warning("activity log: could not store %d rows: %s", len(rows), exc)

    def _take_pending(self) -> list[ActivityRow]:
        rows, self._pending = self._pending, []
        self._has_rows = trio.Event()
        self._batch_full = trio.Event()
        return rows

    def _write_pending(self) -> None:
        rows = self._take_pending()
        if rows:
            try:
                self._write(rows)
            except sqlite3.Error as exc:
                log.warning("activity log: could not store %d rows: %s", len(rows), exc)

    # -- queries ------------------------------------------------------------------------

    async def page(
        self, *, limit: int, before: int | None = None, models: Sequence[str] = ()
    ) -> ActivityPage:
        """Up to ``limit`` rows with id below ``before``, newest first, of ``models`` if any."""
        await self.flush()  # rows of requests that just finished are shown too
        rows = await self._call(lambda: self._select(limit + 1, before, models))
        more = len(rows) > limit
        rows = rows[:limit]
        captures = self.captures
        if captures is not None:
            for row in rows:
                row.has_capture = row.id in captures
        return ActivityPage(data=rows, next=rows[-1].id if more else None)

    # -- database work (on the trio thread, or a worker thread for a file) ---------------

    async def _call(self, work: Callable[[], T], *, abandon_on_cancel: bool = False) -> T:
        if self.path is None:
            return work()
        async with self._lock:
            return await trio.to_thread.run_sync(work, abandon_on_cancel=abandon_on_cancel)

    def _open(self) -> None:
        if self._db is not None:
            return
        try:
            if self.path is None:
                db = sqlite3.connect(":memory:")
            else:
                db = sqlite3.connect(os.fspath(self.path), check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
            db.executescript(_SCHEMA)
            found = {row[1] for row in db.execute("PRAGMA table_info(activity)")}
            if found >= set(_COLUMNS) - _ADDED_COLUMNS.keys():  # trio-swap's, maybe older
                for column, kind in _ADDED_COLUMNS.items():
                    if column not in found:
                        db.execute(f"ALTER TABLE activity ADD COLUMN {column} {kind}")
                        found.add(column)
        except sqlite3.Error as exc:
            raise OSError(f"cannot open the activity database {self.path}: {exc}") from exc
        missing = set(_COLUMNS) - found
        if missing:
            db.close()
            raise OSError(
                f"{self.path}: its 'activity' table is not trio-swap's "
                f"(no column {', '.join(sorted(missing))})"
            )
        self._db = db
        self._continue_ids(db)

    def _continue_ids(self, db: sqlite3.Connection) -> None:
        """Ids go on after the highest the file ever gave (rows added before: renumbered)."""
        try:  # AUTOINCREMENT's record: ids of deleted rows are never given again
            seq = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'activity'").fetchone()
        except sqlite3.Error:
            seq = None
        (top,) = db.execute("SELECT max(id) FROM activity").fetchone()
        given = max(seq[0] if seq else 0, top or 0)
        if given >= self._next_id - len(self._pending):
            self._next_id = given + 1
            for row in self._pending:
                row.id = self._next_id
                self._next_id += 1

    def _close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _write(self, rows: list[ActivityRow]) -> None:
        db = self._db
        assert db is not None
        with db:  # one transaction
            db.executemany(_INSERT, [_VALUES(row) for row in rows])
            if self.max_rows > 0:
                (last,) = db.execute("SELECT max(id) FROM activity").fetchone()
                db.execute("DELETE FROM activity WHERE id <= ?", (last - self.max_rows,))

    def _select(self, limit: int, before: int | None, models: Sequence[str]) -> list[ActivityRow]:
        db = self._db
        if db is None:
            return []
        where: list[str] = []
        params: list[object] = []
        if before is not None:
            where.append("id < ?")
            params.append(before)
        if models:
            where.append(f"model IN ({', '.join('?' * len(models))})")
            params.extend(models)
        sql = _SELECT + (f" WHERE {' AND '.join(where)}" if where else "")
        cursor = db.execute(f"{sql} ORDER BY id DESC LIMIT ?", (*params, limit))
        return [_row(values) for values in cursor]


def _row(values: tuple[object, ...]) -> ActivityRow:
    row = ActivityRow(**dict(zip(_COLUMNS, values, strict=True)))  # type: ignore[arg-type]
    row.stream = bool(row.stream)
    return row
