"""One supervised upstream server per model.

:class:`ModelProcess` is the only writer of its process state. Other tasks
talk to it with messages (:meth:`ModelProcess.ensure_ready`,
:meth:`ModelProcess.stop`) that it handles in its own task, deciding from its
*current* state, never from a snapshot the caller took earlier (llama-swap
issue #946 was a hang caused by exactly that).

State transitions (the ``_handle`` and ``_run_once`` code marks them)::

    STOPPED  --ensure_ready-->  STARTING  --health 200 (then slots restored)-->  READY
    STARTING --exit/timeout-->  STOPPED   (waiters get ModelStartFailed with the log tail)
        (an exit during the slot restore too: READY needs a live server, see below)
    STARTING --stop-->          STOPPING  (waiters get ModelStartFailed "stopped while starting")
    READY    --stop-->          STOPPING  (slots saved, then the signal)  --exit-->  STOPPED
    READY    --exit-->          STOPPING at once, then STOPPED (a crash; no restart)
    READY    --sleep-->         SLEEPING  (``sleep:``: the sleep call answered; else a stop)
    SLEEPING --ensure_ready-->  STARTING  (wake calls, check, test request) --ok--> READY
    SLEEPING --wake failed-->   STOPPING, then a cold start for the waiters
    SLEEPING --stop / sleepTTL / exit-->  STOPPING, then STOPPED

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

With ``keepCache`` (llama-server), the KV cache is kept across stops
(:mod:`~trio_swap.upstream.kvcache`): a ready server's slots are saved after
the stop is decided and before the signal, within :data:`SAVE_SHARE` of the
grace period, which the signal's grace then shrinks by, so a stop still ends
by ``unloadTimeout``; after the next start's health check passes, still
STARTING (so no request is forwarded yet), they are restored, racing the
process's exit and a stop order like the health check does. Neither can fail
a start or a stop by itself, but a server that dies during the restore is
never declared READY: an exit seen when the restore ends is an exit before
ready, and a restore whose slot calls got no answer has the health check run
again (racing exit, stop and ``healthCheckTimeout``) before READY. A stop
whose next start runs a reload's other command saves nothing (that command
would never restore it).
"""

from __future__ import annotations

import contextlib
import enum
import logging
import math
import os
import signal
from collections.abc import Callable
from typing import Final, final

import msgspec
import trio

from trio_swap._sync import Reply, race
from trio_swap.config.address import Upstream
from trio_swap.config.diff import same_process
from trio_swap.config.model import DEFAULT_SLEEP_TTL, PID_PLACEHOLDER, ModelConfig, SleepConfig
from trio_swap.errors import ModelStartFailed
from trio_swap.observe.hooks import ProcessHooks
from trio_swap.reasons import StopReason
from trio_swap.upstream.cache_disk import CacheDisk
from trio_swap.upstream.kvcache import SAVE_SHARE, ModelCache
from trio_swap.upstream.launcher import ChildProcess, Launcher, OrphanGuard, spawn
from trio_swap.upstream.logs import LogRing
from trio_swap.upstream.probe import HealthProbe, http_health_probe
from trio_swap.upstream.sleep_calls import SleepFailed, sleep_server, wake_server
from trio_swap.upstream.slots import SlotApi

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
    """The one source of truth for where a model's process is in its life.

    Invariant: the life task runs exactly while the state is not STOPPED.
    """

    STOPPED = "stopped"  # no child process
    STARTING = "starting"  # spawned; readiness check running
    READY = "ready"  # health check passed; requests may be forwarded
    STOPPING = "stopping"  # graceful stop sent; SIGKILL follows after the grace period
    SLEEPING = "sleeping"  # ``sleep:``: the process lives, its accelerator memory released


class _Waited(enum.Enum):
    """What ended a wait in :meth:`ModelProcess._supervise` (the keys of its races)."""

    READY = "ready"  # the health check answered 200
    EXITED = "exited"  # the process exited by itself
    STOP = "stop"  # a stop was ordered
    TIMEOUT = "timeout"  # healthCheckTimeout passed
    SLEEP = "sleep"  # the router asked it to sleep instead of stopping
    WAKE = "wake"  # a request for it arrived while it slept
    SLEPT_ENOUGH = "slept enough"  # sleepTTL passed while it slept


