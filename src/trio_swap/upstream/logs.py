"""Bounded, line-oriented log history for one model's process output.

The pump task appends lines as the child writes them; readers take a tail
(for error messages quoting why a model failed) or a copy (for ``/logs``).
Memory stays bounded however chatty a server is.
"""

from __future__ import annotations

import sys
from collections import deque
from typing import Final, final

__all__ = ["LogRing"]

DEFAULT_MAX_LINES: Final = 2000
#: A single line longer than this is cut, so one binary blob cannot fill the ring.
MAX_LINE_CHARS: Final = 4096


@final
class LogRing:
    """The last ``max_lines`` lines a process printed, optionally echoed to stdout."""

    def __init__(self, name: str, *, max_lines: int = DEFAULT_MAX_LINES, echo: bool = False):
        self.name = name
        self.echo = echo
        self._lines: deque[str] = deque(maxlen=max_lines)
        self._partial = b""

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
        if len(line) > MAX_LINE_CHARS:
            line = line[:MAX_LINE_CHARS] + "…"
        self._lines.append(line)
        if self.echo:
            sys.stdout.write(f"[{self.name}] {line}\n")
            sys.stdout.flush()

    def tail(self, count: int) -> list[str]:
        """The last ``count`` lines, oldest first."""
        if count <= 0:
            return []
        return list(self._lines)[-count:]

    def lines(self) -> list[str]:
        return list(self._lines)

    def __len__(self) -> int:
        return len(self._lines)
