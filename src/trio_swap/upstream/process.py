"""One supervised upstream server per model.

:class:`ModelProcess` is the only writer of its process state. Other tasks
talk to it with messages (:meth:`ModelProcess.ensure_ready`,
:meth:`ModelProcess.stop`) that it handles in its own task, deciding from its
*current* state, never from a snapshot the caller took earlier (llama-swap
issue #946 was a hang caused by exactly that).

State transitions (the ``_handle`` and ``_run_once`` code marks them)::

    STOPPED  --ensure_ready-->  STARTING  --health 200-->  READY
    STARTING --exit/timeout-->  STOPPED   (waiters get ModelStartFailed with the log tail)
    STARTING --stop-->          STOPPING  (waiters get ModelStartFailed "stopped while starting")
    READY    --stop-->          STOPPING  --exit-->  STOPPED
    READY    --exit-->          STOPPING at once, then STOPPED (a crash; no restart)

Every return to STOPPED from a process that was ready is reported through
``on_stopped``, whatever caused it: the router uses it to correct its own view
when a stop it did not order (a crash), or one that raced a swap, took the
model down.
    STOPPING --ensure_ready-->  STOPPING, then STARTING once the old process is gone

A config reload sends :meth:`ModelProcess.reconfigure`: settings that leave
the server process as it is (see :func:`~trio_swap.config.diff.same_process`)
apply at once; others wait until the process is STOPPED, so a running server
never has its ``cmdStop`` or health URL changed under it, and every start after
the message runs the new settings. :meth:`ModelProcess.close` ends a
supervisor whose model left the config.

Stopping is ``cmdStop`` (if configured) or SIGTERM to the process group, then
SIGKILL to the group after the grace period. Whatever ends the supervisor,
cancellation included, the group is stopped before the exception propagates.
"""

from __future__ import annotations

import enum
import logging
import math
import os
import signal
from collections.abc import Callable
from typing import Final, final

import httpx
import msgspec
import trio

from trio_swap._sync import Reply, race
from trio_swap.config.address import Upstream
from trio_swap.config.diff import same_process
from trio_swap.config.model import PID_PLACEHOLDER, ModelConfig
from trio_swap.errors import ModelStartFailed
from trio_swap.observe.hooks import ProcessHooks
from trio_swap.upstream.launcher import Child, OrphanGuard, spawn
from trio_swap.upstream.logs import LogRing

__all__ = ["ModelProcess", "ProcessState"]

log = logging.getLogger("trio_swap.upstream")

#: Time between readiness probes. Small, so readiness is noticed within ~10 ms
#: of the server answering (llama-swap waits 250 ms, then polls every second).
PROBE_INTERVAL: Final = 0.01
#: After this many seconds of loading, probe less often: a model that takes
#: minutes to load should not fill its log with thousands of health requests.
FAST_PROBE_PERIOD: Final = 5.0
SLOW_PROBE_INTERVAL: Final = 0.025
#: Longest a single readiness probe may hang before it counts as "not ready".
PROBE_TIMEOUT: Final = 5.0
#: Grace period when a start is abandoned because the health check gave up.
ABANDON_GRACE: Final = 5.0
#: Grace period when trio-swap itself is cancelled with the process still running.
CANCEL_GRACE: Final = 2.0
#: Longest wait for a SIGKILLed process to disappear (uninterruptible sleep can delay it).
KILL_WAIT: Final = 10.0
#: How many output lines an error message quotes.
ERROR_TAIL_LINES: Final = 10


class ProcessState(enum.Enum):
    STOPPED = "stopped"  # no child process
    STARTING = "starting"  # spawned; readiness check running
    READY = "ready"  # health check passed; requests may be forwarded
    STOPPING = "stopping"  # graceful stop sent; SIGKILL follows after the grace period


class _EnsureReady(msgspec.Struct, frozen=True):
    reply: Reply[None]


class _Stop(msgspec.Struct, frozen=True):
    grace: float
    reason: str
    reply: Reply[None]


class _Reconfigure(msgspec.Struct, frozen=True):
    model: ModelConfig
    health_check_timeout: float


_Command = _EnsureReady | _Stop | _Reconfigure