class _LifeEnd(enum.Enum):
    """How one spawn ended (:meth:`ModelProcess._run_once`)."""

    NOT_STARTED = "not started"  # stopped before the spawn, or the spawn failed
    FAILED = "failed"  # exited or timed out before it was ready
    STOPPED = "stopped"  # it was ready and a stop ended it
    CRASHED = "crashed"  # it was ready and exited by itself

    @property
    def was_ready(self) -> bool:
        return self in (_LifeEnd.STOPPED, _LifeEnd.CRASHED)


class _EnsureReady(msgspec.Struct, frozen=True):
    reply: Reply[None]


class _Stop(msgspec.Struct, frozen=True):
    grace: float
    reason: StopReason
    reply: Reply[None]


class _Sleep(msgspec.Struct, frozen=True):
    reason: StopReason
    #: Set True once asleep; False when it could not sleep (not ready, no ``sleep:``).
    reply: Reply[bool]


@final
class _StopOrder:
    """The stop ordered for the current life, if any: set once per life."""

    __slots__ = ("given", "grace", "reason")

    def __init__(self) -> None:
        self.given = trio.Event()
        self.grace = 0.0
        self.reason = StopReason.UNLOAD

    def give(self, grace: float, reason: StopReason) -> None:
        self.grace = grace
        self.reason = reason
        self.given.set()


class _Reconfigure(msgspec.Struct, frozen=True):
    model: ModelConfig
    health_check_timeout: float


class _ResponseSeen(msgspec.Struct, frozen=True):
    cached_tokens: int


_Command = _EnsureReady | _Stop | _Reconfigure | _ResponseSeen | _Sleep


