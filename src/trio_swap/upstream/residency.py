"""The size and page-cache residency of every model file, for the model rows.

``GET /api/models`` (and the web UI's feed, every second) shows each file's
``resident_bytes``. Measuring it runs ``mincore`` over the whole file (about
20 ms per GB on the development box), which must not happen on the event loop
nor once per poll, so the rows read the last measurement kept here, and
:meth:`FileResidency.run` refreshes it in a worker thread every
:data:`REFRESH_SECONDS` while someone reads it (and not at all when nobody
has looked for :data:`IDLE_AFTER` seconds). A row's numbers are therefore up to
one refresh old.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from typing import Final, NamedTuple, final

import trio

from trio_swap.upstream.pagecache import file_size, resident_bytes

__all__ = ["IDLE_AFTER", "REFRESH_SECONDS", "FileResidency", "Measured"]

#: Seconds between two measurements while the rows are being read.
REFRESH_SECONDS: Final = 2.0
#: Stop measuring when nobody read a row for this long.
IDLE_AFTER: Final = 30.0


class Measured(NamedTuple):
    """One file, as last measured: ``size`` None when it is missing or not a regular file."""

    size: int | None
    resident: int


def measure(paths: Iterable[str]) -> dict[str, Measured]:
    """Size and resident bytes of each path (synchronous: call it in a worker thread)."""
    result: dict[str, Measured] = {}
    for path in paths:
        size = file_size(path)
        result[path] = Measured(size, resident_bytes(path) if size else 0)
    return result


@final
class FileResidency:
    """The last measurement of every model file; ``paths`` says which files there are now."""

    def __init__(
        self,
        paths: Callable[[], Iterable[str]],
        *,
        refresh: float = REFRESH_SECONDS,
        idle_after: float = IDLE_AFTER,
    ) -> None:
        self._paths = paths
        self._refresh = refresh
        self._idle_after = idle_after
        self._known: dict[str, Measured] = {}
        self._last_read = -math.inf
        self._wanted = trio.Event()

    def get(self, path: str) -> Measured | None:
        """The last measurement of ``path``; None before the first one.

        Reading wakes the refresher when it was idle.
        """
        with contextlib.suppress(RuntimeError):  # outside trio: a plain test
            self._last_read = trio.current_time()
        self._wanted.set()
        return self._known.get(path)

    def update(self, measured: dict[str, Measured]) -> None:
        """Newer numbers from someone who measured anyway (the prefetcher)."""
        self._known.update(measured)

    async def refresh(self) -> None:
        """Measure every current file now (in a worker thread)."""
        paths = list(dict.fromkeys(self._paths()))
        # Abandoned on cancel: a stat stuck on a network file system must not hold up
        # shutdown, and measure() only returns numbers.
        measured = await trio.to_thread.run_sync(measure, paths, abandon_on_cancel=True)
        self._known = {path: measured[path] for path in paths}

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Refresh every ``refresh`` seconds while the rows are read; until cancelled."""
        task_status.started()
        while True:
            await self._wanted.wait()
            await self.refresh()
            await trio.sleep(self._refresh)
            if trio.current_time() - self._last_read > self._idle_after:
                self._wanted = trio.Event()  # nobody looks: wait for the next reader