@final
class ModelProcess:
    """Supervises the server process of one model for as long as trio-swap runs."""

    def __init__(
        self,
        model: ModelConfig,
        *,
        health_check_timeout: float,
        http: httpx.AsyncClient,
        log_ring: LogRing | None = None,
        guard: OrphanGuard | None = None,
        on_stopped: Callable[[str], None] | None = None,
        hooks: ProcessHooks | None = None,
    ) -> None:
        self.model = model
        self._upstream: Upstream | None = None
        self.health_check_timeout = health_check_timeout
        self.log = log_ring if log_ring is not None else LogRing(model.id)
        self._http = http
        self._guard = guard
        self._on_stopped = on_stopped
        #: Told of loads, failed starts, stops and crashes (the metrics).
        self._hooks = hooks if hooks is not None else ProcessHooks()
        self._send, self._inbox = trio.open_memory_channel[_Command](math.inf)
        self._nursery: trio.Nursery | None = None

        self.state = ProcessState.STOPPED
        self.child: Child | None = None
        #: How many times a process was spawned for this model.
        self.start_count = 0
        #: Seconds from spawn to the first passing health check, for the last start.
        self.last_ready_seconds: float | None = None
        # Invariant: non-empty only while STARTING or STOPPING (then a restart follows).
        self._ready_waiters: list[Reply[None]] = []
        # Invariant: non-empty only while STOPPING.
        self._stop_waiters: list[Reply[None]] = []
        self._stop_requested = trio.Event()
        self._stop_grace = model.unload_timeout
        self._stop_reason = ""
        self._life_running = False
        #: Whether the current (or last) process reached READY.
        self._was_ready = False
        #: Settings from a reload that wait for the running process to stop.
        self._next_model: ModelConfig | None = None

    def __repr__(self) -> str:
        pid = f" pid={self.child.pid}" if self.child else ""
        return f"<ModelProcess {self.model.id}: {self.state.value}{pid}>"

    @property
    def upstream(self) -> Upstream:
        """Where the current (or next) process listens: ``model.proxy``, parsed."""
        if self._upstream is None or self._upstream.url != self.model.proxy:
            self._upstream = Upstream(self.model.proxy)
        return self._upstream

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child is not None else None

    # -- messages (any task) -------------------------------------------------

    async def ensure_ready(self) -> None:
        """Start the server if needed and wait until it is ready.

        Raises:
            ModelStartFailed: it exited, timed out, could not spawn, or was stopped meanwhile.
        """
        reply: Reply[None] = Reply()
        self._send.send_nowait(_EnsureReady(reply))
        await reply.wait()

    async def stop(self, *, grace: float | None = None, reason: str = "stop requested") -> None:
        """Stop the server (a no-op when stopped) and wait until its process group is gone."""
        reply: Reply[None] = Reply()
        self._send.send_nowait(
            _Stop(self.model.unload_timeout if grace is None else grace, reason, reply)
        )
        await reply.wait()

    def reconfigure(self, model: ModelConfig, *, health_check_timeout: float) -> None:
        """A reload's settings for this model: used from the next start on. Never blocks.

        The running process (if any) is left alone; stopping it is the router's call.
        """
        self._send.send_nowait(_Reconfigure(model, health_check_timeout))

    def close(self) -> None:
        """The model left the config: :meth:`run` returns once its messages are
        handled and no process is left (one still running is stopped, with its
        ``unloadTimeout`` as the grace period). No message may be sent after this."""
        self._send.close()

    # -- the supervisor task -------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Handle messages until cancelled; cancelling stops the process group first."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            async for command in self._inbox:
                self._handle(command)
            # Closed (the model left the config): never leave a process behind,
            # whatever the last messages asked for (invariant: no orphaned process).
            if self.state is not ProcessState.STOPPED:
                self._handle(_Stop(self.model.unload_timeout, "left the config", Reply()))

    def _handle(self, command: _Command) -> None:
        match command:
            case _EnsureReady(reply=reply):
                if self.state is ProcessState.READY:
                    reply.set(None)
                    return
                self._ready_waiters.append(reply)
                if self.state is ProcessState.STOPPED:  # STOPPED -> STARTING
                    self._begin_life()
                # STARTING: answered when ready; STOPPING: the life task restarts after the stop.
            case _Stop(grace=grace, reason=reason, reply=reply):
                if self.state is ProcessState.STOPPED:
                    reply.set(None)
                    return
                self._stop_waiters.append(reply)
                self._fail_ready_waiters(f"stopped while starting ({reason})")
                if self.state in (ProcessState.STARTING, ProcessState.READY):  # -> STOPPING
                    self._hooks.stopping(self.model.id, reason)
                    self.state = ProcessState.STOPPING
                    self._stop_grace = grace
                    self._stop_reason = reason
                    self._stop_requested.set()
            case _Reconfigure(model=model, health_check_timeout=timeout):
                self.health_check_timeout = timeout  # read when a start begins
                if self.state is ProcessState.STOPPED or same_process(self.model, model):
                    self.model = model
                    self._next_model = None
                else:  # applied once the running process is gone (in _life)
                    self._next_model = model

    def _begin_life(self) -> None:
        assert self._nursery is not None, "run() must be started first"
        self.state = ProcessState.STARTING
        self._stop_requested = trio.Event()
        if not self._life_running:
            self._life_running = True
            self._nursery.start_soon(self._life)

    async def _life(self) -> None:
        try:
            while True:
                await self._run_once()
                self.state = ProcessState.STOPPED
                if self._next_model is not None:  # a reload's settings, for the next start
                    self.model, self._next_model = self._next_model, None
                if self._was_ready and self._on_stopped is not None:
                    self._on_stopped(self.model.id)
                for reply in self._stop_waiters:
                    reply.set(None)
                self._stop_waiters.clear()
                if not self._ready_waiters:
                    return
                # Someone asked for the model while it was stopping: start it again.
                self.state = ProcessState.STARTING
                self._stop_requested = trio.Event()
        finally:
            self._life_running = False

    def _fail_ready_waiters(self, reason: str, tail: list[str] | None = None) -> None:
        error = ModelStartFailed(self.model.id, reason, tail or [])
        for reply in self._ready_waiters:
            reply.fail(error)
        self._ready_waiters.clear()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.model.env)
        return env

    async def _run_once(self) -> None:
        """Spawn the server, supervise it until it is gone, and leave no process behind."""
        self._was_ready = False
        if self._stop_requested.is_set():  # stopped before it was even spawned
            return
        self.start_count += 1
        started = trio.current_time()
        argv = self.model.cmd
        try:
            child = spawn(argv, env=self._environment())
        except OSError as exc:
            self.log.append(f"trio-swap: could not run {argv[0]!r}: {exc}")
            self._hooks.start_failed(self.model.id)
            self._fail_ready_waiters(f"could not run {argv[0]!r}: {exc.strerror or exc}")
            return
        self.child = child
        stop_argv = self._stop_argv(child)
        if self._guard is not None:
            self._guard.add(child, stop_argv)
        log.info("model %s: started pid %d: %s", self.model.id, child.pid, " ".join(argv))
        try:
            async with trio.open_nursery() as nursery:
                pumped = trio.Event()
                nursery.start_soon(child.watch)
                nursery.start_soon(self._pump, child, pumped)
                await self._supervise(child, started)
                with trio.move_on_after(0.5):  # let the pump store the last lines
                    await pumped.wait()
                nursery.cancel_scope.cancel(reason="process exited")
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._terminate(child, CANCEL_GRACE, "trio-swap is stopping")
            raise
        finally:
            self.log.flush()
            if self._guard is not None and child.returncode is not None:
                self._guard.remove(child)
            child.close()
            self.child = None

    async def _supervise(self, child: Child, started: float) -> None:
        outcome = await self._wait_ready(child, started)
        if outcome == "ready":  # STARTING -> READY
            self.state = ProcessState.READY
            self._was_ready = True
            self.last_ready_seconds = trio.current_time() - started
            log.info("model %s: ready in %.3fs", self.model.id, self.last_ready_seconds)
            self._hooks.ready(self.model.id, self.last_ready_seconds)
            for reply in self._ready_waiters:
                reply.set(None)
            self._ready_waiters.clear()
            outcome = await race({"exited": child.exited.wait, "stop": self._stop_requested.wait})
        if outcome == "exited":
            crashed = self.state is ProcessState.READY
            starting = self.state is ProcessState.STARTING
            # Not ready from this instant: an ensure_ready arriving while the pipe
            # drains must wait and restart, never be told "ready".
            self.state = ProcessState.STOPPING
            await child.wait()
            child.signal_group(signal.SIGKILL)  # helpers it left behind
            if crashed:  # READY -> STOPPED: a crash
                log.warning("model %s: process exited unexpectedly (%s)", self.model.id, child)
                self.log.append(f"trio-swap: process exited unexpectedly ({_describe(child)})")
                self._hooks.crashed(self.model.id)
            elif starting:  # STARTING -> STOPPED
                self.log.flush()
                self._hooks.start_failed(self.model.id)
                self._fail_ready_waiters(
                    f"process exited before becoming ready ({_describe(child)})",
                    self.log.tail(ERROR_TAIL_LINES),
                )
            return
        if outcome == "timeout":  # STARTING -> STOPPED
            tail = self.log.tail(ERROR_TAIL_LINES)
            self._hooks.start_failed(self.model.id)
            await self._terminate(child, ABANDON_GRACE, "health check timed out")
            self._fail_ready_waiters(
                f"not ready after {self.health_check_timeout:g}s "
                f"(healthCheckTimeout; GET {self._health_url()} never returned 200)",
                tail,
            )
            return
        await self._terminate(child, self._stop_grace, self._stop_reason)

    async def _wait_ready(self, child: Child, started: float) -> str:
        if self.model.check_endpoint is None:
            return "ready"
        deadline = started + self.health_check_timeout

        async def timeout() -> None:
            await trio.sleep_until(deadline)

        return await race(
            {
                "ready": self._probe_until_healthy,
                "exited": child.exited.wait,
                "stop": self._stop_requested.wait,
                "timeout": timeout,
            }
        )

    def _health_url(self) -> str:
        return self.model.proxy + (self.model.check_endpoint or "")

    async def _probe_until_healthy(self) -> None:
        url = self._health_url()
        fast_until = trio.current_time() + FAST_PROBE_PERIOD
        while True:
            try:
                response = await self._http.get(url, timeout=PROBE_TIMEOUT)
                if response.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            fast = trio.current_time() < fast_until
            await trio.sleep(PROBE_INTERVAL if fast else SLOW_PROBE_INTERVAL)

    async def _pump(self, child: Child, done: trio.Event) -> None:
        stream = child.output_stream()
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    self.log.feed(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.log.flush()
            done.set()

    def _stop_argv(self, child: Child) -> list[str]:
        return [part.replace(PID_PLACEHOLDER, str(child.pid)) for part in self.model.cmd_stop]

    async def _terminate(self, child: Child, grace: float, reason: str) -> None:
        """Graceful stop, then SIGKILL to the group after ``grace`` seconds; waits for exit."""
        if self.state is not ProcessState.STOPPED:
            self.state = ProcessState.STOPPING
        if child.returncode is None:
            log.info("model %s: stopping pid %d (%s)", self.model.id, child.pid, reason)
        stopper: Child | None = None
        stop_argv = self._stop_argv(child)
        if stop_argv and child.returncode is None:
            try:
                stopper = spawn(stop_argv, env=self._environment())
            except OSError as exc:
                self.log.append(f"trio-swap: cmdStop failed ({exc}); sending SIGTERM")
        if stopper is None:
            child.signal_group(signal.SIGTERM)
        with trio.move_on_after(grace):
            await child.wait()
        if child.returncode is None:
            log.warning(
                "model %s: pid %d still running %gs after the stop; sending SIGKILL",
                self.model.id,
                child.pid,
                grace,
            )
            self.log.append(f"trio-swap: no exit {grace:g}s after the stop; sent SIGKILL")
            child.signal_group(signal.SIGKILL)
            with trio.move_on_after(KILL_WAIT) as waited:
                await child.wait()
            if waited.cancelled_caught:  # stuck in the kernel (a GPU driver call?)
                log.error("model %s: pid %d survived SIGKILL; giving up", self.model.id, child.pid)
        child.signal_group(signal.SIGKILL)  # anything else left in the group
        if stopper is not None:
            stopper.signal_group(signal.SIGKILL)
            await stopper.wait()
            stopper.close()


def _describe(child: Child) -> str:
    code = child.returncode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
