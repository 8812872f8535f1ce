"""The one task that owns routing state (DESIGN invariant 1).

HTTP handlers, process supervisors and timers never touch routing state: they
put an event on the router's memory channel and, when they need an answer,
wait on a :class:`~trio_swap._sync.Reply`. :meth:`Router.run` takes events one
at a time, asks the pure :class:`~trio_swap.scheduling.FifoScheduler` what to
do, and carries the decisions out. Slow work (stopping victims, waiting for a
model to load) runs in swap tasks in the router's nursery, which report back
with another event. No locks anywhere on this path.

A config reload is one more event (:meth:`Router.reconfigure`): the process
table, the scheduler's limits, settings and policy all change in one router
step, so no decision ever sees half of the old config and half of the new.

Every request that gets a lease must release it exactly once
(:meth:`Router.release`, non-blocking, safe in ``finally`` under
cancellation); a handler cancelled while waiting releases its place the same
way, so nothing leaks whatever the client does (invariant 4).
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import Final, assert_never, final

import msgspec
import trio

from trio_swap._sync import Reply
from trio_swap.config.address import Upstream
from trio_swap.config.diff import same_process
from trio_swap.config.model import ModelConfig, SchedulerConfig
from trio_swap.errors import ModelStartFailed, ModelUnloaded, ShuttingDown, SwapError
from trio_swap.fit.ledger import FitLedger
from trio_swap.fit.oom import exhausted_resources
from trio_swap.policy.base import SwapPolicy
from trio_swap.policy.fit import FitPolicy
from trio_swap.reasons import StopReason
from trio_swap.scheduling import (
    Decision,
    FifoScheduler,
    Grant,
    Joined,
    ModelLimits,
    Phase,
    Queued,
    Reject,
    Retire,
    StartSwap,
    StopModels,
)
from trio_swap.upstream.footprint import FootprintProbe
from trio_swap.upstream.process import ModelProcess, ProcessState

__all__ = ["MEASURE_EVERY", "Admission", "Lease", "Router"]

log = logging.getLogger("trio_swap.router")

#: Seconds between measurements of a running model's memory (the first is at ready).
MEASURE_EVERY: Final = 5.0


@final
class Lease(msgspec.Struct, frozen=True):
    """Permission to forward one request to ``model``; release it when done."""

    request_id: int
    model: str
    #: Where the granted process listens, as it was when the grant was made
    #: (a reload may already have given the model a new ``proxy`` for its next start).
    upstream: Upstream


class Admission(enum.Enum):
    """Why an admitted request is not granted at once: what it waits for."""

    QUEUED = "queued"  # behind other requests (a busy victim, a swap under way, collation)
    LOADING = "loading"  # its model is loading (it started the load or joined it)


# -- events (facts, past tense) ------------------------------------------------


class _RequestArrived(msgspec.Struct, frozen=True):
    request_id: int
    model: str
    #: Set to where the granted process listens.
    reply: Reply[Upstream]
    #: Told, in the router task, when the request is admitted but must wait.
    on_wait: Callable[[Admission], None] | None


class _RequestFinished(msgspec.Struct, frozen=True):
    request_id: int


class _SwapDone(msgspec.Struct, frozen=True):
    swap_id: int
    error: SwapError | None
    #: Seconds from spawn to ready when this swap started the process; None otherwise.
    load_seconds: float | None = None
    #: Seconds the wake took when this swap woke a sleeping process; None otherwise.
    wake_seconds: float | None = None


class _Measured(msgspec.Struct, frozen=True):
    """A running model's memory footprint, bytes per resource."""

    model: str
    footprint: dict[str, int]
    #: The config the measured process was started with (a reload may have replaced it).
    started_with: ModelConfig
    #: Measured while asleep (``sleep:``): its asleep footprint.
    asleep: bool = False


class _StopsDone(msgspec.Struct, frozen=True):
    stop_id: int


class _ModelStopped(msgspec.Struct, frozen=True):
    model: str


class _UnloadRequested(msgspec.Struct, frozen=True):
    models: tuple[str, ...]
    reply: Reply[None]


class _ShutdownRequested(msgspec.Struct, frozen=True):
    reply: Reply[None]


class _StopAllRequested(msgspec.Struct, frozen=True):
    reply: Reply[None]