@final
class ModelProcess:
    """Supervises the server process of one model for as long as trio-swap runs."""

    def __init__(
        self,
        model: ModelConfig,
        *,
        health_check_timeout: float,
        launcher: Launcher = spawn,
        probe: HealthProbe = http_health_probe,
        log_ring: LogRing | None = None,
        guard: OrphanGuard | None = None,
        on_stopped: Callable[[str], None] | None = None,
        hooks: ProcessHooks | None = None,
        cache_disk: CacheDisk | None = None,
        slot_api: SlotApi | None = None,
        sleep_ttl: Callable[[], float] = lambda: DEFAULT_SLEEP_TTL,
    ) -> None:
        self.model = model
        #: Seconds a model may sleep before it is stopped (``sleepTTL``; 0: forever).
        self._sleep_ttl = sleep_ttl
        #: The router asked for sleep (set once per ready period) / a request wants it awake.
        self._sleep_asked = trio.Event()
        self._sleep_reason = StopReason.SWAP
        self._wake_asked = trio.Event()
        # Invariant: non-empty only while READY with a sleep asked for.
        self._sleep_waiters: list[Reply[bool]] = []
        #: Seconds the last wake took (calls, check and test request).
        self.last_wake_seconds: float | None = None
        #: Successful wakes so far (the router tells a wake from a start by it).
        self.wake_count = 0
        #: The process went to sleep in this life (no KV cache to save when it stops).
        self._slept = False
        #: The ``sleep:`` calls it slept with (a reload may change the config meanwhile).
        self._slept_with: SleepConfig | None = None
        self._upstream: Upstream | None = None
        self.health_check_timeout = health_check_timeout
        self.log = log_ring if log_ring is not None else LogRing(model.id)
        #: The seams: how a server starts and how its readiness is checked.
        self._launch = launcher
        self._probe = probe
        self._guard = guard
        self._on_stopped = on_stopped
        #: Told of loads, failed starts, stops and crashes (the metrics).
        self._hooks = hooks if hooks is not None else ProcessHooks()
        #: Its KV cache kept across stops (keepCache); None: trio-swap keeps none (tests).
        self._cache = (
            ModelCache(model, cache_disk, api=slot_api, hooks=cache_disk.hooks)
            if cache_disk is not None
            else None
        )
        self._send, self._inbox = trio.open_memory_channel[_Command](math.inf)
        self._nursery: trio.Nursery | None = None

        self.state = ProcessState.STOPPED
        self.child: ChildProcess | None = None
        #: How many times a process was spawned for this model.
        self.start_count = 0
        #: Seconds from spawn to the first passing health check, for the last start.
        self.last_ready_seconds: float | None = None
        # Invariant: non-empty only while STARTING or STOPPING (then a restart follows).
        self._ready_waiters: list[Reply[None]] = []
        # Invariant: non-empty only while STOPPING.
        self._stop_waiters: list[Reply[None]] = []
        #: Replaced at each (re)start, so a stop given to one life never reaches the next.
        self._stop_order = _StopOrder()
        #: The log ring's last line before the current spawn (error messages quote after it).
        self._since = -1
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

    async def stop(
        self, *, grace: float | None = None, reason: StopReason = StopReason.UNLOAD
    ) -> None:
        """Stop the server (a no-op when stopped) and wait until its process group is gone."""
        reply: Reply[None] = Reply()
        self._send.send_nowait(
            _Stop(self.model.unload_timeout if grace is None else grace, reason, reply)
        )
        await reply.wait()

    async def sleep(self, *, reason: StopReason = StopReason.SWAP) -> bool:
        """Put a ready server with ``sleep:`` to sleep; False when it cannot (the
        caller then stops it). A server whose sleep call fails is stopped, and
        this answers True once it is gone: either way it no longer holds the GPU."""
        reply: Reply[bool] = Reply()
        self._send.send_nowait(_Sleep(reason, reply))
        return await reply.wait()

    def reconfigure(self, model: ModelConfig, *, health_check_timeout: float) -> None:
        """A reload's settings for this model: used from the next start on. Never blocks.

        The running process (if any) is left alone; stopping it is the router's call.
        """
        self._send.send_nowait(_Reconfigure(model, health_check_timeout))

    def response_seen(self, cached_tokens: int) -> None:
        """A response of this model reused ``cached_tokens`` prompt tokens (llama.cpp's
        ``timings.cache_n``): what a KV cache restore bought. Never blocks; dropped
        unless a restore waits for this answer."""
        if self._cache is not None and self._cache.checking:
            with contextlib.suppress(trio.ClosedResourceError):  # the model left the config
                self._send.send_nowait(_ResponseSeen(cached_tokens))

    @property
    def cache(self) -> ModelCache | None:
        """The KV cache keeper (keepCache), for views and tests; None without a cache disk."""
        return self._cache

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
                self._handle(_Stop(self.model.unload_timeout, StopReason.LEFT_CONFIG, Reply()))

    def _handle(self, command: _Command) -> None:
        match command:
            case _EnsureReady(reply=reply):
                if self.state is ProcessState.READY and not self._sleep_asked.is_set():
                    reply.set(None)
                    return
                self._ready_waiters.append(reply)
                if self.state is ProcessState.STOPPED:  # STOPPED -> STARTING
                    self._begin_life()
                elif self.state is ProcessState.SLEEPING:  # woken by the life task
                    self._wake_asked.set()
                # STARTING: answered when ready; STOPPING: the life task restarts after the stop.
            case _Stop(grace=grace, reason=reason, reply=reply):
                if self.state is ProcessState.STOPPED:
                    reply.set(None)
                    return
                self._stop_waiters.append(reply)
                self._fail_ready_waiters(f"stopped while starting ({reason.description})")
                if self.state in (
                    ProcessState.STARTING,
                    ProcessState.READY,
                    ProcessState.SLEEPING,
                ):  # -> STOPPING
                    self._hooks.stopping(self.model.id, reason)
                    self.state = ProcessState.STOPPING
                    self._stop_order.give(grace, reason)
            case _Sleep(reason=reason, reply=reply):
                if (
                    self.state is not ProcessState.READY
                    or self.model.sleep is None
                    or self._next_model is not None  # a reload replaced it: stop it
                    or self._stop_order.given.is_set()
                ):
                    reply.set(self.state is ProcessState.SLEEPING)
                    return
                self._sleep_waiters.append(reply)
                self._sleep_reason = reason
                self._sleep_asked.set()
            case _Reconfigure(model=model, health_check_timeout=timeout):
                self.health_check_timeout = timeout  # read when a start begins
                if self.state is ProcessState.STOPPED or same_process(self.model, model):
                    self._apply(model)
                    self._next_model = None
                else:  # applied once the running process is gone (in _life)
                    self._next_model = model
                    if self.state is ProcessState.SLEEPING:
                        # Asleep it serves nobody: stop it now, so the next request
                        # starts the new settings instead of waking the old ones.
                        self._order_stop(StopReason.RELOAD, keep_waiters=True)
            case _ResponseSeen(cached_tokens=cached):
                if self._cache is not None:
                    self._cache.response_seen(cached)

    def _apply(self, model: ModelConfig) -> None:
        """Settings from now on (the process, if any, runs with the same command)."""
        self.model = model
        if self._cache is not None:
            self._cache.configure(model)

    def _begin_life(self) -> None:
        """STOPPED -> STARTING, and the life task that owns the process from here on."""
        assert self._nursery is not None, "run() must be started first"
        assert self.state is ProcessState.STOPPED
        self.state = ProcessState.STARTING
        self._stop_order = _StopOrder()
        self._fresh_sleep_state()
        self._nursery.start_soon(self._life)

    async def _life(self) -> None:
        try:
            while True:
                end = await self._run_once()
                self.state = ProcessState.STOPPED
                if self._next_model is not None:  # a reload's settings, for the next start
                    self._apply(self._next_model)
                    self._next_model = None
                if end.was_ready and self._on_stopped is not None:
                    self._on_stopped(self.model.id)
                for reply in self._stop_waiters:
                    reply.set(None)
                self._stop_waiters.clear()
                if not self._ready_waiters:
                    return
                # Someone asked for the model while it was stopping: start it again.
                self.state = ProcessState.STARTING
                self._stop_order = _StopOrder()
                self._fresh_sleep_state()
        finally:
            self.state = ProcessState.STOPPED  # cancelled: the process is gone by now

    def _fail_ready_waiters(self, reason: str, tail: list[str] | None = None) -> None:
        error = ModelStartFailed(self.model.id, reason, tail or [])
        for reply in self._ready_waiters:
            reply.fail(error)
        self._ready_waiters.clear()

    def _environment(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.model.env)
        return env

    async def _run_once(self) -> _LifeEnd:
        """Spawn the server, supervise it until it is gone, and leave no process behind."""
        if self._stop_order.given.is_set():  # stopped before it was even spawned
            return _LifeEnd.NOT_STARTED
        self.start_count += 1
        started = trio.current_time()
        # An error quotes this start's output only, never an older run's last lines.
        self._since = self.log.last_sequence()
        argv = self.model.cmd
        try:
            child = self._launch(argv, env=self._environment())
        except OSError as exc:
            self.log.append(f"trio-swap: could not run {argv[0]!r}: {exc}")
            self._hooks.start_failed(self.model.id)
            self._fail_ready_waiters(f"could not run {argv[0]!r}: {exc.strerror or exc}")
            return _LifeEnd.NOT_STARTED
        self.child = child
        self._hooks.starting(self.model.id)
        stop_argv = self._stop_argv(child)
        if self._guard is not None:
            self._guard.add(child, stop_argv)
        log.info("model %s: started pid %d: %s", self.model.id, child.pid, " ".join(argv))
        try:
            async with trio.open_nursery() as nursery:
                pumped = trio.Event()
                nursery.start_soon(child.watch)
                nursery.start_soon(self._pump, child, pumped)
                end = await self._supervise(child, started)
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
            self._hooks.stopped(self.model.id)
        return end

    async def _supervise(self, child: ChildProcess, started: float) -> _LifeEnd:
        outcome = await self._wait_ready(child, started + self.health_check_timeout)
        rechecked = False  # the health check ran again after a restore lost the server
        if outcome is _Waited.READY and self._cache is not None:
            self._cache.server_started()
            if self._cache.active:  # still STARTING: nothing forwarded yet
                outcome, rechecked = await self._restore_cache(child)
        if outcome is _Waited.READY and self._stop_order.given.is_set():
            # The probe won the race in the same instant a stop arrived: the stop
            # already failed the waiters and set STOPPING; it is a stop, not a start.
            outcome = _Waited.STOP
        reached_ready = outcome is _Waited.READY
        if reached_ready:  # STARTING -> READY
            self.state = ProcessState.READY
            self.last_ready_seconds = trio.current_time() - started
            log.info("model %s: ready in %.3fs", self.model.id, self.last_ready_seconds)
            self._hooks.ready(self.model.id, self.last_ready_seconds)
            for reply in self._ready_waiters:
                reply.set(None)
            self._ready_waiters.clear()
            outcome = await self._while_ready(child)
        if outcome is _Waited.EXITED:
            crashed = self.state in (ProcessState.READY, ProcessState.SLEEPING)
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
                return _LifeEnd.CRASHED
            if starting:  # STARTING -> STOPPED
                self.log.flush()
                self._hooks.start_failed(self.model.id)
                self._fail_ready_waiters(
                    f"process exited before becoming ready ({_describe(child)})",
                    self.log.tail_since(self._since, ERROR_TAIL_LINES),
                )
                return _LifeEnd.FAILED
            # STOPPING (a stop was ordered as it exited by itself): it ended as ordered
            return _LifeEnd.STOPPED if reached_ready else _LifeEnd.FAILED
        if outcome is _Waited.TIMEOUT:  # STARTING -> STOPPED
            tail = self.log.tail_since(self._since, ERROR_TAIL_LINES)
            self._hooks.start_failed(self.model.id)
            await self._terminate(child, ABANDON_GRACE, "health check timed out")
            if rechecked:
                why = (
                    f"no answer to GET {self._health_url()} within {self.health_check_timeout:g}s "
                    "(healthCheckTimeout) after it stopped answering during the KV cache restore"
                )
            else:
                why = (
                    f"not ready after {self.health_check_timeout:g}s "
                    f"(healthCheckTimeout; GET {self._health_url()} never returned 200)"
                )
            self._fail_ready_waiters(why, tail)
            return _LifeEnd.FAILED
        # _Waited.STOP: STARTING or READY -> STOPPING
        grace = self._stop_order.grace
        if reached_ready and not self._slept:  # a sleeping server has no cache to save
            grace = max(0.0, grace - await self._save_cache())
        await self._terminate(child, grace, self._stop_order.reason.description)
        return _LifeEnd.STOPPED if reached_ready else _LifeEnd.FAILED

    async def _restore_cache(self, child: ChildProcess) -> tuple[_Waited, bool]:
        """keepCache: the saved slots back into the new server, for at most ``unloadTimeout``
        (a save had half of it). An exit or a stop order meanwhile ends it, as in
        :meth:`_wait_ready`; a failed restore is logged and the model served anyway.

        Returns the outcome and whether the health check ran again. The restore
        never raises, so a server killed mid-restore ends it at once, before the
        exit is reaped: READY only if the process has not exited and, when a slot
        call got no answer, a health check passes again first.
        """
        cache = self._cache
        assert cache is not None
        limit = self.model.unload_timeout
        upstream = self.upstream

        async def restore() -> None:
            await cache.restore(upstream, limit)

        outcome = await race(
            {
                _Waited.READY: restore,
                _Waited.EXITED: child.exited.wait,
                _Waited.STOP: self._stop_order.given.wait,
            }
        )
        if outcome is not _Waited.READY:
            return outcome, False
        if child.exited.is_set() or child.returncode is not None:
            return _Waited.EXITED, False
        if not cache.lost_connection:
            return outcome, False
        log.info(
            "model %s: a KV cache restore call got no answer; checking its health again",
            self.model.id,
        )
        deadline = trio.current_time() + self.health_check_timeout
        return await self._wait_ready(child, deadline), True

    async def _save_cache(self) -> float:
        """keepCache: save the ready server's slots before the signal, for at most
        :data:`SAVE_SHARE` of the grace period; returns the seconds it took (the
        signal's grace shrinks by them: the stop still ends by ``unloadTimeout``)."""
        cache = self._cache
        order = self._stop_order
        if cache is None or not cache.active or order.reason is StopReason.LEFT_CONFIG:
            return 0.0
        if self._next_model is not None and not cache.restored_by(self._next_model):
            log.info(
                "model %s: KV cache not saved: the next start runs a reload's new settings, "
                "which would not restore it",
                self.model.id,
            )
            return 0.0
        started = trio.current_time()
        await cache.save(self.upstream, order.grace * SAVE_SHARE)
        return trio.current_time() - started

    async def _while_ready(self, child: ChildProcess) -> _Waited:
        """READY (and SLEEPING) until the process exits or is to be stopped.

        Returns EXITED or STOP; a sleep that fails, a sleepTTL that passes and a
        wake that fails all end as a STOP given here (the waiters of a failed
        wake stay: :meth:`_life` starts the model cold for them).
        """
        while True:
            outcome = await race(
                {
                    _Waited.EXITED: child.exited.wait,
                    _Waited.STOP: self._stop_order.given.wait,
                    _Waited.SLEEP: self._sleep_asked.wait,
                }
            )
            if outcome is not _Waited.SLEEP:
                self._answer_sleepers()  # it goes away: it holds nothing any more
                return outcome
            outcome = await self._sleep_now(child)
            if outcome is not _Waited.WAKE:
                return outcome
            if not await self._wake_now(child):
                return _Waited.STOP

    async def _sleep_now(self, child: ChildProcess) -> _Waited:
        """READY -> SLEEPING, then wait there: WAKE, or EXITED / STOP (to be stopped)."""
        config = self.model.sleep
        if config is None:  # a reload took sleep: away just now: a plain stop
            self._order_stop(self._sleep_reason)
            self._answer_sleepers()
            return _Waited.STOP
        failures: list[SleepFailed] = []

        async def put_to_sleep() -> None:
            try:
                await sleep_server(self.upstream, config)
            except SleepFailed as exc:  # judged below (race would wrap it in a group)
                failures.append(exc)

        # Raced, like a wake: a stop or an exit never waits for a hanging sleep call.
        outcome = await race(
            {
                _Waited.SLEEP: put_to_sleep,
                _Waited.EXITED: child.exited.wait,
                _Waited.STOP: self._stop_order.given.wait,
            }
        )
        if outcome is _Waited.SLEEP and failures and not self._stop_order.given.is_set():
            exc = failures[0]
            log.warning("model %s: could not sleep (%s); stopping it", self.model.id, exc)
            self.log.append(f"trio-swap: sleep failed ({exc}); stopping")
            self._hooks.sleep_failed(self.model.id)
            self._order_stop(self._sleep_reason)
        if outcome is not _Waited.SLEEP or self._stop_order.given.is_set():
            self._answer_sleepers()  # it goes: the caller need not stop it too
            return _Waited.STOP if outcome is _Waited.SLEEP else outcome
        if self._next_model is not None:  # a reload replaced it during the sleep call
            self._order_stop(StopReason.RELOAD)
            self._answer_sleepers()
            return _Waited.STOP
        self.state = ProcessState.SLEEPING  # READY -> SLEEPING
        self._slept = True
        self._slept_with = config
        self._sleep_asked = trio.Event()
        log.info("model %s: asleep (%s)", self.model.id, self._sleep_reason.description)
        self._hooks.slept(self.model.id, self._sleep_reason)
        self._answer_sleepers()
        if self._ready_waiters:  # asked for again while the sleep call ran
            self._wake_asked.set()
        ttl = self._sleep_ttl()

        async def slept_enough() -> None:
            await trio.sleep(ttl if ttl > 0 else math.inf)

        outcome = await race(
            {
                _Waited.EXITED: child.exited.wait,
                _Waited.STOP: self._stop_order.given.wait,
                _Waited.WAKE: self._wake_asked.wait,
                _Waited.SLEPT_ENOUGH: slept_enough,
            }
        )
        self._wake_asked = trio.Event()
        if outcome is _Waited.SLEPT_ENOUGH:
            log.info("model %s: asleep for %gs (sleepTTL); stopping it", self.model.id, ttl)
            self._order_stop(StopReason.TTL)
            return _Waited.STOP
        return outcome

    async def _wake_now(self, child: ChildProcess) -> bool:
        """SLEEPING -> STARTING -> READY; False (a stop ordered) when the wake failed."""
        config = self._slept_with  # the calls that put it to sleep wake it
        assert config is not None, "SLEEPING always has the config it slept with"
        self.state = ProcessState.STARTING  # nothing is forwarded until the test passed
        started = trio.current_time()

        failures: list[SleepFailed] = []

        async def wake() -> None:
            try:
                await wake_server(self.upstream, config)
            except SleepFailed as exc:  # judged below (race would wrap it in a group)
                failures.append(exc)

        outcome = await race(
            {
                _Waited.READY: wake,
                _Waited.EXITED: child.exited.wait,
                _Waited.STOP: self._stop_order.given.wait,
            }
        )
        if outcome is _Waited.READY and failures and not self._stop_order.given.is_set():
            exc = failures[0]
            log.warning(
                "model %s: the wake failed (%s); stopping it and starting it cold",
                self.model.id,
                exc,
            )
            self.log.append(f"trio-swap: wake failed ({exc}); restarting cold")
            self._hooks.wake_failed(self.model.id)
            self._order_stop(StopReason.SWAP, keep_waiters=True, announce=False)
            return False
        if outcome is not _Waited.READY or self._stop_order.given.is_set():
            if not self._stop_order.given.is_set():  # it exited while waking
                self._hooks.wake_failed(self.model.id)
                self._order_stop(StopReason.SWAP, keep_waiters=True, announce=False)
            return False
        self._slept = False
        self.last_wake_seconds = trio.current_time() - started
        self.wake_count += 1
        self.state = ProcessState.READY  # SLEEPING -> READY, through the test request
        log.info("model %s: awake in %.3fs", self.model.id, self.last_wake_seconds)
        self._hooks.woke(self.model.id, self.last_wake_seconds)
        for reply in self._ready_waiters:
            reply.set(None)
        self._ready_waiters.clear()
        return True

    def _order_stop(
        self, reason: StopReason, *, keep_waiters: bool = False, announce: bool = True
    ) -> None:
        """The process stops itself (a failed sleep or wake, sleepTTL, a reload).

        ``announce`` False: not an eviction (a failed wake restarts the model for
        its waiters; the metrics count it as a failed wake instead).
        """
        if self._stop_order.given.is_set():
            return
        if not keep_waiters:
            self._fail_ready_waiters(f"stopped ({reason.description})")
        if announce:
            self._hooks.stopping(self.model.id, reason)
        self.state = ProcessState.STOPPING
        self._stop_order.give(self.model.unload_timeout, reason)

    def _fresh_sleep_state(self) -> None:
        """A new life starts awake, with no sleep asked for and nobody waiting on one."""
        self._sleep_asked = trio.Event()
        self._wake_asked = trio.Event()
        self._slept = False
        self._slept_with = None
        self._answer_sleepers()

    def _answer_sleepers(self) -> None:
        """Whoever asked for a sleep: the process sleeps or goes; either way it is done."""
        waiters, self._sleep_waiters = self._sleep_waiters, []
        for reply in waiters:
            reply.set(True)

    async def _wait_ready(self, child: ChildProcess, deadline: float) -> _Waited:
        """The health check until 200, racing the exit, a stop order and ``deadline``."""
        if self.model.check_endpoint is None:
            return _Waited.READY

        async def timeout() -> None:
            await trio.sleep_until(deadline)

        return await race(
            {
                _Waited.READY: self._probe_until_healthy,
                _Waited.EXITED: child.exited.wait,
                _Waited.STOP: self._stop_order.given.wait,
                _Waited.TIMEOUT: timeout,
            }
        )

    def _health_url(self) -> str:
        return self.model.proxy + (self.model.check_endpoint or "")

    async def _probe_until_healthy(self) -> None:
        upstream = self.upstream
        path = self.model.check_endpoint or "/"
        fast_until = trio.current_time() + FAST_PROBE_PERIOD
        while True:
            if await self._probe(upstream, path, timeout=PROBE_TIMEOUT):
                return
            fast = trio.current_time() < fast_until
            await trio.sleep(PROBE_INTERVAL if fast else SLOW_PROBE_INTERVAL)

    async def _pump(self, child: ChildProcess, done: trio.Event) -> None:
        stream = child.output_stream()
        try:
            async with stream:
                while data := await stream.receive_some(65536):
                    self.log.feed(bytes(data))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        finally:
            self.log.flush()
            done.set()

    def _stop_argv(self, child: ChildProcess) -> list[str]:
        return [part.replace(PID_PLACEHOLDER, str(child.pid)) for part in self.model.cmd_stop]

    async def _terminate(self, child: ChildProcess, grace: float, reason: str) -> None:
        """Graceful stop, then SIGKILL to the group after ``grace`` seconds; waits for exit."""
        if self.state is not ProcessState.STOPPED:
            self.state = ProcessState.STOPPING
        if child.returncode is None:
            log.info("model %s: stopping pid %d (%s)", self.model.id, child.pid, reason)
        stopper: ChildProcess | None = None
        stop_argv = self._stop_argv(child)
        if stop_argv and child.returncode is None:
            try:
                stopper = self._launch(stop_argv, env=self._environment())
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


def _describe(child: ChildProcess) -> str:
    code = child.returncode
    if code is None:
        return "still running"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
