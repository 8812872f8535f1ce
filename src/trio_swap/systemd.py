"""Telling systemd how trio-swap is doing: sd_notify readiness, status and watchdog.

The protocol is small enough to speak directly (no systemd library): one
datagram of ``KEY=VALUE`` lines to the AF_UNIX socket named by
``$NOTIFY_SOCKET`` (a path, or ``@name`` for the abstract namespace). When the
variable is unset (not under systemd, or ``Type=simple``) every method is a
no-op, and a socket that is missing or broken is logged once at debug and
otherwise ignored: telling systemd is never a reason for trio-swap to fail.

The watchdog is fed by the router task itself (:class:`Watchdog`): a timer
asks the router for a tick and the keep-alive goes out only when the router
handles it, so a router that stops taking events stops the pings and systemd
restarts the service after ``WatchdogSec``.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Final, final

import trio

from trio_swap.upstream.process import ProcessState

__all__ = ["Notifier", "Watchdog", "status_line"]

log = logging.getLogger("trio_swap.systemd")

#: How often the STATUS= line is recomputed; it is only sent when it changed.
STATUS_INTERVAL: Final = 1.0


def _address(value: str) -> str | None:
    """``$NOTIFY_SOCKET`` as a socket address: ``@name`` is the abstract namespace."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None  # vsock: and other forms: not spoken here


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` (as sd_watchdog_enabled advises), if the watchdog is ours."""
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None  # meant for another process (we were started by a wrapper)
    try:
        usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec / 2 / 1_000_000 if usec > 0 else None


@final
class Notifier:
    """sd_notify over ``$NOTIFY_SOCKET``; every method is a no-op when there is none."""

    def __init__(
        self, notify_socket: str | None, *, watchdog_interval: float | None = None
    ) -> None:
        """``notify_socket`` as in ``$NOTIFY_SOCKET``; None (or unusable) gives a no-op notifier."""
        address = _address(notify_socket or "")
        self._address = address
        self._socket: socket.socket | None = None
        self._complained = False
        self._status: str | None = None
        if address is not None:
            try:
                self._socket = socket.socket(
                    socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
                )
            except OSError as exc:
                self._complain(exc)
        #: Seconds between WATCHDOG=1 keep-alives, or None when systemd set no watchdog.
        self.watchdog_interval = watchdog_interval if self._socket is not None else None

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(env.get("NOTIFY_SOCKET"), watchdog_interval=_watchdog_interval(env))

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines in one datagram; False if it could not be delivered."""
        if self._socket is None or self._address is None:
            return False
        try:
            self._socket.sendto("\n".join(assignments).encode(), self._address)
        except OSError as exc:  # gone, refused, or systemd's queue full: never our problem
            self._complain(exc)
            return False
        return True

    def ready(self, status: str | None = None) -> None:
        """Startup (or a reload) is complete: ``READY=1``."""
        self.send("READY=1", *self._status_assignment(status))

    def reloading(self, status: str = "reloading the configuration") -> None:
        """A reload begins; end it with :meth:`ready`. notify-reload wants the MONOTONIC_USEC."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self.send("RELOADING=1", f"MONOTONIC_USEC={usec}", *self._status_assignment(status))

    def stopping(self, status: str | None = None) -> None:
        """Graceful shutdown begins: ``STOPPING=1``."""
        self.send("STOPPING=1", *self._status_assignment(status))

    def status(self, text: str) -> None:
        """The one-line ``STATUS=`` that ``systemctl status`` shows; sent only when it changed."""
        if text != self._status:
            self.send(*self._status_assignment(text))

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")

    async def publish_status(self, describe: Callable[[], str]) -> None:
        """Recompute the status every :data:`STATUS_INTERVAL`: cheap, and silent if unchanged."""
        if not self.enabled:
            return
        while True:
            self.status(describe())
            await trio.sleep(STATUS_INTERVAL)

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _status_assignment(self, text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        self._status = text
        return (f"STATUS={text.replace(chr(10), ' ')}",)

    def _complain(self, exc: OSError) -> None:
        if not self._complained:
            self._complained = True
            log.debug("cannot notify systemd at $NOTIFY_SOCKET (%s); carrying on without", exc)


@final
class Watchdog:
    """``WATCHDOG=1`` keep-alives that prove the router task still takes events.

    :meth:`run` asks the router for a tick every interval; the router calls
    :meth:`on_tick` when it handles that tick, and only then does the ping go
    out. At most one tick is in flight, so a router that was stuck for a while
    does not flush a burst of stale pings when it recovers. The same ticks are
    the liveness probe's signal (:mod:`trio_swap.http.probes`): one heartbeat.
    """

    def __init__(self, notifier: Notifier, *, interval: float | None = None) -> None:
        """``interval``: ask for ticks this often even without systemd's watchdog, for the
        liveness probe (``/livez`` reads :attr:`last_handled`); systemd's interval wins."""
        self._notifier = notifier
        self._pending = False
        #: Intervals in a row the router has left its tick unanswered (0 when healthy).
        self.missed = 0
        #: Seconds between ticks (half of ``WatchdogSec``), or None: no ticks at all.
        self.interval = notifier.watchdog_interval or interval
        #: ``trio.current_time()`` when the router last handled a tick (None: not yet).
        self.last_handled: float | None = None

    @property
    def bound(self) -> float | None:
        """How long a tick may wait before the router counts as wedged: ``WatchdogSec``."""
        return None if self.interval is None else 2 * self.interval

    def on_tick(self) -> None:
        """Runs in the router task, between two events."""
        self._pending = False
        self.last_handled = trio.current_time()
        self._notifier.watchdog()

    async def run(self, tick: Callable[[], None]) -> None:
        """Forever: ask for a tick (``tick`` puts it in the router's channel), wait an interval."""
        interval = self.interval
        if interval is None:
            return
        while True:
            if not self._pending:
                if self.missed:
                    log.warning("router is taking events again; watchdog pings resume")
                self.missed = 0
                self._pending = True
                tick()
            else:
                self.missed += 1
                if self.missed == 1:
                    log.warning(
                        "router has not handled an event for %gs: no watchdog ping; "
                        "it counts as wedged (systemd's watchdog, /livez) after %gs",
                        interval,
                        interval * 2,
                    )
            await trio.sleep(interval)


def status_line(binds: Sequence[str], states: Mapping[str, ProcessState], *, stopping: bool) -> str:
    """``serving on 127.0.0.1:8080; running: qwen (ready), coder (starting)``.

    ``binds``: the listening URLs; ``states``: each model's process state, in
    the order to name them; ``stopping``: a graceful shutdown has begun.
    """
    where = ", ".join(bind.removeprefix("http://") for bind in binds)
    head = "shutting down" if stopping else f"serving on {where}"
    running = [
        f"{name} ({state.value})"
        for name, state in states.items()
        if state is not ProcessState.STOPPED
    ]
    return f"{head}; running: {', '.join(running)}" if running else f"{head}; no model running"