class _Reconfigured(msgspec.Struct, frozen=True):
    """A reload's new config, to apply in one step (see :meth:`Router.reconfigure`)."""

    models: Mapping[str, ModelConfig]
    policy: SwapPolicy
    settings: SchedulerConfig
    health_check_timeout: float
    restart: AbstractSet[str]
    spawn: Callable[[ModelConfig, float], ModelProcess]
    prepare: Callable[[], None]
    applied: Callable[[], None]
    reply: Reply[None]


class _Tick(msgspec.Struct, frozen=True):
    """A timer asked for proof of life (the systemd watchdog): the router answers ``on_tick``."""


_Event = (
    _RequestArrived
    | _RequestFinished
    | _SwapDone
    | _StopsDone
    | _ModelStopped
    | _UnloadRequested
    | _ShutdownRequested
    | _StopAllRequested
    | _Reconfigured
    | _Tick
    | _Measured
)


@final
class Router:
    """Routes requests to model processes, swapping them as the policy requires."""

    def __init__(
        self,
        processes: Mapping[str, ModelProcess],
        policy: SwapPolicy,
        settings: SchedulerConfig | None = None,
        on_tick: Callable[[], None] = lambda: None,
        *,
        ledger: FitLedger | None = None,
        footprint: FootprintProbe | None = None,
        on_evict: Callable[[str, str, str], None] | None = None,
        measure_every: float = MEASURE_EVERY,
    ) -> None:
        self._processes = dict(processes)
        self._on_tick = on_tick
        self._policy = policy
        #: What was learned about each model (needs, load times, demand); None: nothing.
        self.ledger = ledger
        self._footprint = footprint
        self._measure_every = measure_every
        #: Told (victim, target, why) as a swap evicts a model (the timeline).
        self._on_evict = on_evict
        #: Models whose last start ran out of memory and were retried once already.
        self._oom_retried: set[str] = set()
        #: Swap id -> its victims (stopped before its target started).
        self._swap_victims: dict[int, tuple[str, ...]] = {}
        #: PIDs a measuring task watches (one task per process).
        self._measuring: set[int] = set()
        #: Models whose sleep call runs: still READY, but what they hold is neither their
        #: awake nor their asleep footprint (vLLM copies the weights to host memory).
        self._falling_asleep: set[str] = set()
        #: Stop id -> sleeping models an unload stops with it (the scheduler thinks them cold).
        self._also_stop: dict[int, tuple[str, ...]] = {}
        #: Swap id -> (victims that sleep instead of stopping, sleepers it stops).
        self._swap_ways: dict[int, tuple[frozenset[str], dict[str, trio.Event]]] = {}
        #: Sleeping model -> one event per stop of it ordered (by a swap or an unload)
        #: and not done: the scheduler thinks it COLD, so a swap to it may start
        #: meanwhile; that swap waits for these before it starts it. Until then the
        #: sleeper holds its memory.
        self._sleeper_stops: dict[str, list[trio.Event]] = {}
        #: Models seen asleep, not since seen awake or stopped: one being stopped (an
        #: unload, sleepTTL, a reload) holds its memory until its process is gone.
        self._seen_asleep: set[str] = set()
        settings = settings or SchedulerConfig()
        self._adopt(policy)
        self.scheduler = FifoScheduler(
            {name: _limits(proc.model, settings) for name, proc in processes.items()},
            policy,
            max_wait=settings.max_wait,
            min_resident=settings.min_resident,
            max_queue=settings.max_queue,
        )
        self._send, self._receive = trio.open_memory_channel[_Event](math.inf)
        self._ids = itertools.count(1)
        self._waiting: dict[int, Reply[Upstream]] = {}
        self._unload_replies: dict[int, Reply[None]] = {}
        #: Swap id -> (target, the scope around its ensure_ready, the error if cancelled).
        self._swap_scopes: dict[int, tuple[str, trio.CancelScope]] = {}
        self._swap_cancel_errors: dict[int, SwapError] = {}
        self._nursery: trio.Nursery | None = None
        #: Total successful swaps, for /api/models and benchmarks.
        self.swap_count = 0

    # -- API for other tasks (never blocks the router) ---------------------------

    def new_request_id(self) -> int:
        """An id to pass to :meth:`acquire` when the caller wants to watch its place."""
        return next(self._ids)

    def queue_position(self, request_id: int) -> int | None:
        """1-based place among queued requests, or None (not queued: loading or granted)."""
        return self.scheduler.queue_position(request_id)

    @property
    def processes(self) -> Mapping[str, ModelProcess]:
        """Every model's supervisor, live: a reload adds to it and retires from it.

        Read it without awaiting in between (the router task changes it).
        """
        return self._processes

    def is_ready(self, model: str) -> bool:
        """Whether requests for ``model`` are being granted without a load right now."""
        return model in self._processes and self.scheduler.phase(model) is Phase.READY

    async def acquire(
        self,
        model: str,
        *,
        request_id: int | None = None,
        on_wait: Callable[[Admission], None] | None = None,
    ) -> Lease:
        """Wait until ``model`` is ready and this request may be forwarded to it.

        ``on_wait`` is called (once, from the router task: it must not block)
        when the scheduler admits the request but cannot grant it at once; a
        request granted or rejected straight away never calls it. So a caller
        knows, from the router's own decision, that it passed admission.

        Raises:
            SwapError: rate limited, the model failed to start, was unloaded, or shutdown.
        """
        if request_id is None:
            request_id = next(self._ids)
        reply: Reply[Upstream] = Reply()
        self._send.send_nowait(_RequestArrived(request_id, model, reply, on_wait))
        try:
            upstream = await reply.wait()
        except SwapError:
            raise  # rejected: the scheduler already released the slot
        except BaseException:
            self._send.send_nowait(_RequestFinished(request_id))
            raise
        return Lease(request_id, model, upstream)

    def release(self, lease: Lease) -> None:
        """The request is over (served, failed or disconnected). Safe to call under cancellation."""
        self._send.send_nowait(_RequestFinished(lease.request_id))

    def model_stopped(self, model: str) -> None:
        """Called by a process supervisor whenever a model that was ready has stopped."""
        self._send.send_nowait(_ModelStopped(model))

    def tick(self) -> None:
        """Ask the router task to call ``on_tick`` when it gets to it (watchdog proof of life)."""
        self._send.send_nowait(_Tick())

    async def unload(self, models: Sequence[str] | None = None) -> None:
        """Stop these models (all when None) and wait until their processes are gone."""
        reply: Reply[None] = Reply()
        chosen = tuple(self._processes) if models is None else tuple(models)
        self._send.send_nowait(_UnloadRequested(chosen, reply))
        await reply.wait()

    async def reconfigure(
        self,
        models: Mapping[str, ModelConfig],
        policy: SwapPolicy,
        settings: SchedulerConfig,
        *,
        health_check_timeout: float,
        restart: AbstractSet[str],
        spawn: Callable[[ModelConfig, float], ModelProcess],
        prepare: Callable[[], None] = lambda: None,
        applied: Callable[[], None] = lambda: None,
    ) -> None:
        """Switch to a reloaded config in one router step; returns once it is in effect.

        A model without a supervisor gets one from ``spawn(model,
        health_check_timeout)``; the others are sent their new settings
        (:meth:`ModelProcess.reconfigure`). ``restart`` names the models whose
        process settings changed. What happens to running models is the
        scheduler's call (:meth:`FifoScheduler.on_reconfigure`); the stops it
        orders go on in the background, never cutting a request in flight.

        ``prepare`` runs in the router task first in that step, before the
        scheduler asks the new policy anything (the ledger's new config).
        ``applied`` runs in the router task within that same step, whether or
        not this caller is still waiting (cancelled, it may not be): the place
        for what must switch together with the router (the HTTP layer's config).
        """
        reply: Reply[None] = Reply()
        event = _Reconfigured(
            models,
            policy,
            settings,
            health_check_timeout,
            frozenset(restart),
            spawn,
            prepare,
            applied,
            reply,
        )
        self._send.send_nowait(event)
        await reply.wait()

    async def shutdown(self) -> None:
        """Stop admitting: reject every waiting and new request, cancel loads under way.

        Requests already granted keep going (the HTTP drain lets them finish);
        then :meth:`stop_all` stops the models.
        """
        reply: Reply[None] = Reply()
        self._send.send_nowait(_ShutdownRequested(reply))
        await reply.wait()

    async def stop_all(self) -> None:
        """Stop every model (requests still in flight on them break) and wait."""
        reply: Reply[None] = Reply()
        self._send.send_nowait(_StopAllRequested(reply))
        await reply.wait()

    # -- the router task -------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                while True:
                    event: _Event | None = None
                    with trio.move_on_at(self.scheduler.next_deadline()):
                        event = await self._receive.receive()
                    now = trio.current_time()
                    if event is None:
                        self._observe(now)
                        self._apply(self.scheduler.on_tick(now))
                    else:
                        self._apply(self._dispatch(event, now))
            finally:
                self._fail_unhandled()

    def _fail_unhandled(self) -> None:
        """The router stops: nobody waits forever for an answer it will never give."""
        while True:
            try:
                event = self._receive.receive_nowait()
            except (trio.WouldBlock, trio.EndOfChannel, trio.ClosedResourceError):
                return
            reply = getattr(event, "reply", None)
            if isinstance(reply, Reply):
                reply.fail(ShuttingDown())

    def _observe(self, now: float) -> None:
        """The ledger's clock and sleepers, before the scheduler asks the policy anything."""
        if self.ledger is not None:
            self.ledger.tick(now)
            self.ledger.set_asleep(self._asleep())

    def _dispatch(self, event: _Event, now: float) -> list[Decision]:
        scheduler = self.scheduler
        self._observe(now)
        match event:
            case _RequestArrived(request_id=rid, model=model, reply=reply, on_wait=on_wait):
                self._waiting[rid] = reply
                if self.ledger is not None:
                    self.ledger.requested(model, now)
                decisions = scheduler.on_request(rid, model, now)
                if on_wait is not None:
                    waits = _admission(rid, decisions)
                    if waits is not None:
                        on_wait(waits)
                return decisions
            case _RequestFinished(request_id=rid):
                self._waiting.pop(rid, None)
                return scheduler.on_finished(rid, now)
            case _SwapDone(swap_id=swap_id, error=error, load_seconds=seconds, wake_seconds=woke):
                target = self._swap_scopes.pop(swap_id, ("", trio.CancelScope()))[0]
                victims = self._swap_victims.pop(swap_id, ())
                retry = False
                if error is None:
                    self.swap_count += 1
                    if self.ledger is not None and seconds is not None:
                        self.ledger.loaded(target, seconds)
                    if self.ledger is not None and woke is not None:
                        self.ledger.woke(target, woke)
                    self._start_measuring(target)
                else:
                    retry = self._retry_after_oom(target, victims, error)
                if retry:
                    self._oom_retried.add(target)
                else:  # a success, or a failure that is not retried: the next OOM may be
                    self._oom_retried.discard(target)
                return scheduler.on_swap_done(swap_id, error, now, retry=retry)
            case _Measured(model=model, footprint=footprint, started_with=config, asleep=asleep):
                ledger = self.ledger
                if ledger is not None and ledger.measured(model, footprint, config, asleep=asleep):
                    return scheduler.on_policy_inputs_changed(now)
                return []
            case _StopsDone(stop_id=stop_id):
                unload_reply = self._unload_replies.pop(stop_id, None)
                if unload_reply is not None:
                    unload_reply.set(None)
                return scheduler.on_stops_done(stop_id, now)
            case _ModelStopped(model=model):
                if self.ledger is not None:
                    self.ledger.stopped(model)
                return scheduler.on_model_stopped(model, now)
            case _UnloadRequested(models=models, reply=reply):
                decisions = scheduler.on_unload(models, now)
                # The scheduler sees a sleeping model as stopped; its process is not.
                sleepers = tuple(
                    m
                    for m in models
                    if m in self._processes and self._processes[m].state is ProcessState.SLEEPING
                )
                for decision in decisions:
                    if isinstance(decision, StopModels):
                        self._unload_replies[decision.stop_id] = reply
                        self._also_stop[decision.stop_id] = sleepers
                return decisions  # applying its StopModels cancels loads of these models
            case _ShutdownRequested(reply=reply):
                decisions = scheduler.on_shutdown()
                for swap_id, (_, scope) in self._swap_scopes.items():
                    self._swap_cancel_errors[swap_id] = ShuttingDown()
                    scope.cancel(reason="shutting down")
                reply.set(None)
                return decisions
            case _StopAllRequested(reply=reply):
                assert self._nursery is not None
                self._nursery.start_soon(self._stop_all, reply)
                return []
            case _Tick():
                self._on_tick()
                return []
            case _Reconfigured():
                return self._reconfigure(event, now)
            case _:
                assert_never(event)

    def _apply(self, decisions: list[Decision]) -> None:
        assert self._nursery is not None
        for decision in decisions:
            match decision:
                case Grant(request_id=rid, model=model):
                    reply = self._waiting.pop(rid, None)
                    if reply is not None:
                        # READY, so this is where the running process listens.
                        reply.set(self._processes[model].upstream)
                case Reject(request_id=rid, error=error):
                    reply = self._waiting.pop(rid, None)
                    if reply is not None:
                        reply.fail(error)
                case StartSwap(swap_id=swap_id, target=target, victims=victims):
                    if victims:
                        log.info(
                            "swap %d: loading %s, evicting %s", swap_id, target, ", ".join(victims)
                        )
                    else:
                        log.info("swap %d: loading %s", swap_id, target)
                    sleep, stop_asleep = self._ways_to_go(target, victims)
                    self._swap_ways[swap_id] = (sleep, self._order_sleeper_stops(stop_asleep))
                    for victim in (*victims, *stop_asleep):
                        self._tell_eviction(victim, target)
                    self._swap_victims[swap_id] = victims
                    scope = trio.CancelScope()
                    self._swap_scopes[swap_id] = (target, scope)
                    self._nursery.start_soon(self._run_swap, decision, scope)
                case StopModels(stop_id=stop_id, models=models, reason=reason):
                    if models:
                        log.info("stopping %s (%s)", ", ".join(models), reason.description)
                    for swap_id, (target, scope) in self._swap_scopes.items():
                        if target in models:  # never finish loading what is being stopped
                            self._swap_cancel_errors.setdefault(swap_id, ModelUnloaded(target))
                            scope.cancel(reason=f"{target}: {reason.description}")
                    extra = tuple(m for m in self._also_stop.pop(stop_id, ()) if m not in models)
                    sleepers = self._order_sleeper_stops(extra)
                    awake = self._too_big_asleep(models) if reason is StopReason.TTL else ()
                    self._nursery.start_soon(
                        self._run_stops, stop_id, models, reason, sleepers, frozenset(awake)
                    )
                case Queued(request_id=rid, model=model, position=position):
                    log.info("request %d for %s queued at #%d", rid, model, position)
                case Joined(request_id=rid, model=model, swap_id=swap_id):
                    log.info("request %d for %s joined swap %d", rid, model, swap_id)
                case Retire(model=model):
                    process = self._processes.pop(model, None)
                    if process is not None:
                        process.close()
                        log.info("model %s: left the config; its supervisor ends", model)
                case _:
                    assert_never(decision)

    def _reconfigure(self, event: _Reconfigured, now: float) -> list[Decision]:
        """The process table first (so decisions can use new models), then the scheduler."""
        timeout = event.health_check_timeout
        # Compared with what each process runs now, not with the previous config:
        # a second reload that undoes the first must not restart anything.
        restart = set(event.restart)
        for name, model in event.models.items():
            process = self._processes.get(name)
            if process is not None and process.state is not ProcessState.STOPPED:
                if same_process(process.model, model):
                    restart.discard(name)
                else:
                    restart.add(name)
        for name, model in event.models.items():
            process = self._processes.get(name)
            if process is None:
                self._processes[name] = event.spawn(model, timeout)
            else:  # queued before any ensure_ready this step decides: the order holds
                process.reconfigure(model, health_check_timeout=timeout)
        self._policy = event.policy
        self._adopt(event.policy)
        try:
            event.prepare()
        except Exception:  # the caller's bug must not end the router (and the server)
            log.exception("reload: preparing the new config's policy inputs failed")
        decisions = self.scheduler.on_reconfigure(
            {name: _limits(model, event.settings) for name, model in event.models.items()},
            event.policy,
            restart=restart,
            max_wait=event.settings.max_wait,
            min_resident=event.settings.min_resident,
            max_queue=event.settings.max_queue,
            now=now,
        )
        try:
            event.applied()
        except Exception:  # the caller's bug must not end the router (and the server)
            log.exception("reload: switching the rest of trio-swap to the new config failed")
        event.reply.set(None)
        return decisions

    async def _run_swap(self, swap: StartSwap, scope: trio.CancelScope) -> None:
        """Stop the victims, then make the target ready; report ``SwapDone`` either way.

        Only the target's load can be cancelled (by an unload or removal of the
        target, a load nobody waits for, or shutdown): the victims' stops always
        run to the end, so the scheduler never believes a model gone while its
        process still holds the GPU. A load cancelled before it began is never
        sent to the process.
        """
        started = trio.current_time()
        error: SwapError | None = None
        sleep, sleepers = self._swap_ways.pop(swap.swap_id, (frozenset(), {}))
        async with trio.open_nursery() as nursery:
            for victim in swap.victims:
                nursery.start_soon(self._stop_one, victim, StopReason.SWAP, victim in sleep)
            for sleeper, done in sleepers.items():
                nursery.start_soon(self._stop_sleeper, sleeper, StopReason.SWAP, done)
        process = self._processes[swap.target]
        starts_before = process.start_count
        wakes_before = process.wake_count
        with scope:
            try:
                # Cancelled while the victims stopped (the target was unloaded or
                # removed, or nobody waits for it any more): its stop has already
                # reached the process (a no-op, it was stopped), so a start sent
                # now would run a model nobody wants, untracked. Send none.
                for stop in list(self._sleeper_stops.get(swap.target, ())):
                    await stop.wait()  # asleep, and another swap or an unload stops it
                await trio.lowlevel.checkpoint_if_cancelled()
                await process.ensure_ready()
            except ModelStartFailed as exc:
                error = exc
        if scope.cancelled_caught:
            error = self._swap_cancel_errors.pop(swap.swap_id, ModelUnloaded(swap.target))
        self._swap_cancel_errors.pop(swap.swap_id, None)
        elapsed = trio.current_time() - started
        if error is None:
            log.info("swap %d: %s ready after %.3fs", swap.swap_id, swap.target, elapsed)
        else:
            log.warning("swap %d: %s failed: %s", swap.swap_id, swap.target, error.message)
        loaded = process.last_ready_seconds if process.start_count != starts_before else None
        woke = process.last_wake_seconds if process.wake_count != wakes_before else None
        if error is not None:
            loaded = woke = None
        self._send.send_nowait(_SwapDone(swap.swap_id, error, loaded, woke))

    def _retry_after_oom(self, model: str, victims: tuple[str, ...], error: SwapError) -> bool:
        """A start that ran out of memory beside other models: learn, and try once more.

        The ledger raises the model's need so it no longer fits beside what was
        resident; the scheduler then queues the waiters again and the next
        placement evicts more. Only once in a row per model, and only when
        something else was resident (alone, more room cannot be made).
        """
        ledger = self.ledger
        if ledger is None or not ledger.resources or not isinstance(error, ModelStartFailed):
            return False
        if model in self._oom_retried:
            return False
        exhausted = exhausted_resources(error.log_tail, error.reason, ledger.resources)
        if exhausted is None:
            return False
        # The swap's victims were gone before the start (or asleep: the sleepers read at
        # this step's start); only the others were resident.
        resident = [m for m in self.scheduler.running() if m != model and m not in victims]
        asleep = [m for m in ledger.asleep() if m != model and m not in resident]
        if not ledger.out_of_memory(model, resident, exhausted, asleep):
            return False
        log.warning(
            "model %s ran out of memory (%s) beside %s: its need is raised; loading it again "
            "after evicting more",
            model,
            ", ".join(exhausted),
            ", ".join([*resident, *(f"{m} (asleep)" for m in asleep)]),
        )
        return True

    def _tell_eviction(self, victim: str, target: str) -> None:
        """Log (and tell the timeline) why ``victim`` goes for ``target``."""
        policy = self._policy
        if isinstance(policy, FitPolicy):
            why = policy.explain(target, victim)
        else:
            why = f"the swap policy does not let it run beside {target}"
        log.info("evicting %s for %s: %s", victim, target, why)
        if self._on_evict is not None:
            self._on_evict(victim, target, why)

    def _start_measuring(self, model: str) -> None:
        """Measure a model that just became ready, then every ``measure_every`` seconds."""
        process = self._processes.get(model)
        if self._footprint is None or self._nursery is None or process is None:
            return
        pid = process.pid
        if pid is not None and pid not in self._measuring:
            self._measuring.add(pid)
            self._nursery.start_soon(self._measure, model, process, pid, process.model)

    async def _measure(
        self, model: str, process: ModelProcess, pid: int, started_with: ModelConfig
    ) -> None:
        """One process's measurements, while it is ready or asleep (one task per pid)."""
        try:
            while process.pid == pid and process.state in _MEASURED_STATES:
                waking = process.state is ProcessState.STARTING  # not measured mid-wake
                if not waking and not await self._measure_once(model, process, pid, started_with):
                    return
                await trio.sleep(self._measure_every)
        finally:
            self._measuring.discard(pid)

    async def _measure_once(
        self, model: str, process: ModelProcess, pid: int, started_with: ModelConfig
    ) -> bool:
        """Report one measurement of ``pid``; False when the process is going."""
        assert self._footprint is not None
        state = process.state
        if model in self._falling_asleep or state not in _MEASURABLE:
            return True  # mid-sleep, or going: not a footprint of either kind
        try:
            footprint = await self._footprint(pid)
        except OSError as exc:  # /proc vanished under us: the process is going
            log.debug("measuring %s failed: %s", model, exc)
            return False
        if process.pid != pid:
            return False  # a measurement of a process that is gone means nothing
        # Else it fell asleep, woke or began its sleep call meanwhile: which is it?
        if process.state is state and model not in self._falling_asleep:
            asleep = state is ProcessState.SLEEPING
            self._send.send_nowait(_Measured(model, footprint, started_with, asleep))
        return True

    async def _stop_one(self, model: str, reason: StopReason, may_sleep: bool = True) -> None:
        """Stop ``model``; a ``sleep:`` model sleeps instead for a swap (when the swap lets
        it: fit may stop it) or a TTL."""
        process = self._processes.get(model)
        if process is None:  # retired meanwhile (it was stopped already)
            return
        if process.state is ProcessState.SLEEPING and reason in _SLEEP_INSTEAD and may_sleep:
            return  # asleep already (a TTL's sleep before this swap chose it): stays so
        if reason in _SLEEP_INSTEAD and may_sleep and process.model.sleep is not None:
            self._falling_asleep.add(model)
            try:
                slept = await process.sleep(reason=reason)
            finally:
                self._falling_asleep.discard(model)
        else:
            slept = False
        if slept:
            # Asleep: it holds no accelerator memory and wakes for its next request.
            # Measured now, so the next placement counts what it holds asleep.
            pid = process.pid
            if self._footprint is not None and pid is not None:
                await self._measure_once(model, process, pid, process.model)
                self._start_measuring(model)
            return
        await process.stop(reason=reason)

    def _ways_to_go(
        self, target: str, victims: tuple[str, ...]
    ) -> tuple[frozenset[str], tuple[str, ...]]:
        """Which ``victims`` sleep instead of stopping, and which sleepers also stop.

        Fit by memory decided both (a model too big to sleep beside the others
        stops; a sleeper's host memory may be needed); without it, every
        ``sleep:`` victim sleeps.
        """
        policy = self._policy
        if not isinstance(policy, FitPolicy):
            return frozenset(v for v in victims if self._can_sleep(v)), ()
        plan = policy.latest(target)
        if plan is None or not set(plan.evict) <= set(victims):
            log.error("fit: no plan behind the swap to %s; its victims stop", target)
            return frozenset(), ()
        stop_asleep = tuple(m for m in plan.stop_asleep if m in self._processes)
        return frozenset(plan.sleep), stop_asleep

    def _adopt(self, policy: SwapPolicy) -> None:
        """Fit's plans for a target whose swap is under way are what-ifs (see
        :attr:`FitPolicy.swapping`): the plan behind the swap stays the latest."""
        if isinstance(policy, FitPolicy):
            policy.swapping = self._loading

    def _loading(self, model: str) -> bool:
        """A swap to ``model`` is under way (the scheduler's view)."""
        try:
            return self.scheduler.phase(model) is Phase.LOADING
        except KeyError:  # not (or no longer) a model of the scheduler's
            return False

    def _can_sleep(self, model: str) -> bool:
        process = self._processes.get(model)
        return process is not None and process.model.sleep is not None

    def _asleep(self) -> list[str]:
        """Models that hold their asleep need: asleep (or, asleep before, still being
        stopped) while the scheduler does not count them awake (COLD, or STOPPING: a
        victim or a TTL's sleeper), and sleepers a swap is stopping.

        A victim counts from the moment it sleeps, though the scheduler still sees it
        STOPPING: the step that turns it COLD places the queue at once, with the
        sleepers read at that step's start. (Fit counts a STOPPING model as running,
        with its whole need, so it is never counted twice.)
        """
        scheduler = self.scheduler
        known = set(scheduler.models())
        seen = self._seen_asleep
        seen.intersection_update(self._processes)
        asleep: list[str] = []
        for name, process in self._processes.items():
            if process.state is ProcessState.SLEEPING:
                seen.add(name)
            elif process.state is not ProcessState.STOPPING:
                seen.discard(name)  # awake, waking, or gone
            if name in self._sleeper_stops or (
                name in seen and name in known and scheduler.phase(name) in _NOT_AWAKE
            ):
                asleep.append(name)
        return asleep

    def _order_sleeper_stops(self, models: Sequence[str]) -> dict[str, trio.Event]:
        """Stops of sleeping ``models`` ordered now (the router task), before the tasks
        that send them run: a swap to one of them started from here on waits for its
        stop, so its process gets the stop first and the start after (a cold start),
        never a wake that the stop then cuts."""
        events: dict[str, trio.Event] = {}
        for model in models:
            events[model] = trio.Event()
            self._sleeper_stops.setdefault(model, []).append(events[model])
        return events

    async def _stop_sleeper(self, model: str, reason: StopReason, done: trio.Event) -> None:
        """Stop a model asleep (never just left asleep); ``done`` is set once it is gone."""
        try:
            await self._stop_one(model, reason, may_sleep=False)
        finally:
            done.set()
            stops = self._sleeper_stops.get(model, [])
            if done in stops:
                stops.remove(done)
            if not stops:
                self._sleeper_stops.pop(model, None)

    def _too_big_asleep(self, models: Sequence[str]) -> list[str]:
        """Of ``models`` (a TTL's), the ``sleep:`` ones that do not fit asleep beside the
        rest under fit by memory: they stop instead (fit counts a sleeper's host memory;
        a TTL must not overcommit it). The others of the batch count as asleep."""
        ledger = self.ledger
        if ledger is None or not ledger.resources:
            return []
        running = self.scheduler.running()
        awake = [m for m in running if m not in models]
        asleep = [m for m in self._asleep() if m not in running]
        asleep += [m for m in models if self._can_sleep(m)]
        too_big: list[str] = []
        for model in models:
            if model not in asleep:
                continue  # no sleep: (it stops anyway)
            others = [m for m in asleep if m != model]
            if not ledger.fits_asleep(model, awake, others):
                too_big.append(model)
                asleep.remove(model)
        if too_big:
            log.info("ttl: %s would not fit asleep (fit by memory): stopped", ", ".join(too_big))
        return too_big

    async def _run_stops(
        self,
        stop_id: int,
        models: tuple[str, ...],
        reason: StopReason,
        sleepers: Mapping[str, trio.Event],
        no_sleep: AbstractSet[str] = frozenset(),
    ) -> None:
        """Stop ``models`` (those of ``no_sleep`` even if they could sleep instead), and
        the ``sleepers`` an unload stops with them."""
        async with trio.open_nursery() as nursery:
            for model in models:
                nursery.start_soon(self._stop_one, model, reason, model not in no_sleep)
            for sleeper, done in sleepers.items():
                nursery.start_soon(self._stop_sleeper, sleeper, reason, done)
        self._send.send_nowait(_StopsDone(stop_id))

    async def _stop_all(self, reply: Reply[None]) -> None:
        async with trio.open_nursery() as nursery:
            for model in self._processes:
                nursery.start_soon(self._stop_one, model, StopReason.SHUTDOWN)
        reply.set(None)


