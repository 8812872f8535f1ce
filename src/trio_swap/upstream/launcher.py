"""Spawning upstream servers so that none can outlive trio-swap (DESIGN invariant 5).

Each child gets its own process group (so stopping it reaches its helpers and
grandchildren too), ``PR_SET_PDEATHSIG=SIGKILL`` (the kernel kills it if
trio-swap dies), and an entry in the :class:`OrphanGuard` (which kills the
whole group if trio-swap dies, SIGKILL included).

The spawn happens on the trio thread itself, not in a worker thread as
``trio.run_process`` does: the parent-death signal fires when the *thread*
that forked the child exits, so a worker thread would kill the child early.
``fork``+``exec`` takes about a millisecond, which is acceptable on the loop.
Exit is observed through a pidfd, so no thread waits either.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Final, Protocol, final

import trio

__all__ = ["Child", "ChildProcess", "Launcher", "OrphanGuard", "spawn"]

_PR_SET_PDEATHSIG: Final = 1
#: trio-swap's own line to systemd (sd_notify, watchdog): a model server that
#: inherited it could report readiness or feed the watchdog in trio-swap's name.
_SYSTEMD_VARIABLES: Final = frozenset({"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"})


class ChildProcess(Protocol):
    """What a supervisor needs of one started server: :class:`Child`, or a fake in tests."""

    pid: int
    pgid: int
    #: Set by :meth:`watch` once the process has exited and been reaped.
    exited: trio.Event

    @property
    def returncode(self) -> int | None: ...

    def output_stream(self) -> trio.abc.ReceiveStream:
        """Its merged stdout/stderr; callable once, the caller closes it."""
        ...

    async def watch(self) -> None:
        """Run once in a task: returns (and sets :attr:`exited`) when the process is gone."""
        ...

    async def wait(self) -> None:
        """Wait for exit, whether or not :meth:`watch` is running."""
        ...

    def signal_group(self, sig: int) -> bool:
        """Signal its whole process group; False if nothing was left to signal."""
        ...

    def close(self) -> None: ...


class Launcher(Protocol):
    """Starts a server process: :func:`spawn` in production, a fake in tests (the seam).

    Raises:
        OSError: the executable is missing or not runnable.
    """

    def __call__(self, argv: Sequence[str], *, env: Mapping[str, str]) -> ChildProcess: ...


def _die_with_parent(parent_pid: int) -> None:  # pragma: no cover - runs in the child
    """preexec hook: ask the kernel for SIGKILL when the spawning thread exits."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


@final
class Child:
    """One spawned upstream process: its group, its output pipe, and its exit.

    Call :meth:`watch` once in a task; every other task awaits :attr:`exited`.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self.pid: int = popen.pid
        #: The child leads its own group, so the group id is its pid.
        self.pgid: int = popen.pid
        self.exited = trio.Event()
        assert popen.stdout is not None
        self._output_fd = os.dup(popen.stdout.fileno())
        popen.stdout.close()

    @property
    def returncode(self) -> int | None:
        return self._popen.returncode

    def output_stream(self) -> trio.lowlevel.FdStream:
        """The merged stdout/stderr pipe; the caller owns (and must close) the stream."""
        fd, self._output_fd = self._output_fd, -1
        if fd < 0:
            raise RuntimeError("output stream already taken")
        return trio.lowlevel.FdStream(fd)

    async def watch(self) -> None:
        """Wait for the process to exit, reap it, and set :attr:`exited`."""
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:  # kernel without pidfd (or already reaped): poll instead
            while self._popen.poll() is None:  # noqa: ASYNC110  # no event exists to wait on
                await trio.sleep(0.02)
        else:
            try:
                await trio.lowlevel.wait_readable(pidfd)
            finally:
                os.close(pidfd)
            self._popen.wait()
        self.exited.set()

    async def wait(self) -> None:
        """Wait for exit whether or not :meth:`watch` is running (cleanup paths poll)."""
        while self._popen.poll() is None:
            with trio.move_on_after(0.02):
                await self.exited.wait()

    def signal_group(self, sig: int) -> bool:
        """Send ``sig`` to the whole process group; False if nothing was left to signal."""
        try:
            os.killpg(self.pgid, sig)
        except ProcessLookupError:
            return False
        except PermissionError:  # a group member changed uid; the leader is what counts
            if self.returncode is None:
                os.kill(self.pid, sig)
            return True
        return True

    def close(self) -> None:
        if self._output_fd >= 0:
            os.close(self._output_fd)
            self._output_fd = -1

    def __repr__(self) -> str:
        if self.returncode is None:
            return f"<Child pid={self.pid} running>"
        if self.returncode < 0:
            return f"<Child pid={self.pid} killed by signal {-self.returncode}>"
        return f"<Child pid={self.pid} exited with status {self.returncode}>"


def spawn(argv: Sequence[str], *, env: Mapping[str, str]) -> Child:
    """Start ``argv`` in a new process group with stdout and stderr merged into one pipe.

    Raises:
        OSError: the executable is missing or not runnable.
    """
    popen = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={key: value for key, value in env.items() if key not in _SYSTEMD_VARIABLES},
        process_group=0,
        preexec_fn=functools.partial(_die_with_parent, os.getpid()),
        close_fds=True,
    )
    return Child(popen)


@final
class OrphanGuard:
    """Client side of ``guard.py``: registers each upstream group with the watcher process.

    Writes are tiny and non-blocking in practice (the watcher drains its pipe
    continuously), so registering happens synchronously right after the spawn,
    leaving no await between fork and registration.
    """

    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self._popen = popen
        self._stdin: IO[bytes] | None = popen.stdin

    @classmethod
    def start(cls) -> OrphanGuard:
        script = Path(__file__).with_name("guard.py")
        popen = subprocess.Popen(
            [sys.executable, "-I", str(script)],
            stdin=subprocess.PIPE,
            process_group=0,
            close_fds=True,
        )
        return cls(popen)

    @property
    def pid(self) -> int:
        return self._popen.pid

    def _send(self, message: dict[str, object]) -> None:
        if self._stdin is None:
            return
        try:
            self._stdin.write(json.dumps(message).encode() + b"\n")
            self._stdin.flush()
        except (BrokenPipeError, ValueError):
            self._stdin = None

    def add(self, child: ChildProcess, stop_argv: Sequence[str] = ()) -> None:
        self._send({"add": child.pgid, "stop": list(stop_argv)})

    def remove(self, child: ChildProcess) -> None:
        self._send({"del": child.pgid})

    async def aclose(self) -> None:
        """Close the pipe (the guard cleans up whatever is still registered) and reap it."""
        if self._stdin is not None:
            stdin, self._stdin = self._stdin, None
            with contextlib.suppress(BrokenPipeError):
                stdin.close()
        with trio.move_on_after(5):
            while self._popen.poll() is None:  # noqa: ASYNC110  # exits in ms; no pidfd needed
                await trio.sleep(0.02)
        if self._popen.poll() is None:
            self._popen.kill()
            self._popen.wait()
