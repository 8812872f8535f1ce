"""Reaping orphans when trio-swap is PID 1 (a container) or a child subreaper.

A model server's own children (a launcher script's server, a daemonising
helper) can outlive their parent. The kernel then reparents them to the
nearest subreaper, or to PID 1 of the PID namespace: in a container, that is
trio-swap. When such an orphan exits it stays a zombie until its new parent
waits for it; nothing in trio-swap would, so zombies would pile up in the
process table. ``tini`` or ``docker run --init`` exist for this; trio-swap
does the job itself (docs/kubernetes.md, "Container").

The difficulty is not to steal an exit status. trio-swap waits for the
processes it supervises by pid (``subprocess.Popen``: a pidfd, then
``waitpid(pid)``); a blanket ``waitpid(-1)`` would sometimes reap one of them
first, and its supervisor would see exit status 0 (``ECHILD``) for a server
that crashed. So :class:`OrphanReaper`:

1. peeks (``waitid(P_ALL, WEXITED | WNOHANG | WNOWAIT)``: nothing is reaped)
   to learn whether any child is a zombie at all: one system call per sweep;
2. if so, lists its zombie children from ``/proc`` (state ``Z``, parent us);
3. reaps, by pid, only a zombie seen on two sweeps in a row (a process just
   spawned by another thread has its pid recorded by then) that belongs to
   no ``subprocess.Popen`` still waiting for its status. Every process
   trio-swap (or a library in it) starts is a ``Popen``, so the check is the
   exact set of supervised pids, whoever spawned them. It walks the heap
   (``gc.get_objects()``, tens of ms), once per zombie: the verdict is kept
   while the zombie lasts, and a zombie's pid cannot be reused.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import subprocess
from collections.abc import Callable, Set
from typing import Final, final

import trio

__all__ = [
    "REAP_INTERVAL",
    "OrphanReaper",
    "become_child_subreaper",
    "is_child_subreaper",
    "popen_pids",
    "should_reap",
]

log = logging.getLogger("trio_swap.reaper")

#: Seconds between sweeps: an orphan's zombie lasts at most about two of them.
REAP_INTERVAL: Final = 1.0

_PR_SET_CHILD_SUBREAPER: Final = 36
_PR_GET_CHILD_SUBREAPER: Final = 37


def _prctl(option: int, arg: int | ctypes.c_int | ctypes._Pointer[ctypes.c_int]) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, arg, 0, 0, 0) == 0)
    except (OSError, AttributeError):  # not Linux, or no libc symbol
        return False


def is_child_subreaper() -> bool:
    """Whether orphaned descendants are reparented to this process (``PR_GET_CHILD_SUBREAPER``)."""
    flag = ctypes.c_int(0)
    return _prctl(_PR_GET_CHILD_SUBREAPER, ctypes.pointer(flag)) and flag.value != 0


def become_child_subreaper() -> bool:
    """``PR_SET_CHILD_SUBREAPER``: orphaned descendants come to us, not to PID 1."""
    return _prctl(_PR_SET_CHILD_SUBREAPER, 1)


def should_reap() -> bool:
    """Whether orphans end up here: PID 1 of a PID namespace, or a subreaper."""
    return os.getpid() == 1 or is_child_subreaper()


def popen_pids() -> Set[int]:
    """The pids some ``subprocess.Popen`` of this process still has to wait for."""
    return frozenset(
        obj.pid
        for obj in gc.get_objects()
        if isinstance(obj, subprocess.Popen) and obj.returncode is None
    )


def _any_zombie_child() -> bool:
    """Whether a child has exited and waits to be reaped (peeks: reaps nothing)."""
    try:
        found = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:  # no children at all
        return False
    return found is not None


def zombie_children(parent: int | None = None) -> set[int]:
    """The pids of ``parent``'s (default: our) children that are zombies, from ``/proc``."""
    parent = os.getpid() if parent is None else parent
    zombies: set[int] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rsplit(b") ", 1)[1].split()
        except (OSError, IndexError):  # gone meanwhile, or unreadable
            continue
        if fields[0] == b"Z" and int(fields[1]) == parent:
            zombies.add(int(entry))
    return zombies


@final
class OrphanReaper:
    """Reaps the zombies of processes trio-swap inherited, never those it supervises."""

    def __init__(
        self,
        *,
        interval: float = REAP_INTERVAL,
        supervised: Callable[[], Set[int]] = popen_pids,
    ) -> None:
        """``supervised``: the pids someone else waits for (a fake in tests)."""
        self._interval = interval
        self._supervised = supervised
        #: Zombies at the last sweep: one is reaped only once seen twice.
        self._seen: set[int] = set()
        #: Zombies found to be supervised: left to their owner while they last.
        self._theirs: set[int] = set()
        #: Orphans reaped so far.
        self.reaped = 0

    def sweep(self) -> list[tuple[int, int]]:
        """One pass: reap the orphans' zombies; ``(pid, exit code)`` of each reaped."""
        zombies = zombie_children() if _any_zombie_child() else set()
        candidates = (zombies & self._seen) - self._theirs
        self._seen = zombies
        self._theirs &= zombies
        if not candidates:
            return []
        supervised = self._supervised()
        self._theirs |= candidates & supervised
        reaped: list[tuple[int, int]] = []
        for pid in sorted(candidates - supervised):
            with contextlib.suppress(ChildProcessError):  # reaped by someone after all
                done, status = os.waitpid(pid, os.WNOHANG)
                if done == pid:
                    code = os.waitstatus_to_exitcode(status)
                    reaped.append((pid, code))
                    log.debug("reaped orphaned process %d (exit code %d)", pid, code)
        self.reaped += len(reaped)
        return reaped

    async def run(self) -> None:
        """Sweep every interval, forever."""
        while True:
            self.sweep()
            await trio.sleep(self._interval)
