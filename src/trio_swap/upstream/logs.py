"""Bounded, line-oriented log history with live followers.

A running trio-swap keeps three kinds of :class:`LogRing`, gathered in a
:class:`LogBook`:

* **per model**: what the model's process printed (stdout and stderr), fed by
  the process's output pump;
* **upstream**: every model's lines together, each prefixed ``[model-id] ``;
* **proxy**: trio-swap's own log records (see :mod:`trio_swap.upstream.proxy_log`).

Readers take a tail (error messages quote why a model failed), a copy (``GET
/logs``), or follow the ring live (``GET /logs/stream...``) through a
:class:`Follower`. Memory stays bounded however chatty a server is, and
followers can never slow the writer: :meth:`LogRing.append` hands each line to
each follower with a non-blocking send into a bounded buffer, and a follower
whose buffer is full misses the line (and later reads one ``[trio-swap: N lines
dropped]`` marker where the gap is).

Every stored line carries a process-wide sequence number, so the histories of
different rings can be merged back into the order the lines were written.
"""

from __future__ import annotations

import heapq
import itertools
import sys
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Final, final

import trio

__all__ = [
    "DEFAULT_MAX_LINES",
    "MAX_LINE_CHARS",
    "SUBSCRIBER_BUFFER",
    "Follower",
    "LogBook",
    "LogRing",
    "dropped_marker",
    "follow",
]

DEFAULT_MAX_LINES: Final = 2000
#: A single line longer than this is cut, so one binary blob cannot fill the ring.
MAX_LINE_CHARS: Final = 4096
#: Lines a follower may fall behind before it starts missing lines. Read at
#: subscription time (tests lower it).
SUBSCRIBER_BUFFER = 1000
#: Most lines :meth:`Follower.receive_batch` returns at once.
DEFAULT_BATCH: Final = 512

#: Process-wide order of stored lines, shared by every ring.
_sequence = itertools.count()


def dropped_marker(count: int) -> str:
    """The line a follower reads where it missed ``count`` lines."""
    return f"[trio-swap: {count} lines dropped]"


@final
class Follower:
    """A live reader of one or more rings: a bounded buffer the rings push lines into.

    Created by :func:`follow` or :meth:`LogRing.subscribe`, which also detach it.
    """

    def __init__(self, buffer: int) -> None:
        self._send, self._receive = trio.open_memory_channel[str](max(1, buffer))
        #: Lines missed since the last marker was queued (the gap not yet reported).
        self._missed = 0
        self._ended = False
        #: Lines this follower missed in total.
        self.dropped = 0

    def offer(self, line: str) -> bool:
        """Queue ``line`` if there is room; never blocks. False if it was dropped (no room)."""
        if self._missed:
            # Report the gap before the next line, if the reader made room for both.
            try:
                self._send.send_nowait(dropped_marker(self._missed))
            except trio.WouldBlock:
                self._missed += 1
                self.dropped += 1
                return False
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                return True  # ended: nothing more to deliver, nothing dropped
            self._missed = 0
        try:
            self._send.send_nowait(line)
        except trio.WouldBlock:
            self._missed += 1
            self.dropped += 1
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        return True

    def end(self) -> None:
        """No more lines will come: the reader gets what is queued, then the end."""
        self._send.close()

    def _drain(self, limit: int) -> list[str]:
        lines: list[str] = []
        while len(lines) < limit:
            try:
                lines.append(self._receive.receive_nowait())
            except trio.WouldBlock:
                break
            except (trio.EndOfChannel, trio.ClosedResourceError):
                self._ended = True
                break
        else:
            return lines  # more queued: the gap (if any) comes after them
        if self._missed:
            # Everything queued is read, so the missed lines come next.
            lines.append(dropped_marker(self._missed))
            self._missed = 0
        return lines

    async def receive_batch(self, limit: int = DEFAULT_BATCH) -> list[str]:
        """Wait for at least one line; return every queued line (up to ``limit``).

        An empty list means the follower was ended (trio-swap is shutting down).
        """
        lines = self._drain(limit)
        if lines or self._ended:
            return lines
        try:
            first = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError):
            self._ended = True
            return []
        return [first, *self._drain(limit - 1)]

    def _close(self) -> None:
        self._send.close()
        self._receive.close()