#: Stops a ``sleep:`` model answers by sleeping (an unload, a reload, shutdown stop it).
_SLEEP_INSTEAD: Final = frozenset({StopReason.SWAP, StopReason.TTL})
#: Phases in which the scheduler does not count a model awake (a sleeper may be asleep).
_NOT_AWAKE: Final = frozenset({Phase.COLD, Phase.STOPPING})
#: States in which a process is measured (STARTING: a wake; not measured, not ended).
_MEASURED_STATES: Final = frozenset(
    {ProcessState.READY, ProcessState.SLEEPING, ProcessState.STARTING}
)
#: States whose footprint means something: awake (READY) or asleep (SLEEPING).
_MEASURABLE: Final = frozenset({ProcessState.READY, ProcessState.SLEEPING})


def _admission(request_id: int, decisions: Sequence[Decision]) -> Admission | None:
    """What a just-arrived request waits for, from the scheduler's decisions on it.

    None when it was granted or rejected at once (no wait to announce).
    """
    for decision in decisions:
        match decision:
            case Grant(request_id=rid) | Reject(request_id=rid) if rid == request_id:
                return None
            case Queued(request_id=rid) if rid == request_id:
                return Admission.QUEUED
            case Joined(request_id=rid) if rid == request_id:
                return Admission.LOADING
            case StartSwap():
                return Admission.LOADING  # the request's own load (no Joined for the starter)
    log.error("scheduler bug: no decision about request %d in %s", request_id, decisions)
    return Admission.QUEUED


def _limits(model: ModelConfig, settings: SchedulerConfig) -> ModelLimits:
    return ModelLimits(
        concurrency_limit=model.concurrency_limit,
        ttl=model.ttl,
        swappable=model.swappable,
        priority=settings.priority.get(model.id, 0),
    )
