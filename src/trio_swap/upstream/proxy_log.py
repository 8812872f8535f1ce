"""The proxy log: trio-swap's own ``logging`` records, kept in a :class:`LogRing`.

:class:`ProxyLogCapture` puts one handler on the ``trio_swap`` logger for the
lifetime of :func:`trio_swap.server.serve`. Each record becomes a line
``2025-01-31 12:00:00 [INFO] message`` (a traceback adds more lines); with
``logTimeFormat`` the timestamp is in that Go layout instead
(:func:`proxy_formatter`; the console's lines too, set up by the CLI).

The configured ``logLevel`` decides what the proxy log keeps, whatever the
console shows: with ``logToStdout: none`` the CLI raises the root logger to
WARNING, yet ``GET /logs`` still has the INFO lines. To get there without
changing the console, the capture lowers the ``trio_swap`` logger's level
while installed, stops its propagation, and hands each record on to the
ancestors' handlers itself, only when the record would have reached them
before (same level rules as :mod:`logging`). Removing the capture restores the
logger's level and propagation.

Records logged from other threads are stored through the trio token, since
rings and their followers belong to the trio thread.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
from typing import Final, final

import trio

from trio_swap.gotime import format_time, layout_of
from trio_swap.upstream.logs import LogRing

__all__ = ["LEVELS", "LayoutFormatter", "ProxyLogCapture", "proxy_formatter"]

LOGGER_NAME: Final = "trio_swap"
#: ``logLevel`` values (config) to :mod:`logging` levels.
LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


#: Every trio-swap log line: the timestamp, the level, the message.
LINE_FORMAT: Final = "%(asctime)s [%(levelname)s] %(message)s"


@final
class LayoutFormatter(logging.Formatter):
    """:data:`LINE_FORMAT` with the timestamp in a ``logTimeFormat`` layout, or in
    ``datefmt`` (strftime) when ``time_format`` names none."""

    def __init__(self, time_format: str, datefmt: str) -> None:
        super().__init__(LINE_FORMAT, datefmt)
        self.layout = layout_of(time_format) if time_format else None

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        if self.layout is None:
            return super().formatTime(record, datefmt)
        return format_time(self.layout, record.created)


@functools.cache
def proxy_formatter(time_format: str = "") -> logging.Formatter:
    """The proxy log's formatter for a ``logTimeFormat`` name ("": the default timestamp)."""
    return LayoutFormatter(time_format, "%Y-%m-%d %H:%M:%S")


@final
class _Sink:
    def __init__(self, ring: LogRing, level: int, time_format: str) -> None:
        self.ring = ring
        self.level = level
        self.formatter = proxy_formatter(time_format)
        self.token = trio.lowlevel.current_trio_token()
        self.thread = threading.get_ident()

    def put(self, lines: list[str]) -> None:
        if threading.get_ident() == self.thread:
            self._append(lines)
        else:
            with contextlib.suppress(trio.RunFinishedError):
                self.token.run_sync_soon(self._append, lines)

    def _append(self, lines: list[str]) -> None:
        for line in lines:
            self.ring.append(line)


@final
class _Hub(logging.Handler):
    """The one handler on the ``trio_swap`` logger, shared by every installed capture."""

    def __init__(self, logger: logging.Logger) -> None:
        super().__init__(logging.NOTSET)
        self.logger = logger
        self.sinks: tuple[_Sink, ...] = ()
        # The logger's own settings before the first capture, restored after the last.
        self.saved_level = logger.level
        self.saved_propagate = logger.propagate

    def apply_level(self) -> None:
        wanted = min((sink.level for sink in self.sinks), default=self.saved_level)
        self.logger.setLevel(min(wanted, self._previous_effective_level()))

    def _previous_effective_level(self) -> int:
        """The level the ``trio_swap`` logger had (it may come from an ancestor, and change)."""
        if self.saved_level != logging.NOTSET:
            return self.saved_level
        parent = self.logger.parent
        return parent.getEffectiveLevel() if parent is not None else logging.WARNING

    def emit(self, record: logging.LogRecord) -> None:
        sinks = self.sinks
        wanted = [sink for sink in sinks if record.levelno >= sink.level]
        if wanted:
            # Each capture may have its own logTimeFormat: format once per formatter.
            formatted: dict[logging.Formatter, list[str]] = {}
            try:
                for sink in wanted:
                    lines = formatted.get(sink.formatter)
                    if lines is None:
                        lines = sink.formatter.format(record).splitlines() or [""]
                        formatted[sink.formatter] = lines
                    sink.put(lines)
            except Exception:
                self.handleError(record)
        if self.saved_propagate and self._was_enabled(record):
            self._propagate(record)

    def _was_enabled(self, record: logging.LogRecord) -> bool:
        """Would ``record`` have been logged with the ``trio_swap`` logger left alone?"""
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None and logger is not self.logger:
            if logger.level != logging.NOTSET:
                return True  # its own level let the record through, as it did before
            logger = logger.parent
        return record.levelno >= self._previous_effective_level()

    def _propagate(self, record: logging.LogRecord) -> None:
        """What :meth:`logging.Logger.callHandlers` does above the ``trio_swap`` logger."""
        found = 0
        logger = self.logger.parent
        while logger is not None:
            for handler in logger.handlers:
                found += 1
                if record.levelno >= handler.level:
                    handler.handle(record)
            if not logger.propagate:
                break
            logger = logger.parent
        last_resort = logging.lastResort
        if found == 0 and last_resort is not None and record.levelno >= last_resort.level:
            last_resort.handle(record)


_hub: _Hub | None = None


@final
class ProxyLogCapture:
    """Copies ``trio_swap`` log records at ``level`` or above into ``ring`` while installed.

    Install inside trio (the capture remembers the trio thread); several may be
    installed at once (e.g. two servers in one test process), each with its own ring.
    """

    def __init__(
        self, ring: LogRing, level: str | int = logging.INFO, *, time_format: str = ""
    ) -> None:
        self.ring = ring
        self.level = LEVELS.get(level.lower(), logging.INFO) if isinstance(level, str) else level
        #: ``logTimeFormat``: a Go layout name for the timestamps; "": the default.
        self.time_format = time_format
        self._sink: _Sink | None = None

    def install(self) -> None:
        global _hub
        if self._sink is not None:
            return
        self._sink = _Sink(self.ring, self.level, self.time_format)
        if _hub is None:
            logger = logging.getLogger(LOGGER_NAME)
            _hub = _Hub(logger)
            logger.addHandler(_hub)
            logger.propagate = False
        _hub.sinks = (*_hub.sinks, self._sink)
        _hub.apply_level()

    def remove(self) -> None:
        """Stop capturing; safe to call twice or without :meth:`install`."""
        global _hub
        sink, self._sink = self._sink, None
        if sink is None or _hub is None:
            return
        _hub.sinks = tuple(s for s in _hub.sinks if s is not sink)
        if _hub.sinks:
            _hub.apply_level()
            return
        hub, _hub = _hub, None
        hub.logger.removeHandler(hub)
        hub.logger.setLevel(hub.saved_level)
        hub.logger.propagate = hub.saved_propagate

    def __enter__(self) -> ProxyLogCapture:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()