@final
class LogRing:
    """The last ``max_lines`` lines of one log, optionally echoed to stdout, with followers.

    A model's ring given an ``upstream`` ring also copies each line there,
    prefixed with ``[name] ``.
    """

    def __init__(
        self,
        name: str,
        *,
        max_lines: int = DEFAULT_MAX_LINES,
        echo: bool = False,
        upstream: LogRing | None = None,
    ) -> None:
        self.name = name
        self.echo = echo
        self._upstream = upstream
        self._entries: deque[tuple[int, str]] = deque(maxlen=max_lines)
        self._partial = b""
        self._followers: dict[Follower, None] = {}
        self._ended = False
        #: Lines followers of this ring missed because they read too slowly (all followers).
        self.dropped = 0

    @property
    def max_lines(self) -> int:
        return self._entries.maxlen or 0

    def feed(self, data: bytes) -> None:
        """Add raw output; complete lines are stored, a trailing fragment waits for more."""
        data = self._partial + data
        *complete, self._partial = data.split(b"\n")
        for raw in complete:
            self.append(raw.rstrip(b"\r").decode("utf-8", "replace"))
        if len(self._partial) > MAX_LINE_CHARS:
            self.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""

    def flush(self) -> None:
        """Store a trailing line that had no newline (the process has exited)."""
        if self._partial:
            self.append(self._partial.decode("utf-8", "replace"))
            self._partial = b""

    def append(self, line: str) -> None:
        """Store one line (cut at :data:`MAX_LINE_CHARS`) and pass it to every follower."""
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + "…"
        self._store(line)
        if self.echo:
            sys.stdout.write(f"[{self.name}] {line}\n")
            sys.stdout.flush()
        if self._upstream is not None:
            self._upstream._store(f"[{self.name}] {line}")

    def _store(self, line: str) -> None:
        self._entries.append((next(_sequence), line))
        for follower in self._followers:
            if not follower.offer(line):
                self.dropped += 1

    def tail(self, count: int) -> list[str]:
        """The last ``count`` lines, oldest first."""
        if count <= 0:
            return []
        return [line for _, line in list(self._entries)[-count:]]

    def tail_since(self, sequence: int, count: int) -> list[str]:
        """The last ``count`` lines stored after ``sequence`` (:meth:`last_sequence` earlier)."""
        newer = [line for seq, line in self._entries if seq > sequence]
        return newer[-count:] if count > 0 else []

    def last_sequence(self) -> int:
        """The sequence of the newest line (-1 when empty): a mark for :meth:`tail_since`."""
        return self._entries[-1][0] if self._entries else -1

    def lines(self) -> list[str]:
        return [line for _, line in self._entries]

    def entries(self) -> list[tuple[int, str]]:
        """``(sequence, line)`` pairs, oldest first; sequences order lines across rings."""
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    # Followers

    @property
    def subscriber_count(self) -> int:
        return len(self._followers)

    def attach(self, follower: Follower) -> None:
        if self._ended:
            follower.end()
        else:
            self._followers[follower] = None

    def detach(self, follower: Follower) -> None:
        self._followers.pop(follower, None)

    def end_followers(self) -> None:
        """End every follower (they read what is queued, then stop); later ones end at once."""
        self._ended = True
        for follower in self._followers:
            follower.end()

    def subscribe(self, buffer: int | None = None) -> AbstractContextManager[Follower]:
        """Follow this ring: ``with ring.subscribe() as follower: ...``; see :func:`follow`."""
        return follow([self], buffer=buffer)


@contextmanager
def follow(rings: Iterable[LogRing], *, buffer: int | None = None) -> Iterator[Follower]:
    """Follow several rings with one buffer (lines arrive in the order they were stored).

    Subscribing takes no time, so a history snapshot taken right after (with no
    ``await`` in between) joins the live lines without a gap or a repeat. On
    exit the follower is detached from every ring. ``buffer`` defaults to
    :data:`SUBSCRIBER_BUFFER` lines.
    """
    follower = Follower(SUBSCRIBER_BUFFER if buffer is None else buffer)
    attached: list[LogRing] = []
    try:
        for ring in rings:
            ring.attach(follower)
            attached.append(ring)
        yield follower
    finally:
        for ring in attached:
            ring.detach(follower)
        follower._close()


@final
class LogBook:
    """The proxy, upstream and per-model rings of one trio-swap instance."""

    def __init__(self, *, max_lines: int = DEFAULT_MAX_LINES) -> None:
        self._max_lines = max_lines
        self.proxy = LogRing("proxy", max_lines=max_lines)
        self.upstream = LogRing("upstream", max_lines=max_lines)
        self.models: dict[str, LogRing] = {}

    def add_model(self, model_id: str, *, echo: bool = False) -> LogRing:
        """The ring of ``model_id``'s process output (also copied to the upstream ring)."""
        ring = LogRing(model_id, max_lines=self._max_lines, echo=echo, upstream=self.upstream)
        self.models[model_id] = ring
        return ring

    def rings(self) -> list[LogRing]:
        return [self.proxy, self.upstream, *self.models.values()]

    def history(self) -> list[str]:
        """Proxy and upstream history merged in the order the lines were written."""
        merged = heapq.merge(self.proxy.entries(), self.upstream.entries())
        return [line for _, line in merged]

    @property
    def subscriber_count(self) -> int:
        """Live followers of any ring (one following several rings counts once)."""
        followers: set[Follower] = set()
        for ring in self.rings():
            followers.update(ring._followers)
        return len(followers)

    def end_followers(self) -> None:
        """Shutdown: end every live stream so HTTP can drain; later followers end at once."""
        for ring in self.rings():
            ring.end_followers()
