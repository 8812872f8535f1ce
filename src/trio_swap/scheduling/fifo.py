"""When each request runs: a pure state machine over requests, swaps and stops.

The router feeds it one event at a time (``on_*`` methods, plain ``def``, so a
decision can never be interrupted half-way) and carries out the decisions it
returns. No I/O, no clock of its own: ``now`` is passed in, so tests drive it
with numbers.

Each request ends in exactly one of: :class:`Grant` (then it is in flight
until :meth:`FifoScheduler.on_finished`), or :class:`Reject`. Placing a
request (``_place``) follows llama-swap's decision tree:

1. join: a swap for the model is under way: wait for it (one load serves all);
   but first (1b): a stop of the model is under way: queue until it is done;
2. compute the evictions the policy asks for; (2b) a ready model whose
   settings a reload changed takes no new request: queue until it restarts;
3. fast path: the model is ready, nothing to evict, no swap is evicting it: grant;
4. collision with a swap under way (it evicts this model, or this swap would
   evict its target or one of its victims): queue;
5. busy victim: a model to evict still has requests in flight: queue
   (a swap never cuts a request off, DESIGN invariant 3);
6. otherwise start a swap.

Queued requests are placed again, in order, whenever something changes
(swap done, a model's last request done, a stop done, a crash, a reload).

A config reload arrives as :meth:`FifoScheduler.on_reconfigure`: new models,
limits, settings and policy all at once, between two events. Its rules are
in that method's docstring and docs/reload.md.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from typing import final

from trio_swap.errors import (
    ModelNotFound,
    ModelPinned,
    ModelUnloaded,
    QueueFull,
    RateLimited,
    ShuttingDown,
    SwapError,
)
from trio_swap.policy.base import Placement, SwapPolicy
from trio_swap.reasons import StopReason
from trio_swap.scheduling.decisions import (
    Decision,
    Grant,
    Joined,
    Queued,
    Reject,
    Retire,
    StartSwap,
    StopModels,
)

__all__ = ["DEFAULT_MAX_WAIT", "FifoScheduler", "ModelLimits", "Phase"]


class Phase(enum.Enum):
    """The router's view of a model, changed only by its own decisions and reports."""

    COLD = "cold"  # no process (or it crashed)
    LOADING = "loading"  # target of a swap under way
    READY = "ready"  # the last swap to it succeeded; requests are granted
    STOPPING = "stopping"  # a swap, TTL or unload is stopping it


_RUNNING = (Phase.LOADING, Phase.READY, Phase.STOPPING)

#: Once the oldest queued request has waited this long (seconds), new requests may
#: no longer take the fast path onto a model it needs evicted (llama-swap #612).
DEFAULT_MAX_WAIT = 30.0


class _Stage(enum.Enum):
    QUEUED = "queued"
    JOINED = "joined"  # waiting on a swap whose target is its model
    GRANTED = "granted"  # in flight


@final
class ModelLimits:
    """The per-model settings the scheduler needs."""

    __slots__ = ("concurrency_limit", "priority", "swappable", "ttl")

    def __init__(
        self,
        *,
        concurrency_limit: int,
        ttl: float,
        swappable: bool = True,
        priority: int = 0,
    ) -> None:
        self.concurrency_limit = concurrency_limit
        self.ttl = ttl
        #: False: once loaded, only an explicit unload stops it (no swap, no TTL).
        self.swappable = swappable
        #: Queued requests of higher priority go first; FIFO within a level.
        self.priority = priority


@final
class _Model:
    __slots__ = (
        "idle_since",
        "in_flight",
        "limits",
        "phase",
        "ready_since",
        "removed",
        "reserved",
        "stale",
    )

    def __init__(self, limits: ModelLimits) -> None:
        self.limits = limits
        self.phase = Phase.COLD
        # Invariant: in_flight == number of GRANTED requests for this model.
        self.in_flight = 0
        # Invariant: reserved == number of requests for this model in any stage.
        self.reserved = 0
        self.idle_since = 0.0
        #: When the last load of this model completed (for ``min_resident``).
        self.ready_since = -math.inf
        #: A reload changed its process settings while it ran: no new grants, and
        #: it stops once its requests in flight finish. Read only while READY
        #: (the next successful load clears it).
        self.stale = False
        #: A reload removed it: requests are refused; it stops once idle and is
        #: retired once stopped. Invariant: True exactly for names in ``_removed``.
        self.removed = False


@final
class _Request:
    __slots__ = ("arrived", "model", "stage", "swap_id")

    def __init__(self, model: str, arrived: float) -> None:
        self.model = model
        self.arrived = arrived
        self.stage = _Stage.QUEUED
        self.swap_id = 0


@final
class _Swap:
    __slots__ = ("requeue", "target", "victims", "waiters")

    def __init__(self, target: str, victims: tuple[str, ...]) -> None:
        self.target = target
        self.victims = victims
        self.waiters: list[int] = []
        #: A reload changed the target's process settings mid-load: the load is
        #: being stopped, and its waiters go back to the queue for the new process.
        self.requeue = False


@final
class FifoScheduler:
    """First come, first served, with collation onto loads already under way."""

    def __init__(
        self,
        models: Mapping[str, ModelLimits],
        policy: SwapPolicy,
        *,
        max_wait: float = DEFAULT_MAX_WAIT,
        min_resident: float = 0.0,
        max_queue: int = 0,
    ) -> None:
        self._max_wait = max_wait
        self._min_resident = min_resident
        #: Most requests waiting (queued or joined to a load) at once; 0 = unlimited.
        self._max_queue = max_queue
        self._models = {name: _Model(limits) for name, limits in models.items()}
        self._policy = policy
        self._requests: dict[int, _Request] = {}
        self._queue: list[int] = []
        self._swaps: dict[int, _Swap] = {}
        self._stops: dict[int, tuple[str, ...]] = {}
        #: Models a reload removed that still have a process or requests.
        self._removed: set[str] = set()
        self._next_swap = 1
        self._next_stop = 1
        self._shutting_down = False
        #: The latest ``now`` seen by a placement (next_deadline takes no clock).
        self._now_hint = -math.inf

    # -- read-only views (for /api/models and tests) --------------------------

    def phase(self, model: str) -> Phase:
        return self._models[model].phase

    def in_flight(self, model: str) -> int:
        return self._models[model].in_flight

    def queued(self, model: str) -> int:
        return sum(1 for rid in self._queue if self._requests[rid].model == model)

    def queue_position(self, request_id: int) -> int | None:
        """1-based place of a queued request, or None when it is not queued."""
        try:
            return self._queue.index(request_id) + 1
        except ValueError:
            return None

    def running(self) -> list[str]:
        return [name for name, m in self._models.items() if m.phase in _RUNNING]

    def models(self) -> list[str]:
        """Every model with a slot: the config's, plus removed ones not yet retired."""
        return list(self._models)

    def pending_requests(self) -> int:
        return len(self._requests)

    # -- events ---------------------------------------------------------------

    def on_request(self, request_id: int, model: str, now: float) -> list[Decision]:
        """A request for ``model`` (already resolved to an id) arrived."""
        if self._shutting_down:
            return [Reject(request_id=request_id, error=ShuttingDown())]
        slot = self._models.get(model)
        if slot is None or slot.removed:  # resolved just before a reload removed it
            return [Reject(request_id=request_id, error=ModelNotFound(model))]
        if slot.reserved >= slot.limits.concurrency_limit:
            return [
                Reject(
                    request_id=request_id,
                    error=RateLimited(model, slot.limits.concurrency_limit),
                )
            ]
        request = _Request(model, now)
        if (
            self._max_queue
            and self._waiting() >= self._max_queue
            and not self._grantable(model, request, now)
        ):
            return [Reject(request_id=request_id, error=QueueFull(self._max_queue))]
        slot.reserved += 1
        self._requests[request_id] = request
        decisions = self._place(request_id, now)
        if decisions is None:
            self._enqueue(request_id)
            position = self.queue_position(request_id) or 0
            return [Queued(request_id=request_id, model=model, position=position)]
        return decisions

    def on_finished(self, request_id: int, now: float) -> list[Decision]:
        """The request's handler is done: served, failed, or its client went away."""
        request = self._requests.pop(request_id, None)
        if request is None:  # already rejected
            return []
        slot = self._models[request.model]
        slot.reserved -= 1
        if request.stage is _Stage.GRANTED:
            slot.in_flight -= 1
            if slot.in_flight == 0:
                slot.idle_since = now
                decisions = self._stop_if_outdated(request.model)
                decisions.extend(self._retire_removed())
                decisions.extend(self._drain(now))
                return decisions
        elif request.stage is _Stage.QUEUED:
            self._queue.remove(request_id)
        else:
            swap = self._swaps[request.swap_id]
            swap.waiters.remove(request_id)
            if not swap.waiters and not self.queued(swap.target):
                # Nobody wants this load any more (llama-swap #727): stop it instead
                # of finishing a load of minutes for no one.
                return [self._stop((swap.target,), StopReason.ABANDONED)]
        return []

    def on_swap_done(
        self, swap_id: int, error: SwapError | None, now: float, *, retry: bool = False
    ) -> list[Decision]:
        """The swap task finished: victims are stopped; the target is ready, or ``error``.

        ``retry`` (with an error): the router learned why the load failed (it ran
        out of memory beside the models left running) and the policy now asks
        for more room: the waiters are queued again instead of getting the error.
        """
        swap = self._swaps.pop(swap_id)
        for victim in swap.victims:
            if self._models[victim].phase is Phase.STOPPING:
                self._models[victim].phase = Phase.COLD
        target = self._models[swap.target]
        decisions: list[Decision] = []
        stopping = any(swap.target in models for models in self._stops.values())
        if error is not None and retry and not (target.removed or swap.requeue or stopping):
            target.phase = Phase.COLD
            for rid in swap.waiters:
                self._requests[rid].stage = _Stage.QUEUED
                self._enqueue(rid)
        elif swap.requeue or target.removed:
            # A reload stopped this load (however it ended): nobody is served by it.
            target.phase = Phase.STOPPING if stopping else Phase.COLD
            for rid in swap.waiters:
                if target.removed:
                    decisions.append(self._reject(rid, ModelNotFound(swap.target)))
                else:
                    self._requests[rid].stage = _Stage.QUEUED
                    self._enqueue(rid)
        elif error is None:
            target.phase = Phase.STOPPING if stopping else Phase.READY
            target.stale = False  # this load ran the current settings
            target.idle_since = now
            target.ready_since = now
            for rid in swap.waiters:
                decisions.append(self._grant(rid))
        else:
            # An unload that aborted this load may still be stopping the process.
            target.phase = Phase.STOPPING if stopping else Phase.COLD
            for rid in swap.waiters:
                decisions.append(self._reject(rid, error))
        decisions.extend(self._retire_removed())
        decisions.extend(self._drain(now))
        return decisions

    def on_policy_inputs_changed(self, now: float) -> list[Decision]:
        """The policy's inputs changed (a model was measured): place the queue again."""
        return self._drain(now)

    def on_model_stopped(self, model: str, now: float) -> list[Decision]:
        """A model's process that was ready has stopped.

        Expected after a swap, TTL or unload (the phase already says STOPPING or
        moved on). Otherwise it crashed, or a stop raced a swap: the model is
        cold, and the next request starts it again.
        """
        slot = self._models.get(model)
        if slot is not None and slot.phase is Phase.READY:
            slot.phase = Phase.COLD
            return [*self._retire_removed(), *self._drain(now)]
        return []

    def on_unload(self, models: Iterable[str], now: float) -> list[Decision]:
        """Stop these models now; requests waiting for them get :class:`ModelUnloaded`.

        Requests already in flight on them are cut off: an unload is explicit.
        """
        decisions: list[Decision] = []
        to_stop: list[str] = []
        for model in models:
            slot = self._models.get(model)
            if slot is None:  # retired after a reload removed it
                continue
            for rid in list(self._queue):
                if self._requests[rid].model == model:
                    self._queue.remove(rid)
                    decisions.append(self._reject(rid, ModelUnloaded(model)))
            if slot.phase is not Phase.COLD:
                to_stop.append(model)
            if slot.phase is Phase.READY:
                slot.phase = Phase.STOPPING
            # LOADING: stopping its process aborts the start; the swap then reports an error.
        stop = self._stop(tuple(to_stop), StopReason.UNLOAD)
        decisions.append(stop)
        return decisions

    def on_stops_done(self, stop_id: int, now: float) -> list[Decision]:
        for model in self._stops.pop(stop_id):
            slot = self._models[model]
            if slot.phase is Phase.STOPPING and not self._is_swap_victim(model):
                slot.phase = Phase.COLD
        return [*self._retire_removed(), *self._drain(now)]

    def on_tick(self, now: float) -> list[Decision]:
        """Time passed: unload models idle for longer than their TTL."""
        expired = tuple(
            name for name, slot in self._models.items() if self._ttl_deadline(name, slot) <= now
        )
        decisions: list[Decision] = []
        if expired:
            for name in expired:
                self._models[name].phase = Phase.STOPPING
            decisions.append(self._stop(expired, StopReason.TTL))
        decisions.extend(self._drain(now))  # a minResident protection may have ended
        return decisions

    def next_deadline(self) -> float:
        """When :meth:`on_tick` has work next (``math.inf``: never)."""
        deadline = min(
            (self._ttl_deadline(name, slot) for name, slot in self._models.items()),
            default=math.inf,
        )
        if self._queue and self._min_resident > 0:
            for slot in self._models.values():
                until = slot.ready_since + self._min_resident
                if slot.phase is Phase.READY and self._now_hint < until < deadline:
                    deadline = until
        return deadline

    def on_shutdown(self) -> list[Decision]:
        """Reject everything still waiting; later requests are rejected on arrival."""
        self._shutting_down = True
        decisions: list[Decision] = []
        for rid, request in list(self._requests.items()):
            if request.stage is not _Stage.GRANTED:
                decisions.append(self._reject(rid, ShuttingDown()))
        self._queue.clear()
        for swap in self._swaps.values():
            swap.waiters.clear()
        return decisions

    def on_reconfigure(
        self,
        models: Mapping[str, ModelLimits],
        policy: SwapPolicy,
        *,
        restart: AbstractSet[str] = frozenset(),
        max_wait: float = DEFAULT_MAX_WAIT,
        min_resident: float = 0.0,
        max_queue: int = 0,
        now: float,
    ) -> list[Decision]:
        """A config reload: the new models, limits, settings and policy, all in one step.

        ``restart`` names the kept models whose running process no longer matches
        the new settings (their supervisor starts the new settings next time; this
        decides when the old process goes). A READY model not in it is current:
        if an earlier reload had marked it stale, that is undone. Requests already
        granted are never cut (invariant 3).

        1. A new model starts COLD; a kept one takes its new limits in place.
        2. A kept model in ``restart`` (or one removed earlier and back before its
           old process was retired): READY: it is *stale*: no new grants, and it
           stops as soon as nothing is in flight on it; new requests wait and
           start the new settings. LOADING: the load is stopped and its waiters
           are queued again, for the new process. COLD or STOPPING: nothing to do.
        3. A removed model: its queued requests get ModelNotFound, a load of it
           is stopped (its waiters get ModelNotFound too), it stops once idle,
           and is retired (:class:`Retire`) once stopped. While it still runs,
           every load evicts it (the new policy does not know it).
        4. The queue is placed again under the new policy.
        """
        self._policy = policy
        self._max_wait = max_wait
        self._min_resident = min_resident
        self._max_queue = max_queue
        decisions: list[Decision] = []
        cancel_changed: list[str] = []
        cancel_removed: list[str] = []
        for name, limits in models.items():  # (1), (2)
            slot = self._models.get(name)
            if slot is None:
                self._models[name] = _Model(limits)
                continue
            slot.limits = limits
            back = slot.removed
            if back:
                slot.removed = False
                self._removed.discard(name)
            if name not in restart and not back:
                # A second reload put back what the running process was started
                # with: it is current again, no restart needed.
                if slot.phase is Phase.READY:
                    slot.stale = False
                continue
            if slot.phase is Phase.READY:
                slot.stale = True
            elif slot.phase is Phase.LOADING:
                for swap in self._swaps.values():
                    if swap.target == name:
                        swap.requeue = True
                cancel_changed.append(name)
        for name, slot in self._models.items():  # (3)
            if name in models or slot.removed:
                continue
            slot.removed = True
            self._removed.add(name)
            for rid in list(self._queue):
                if self._requests[rid].model == name:
                    self._queue.remove(rid)
                    decisions.append(self._reject(rid, ModelNotFound(name)))
            if slot.phase is Phase.LOADING:
                cancel_removed.append(name)
        if cancel_removed or cancel_changed:
            decisions.append(self._stop((*cancel_removed, *cancel_changed), StopReason.RELOAD))
        for name in list(self._models):
            decisions.extend(self._stop_if_outdated(name))
        decisions.extend(self._retire_removed())
        decisions.extend(self._drain(now))  # (4)
        return decisions

    # -- internals --------------------------------------------------------------

    def _ttl_deadline(self, name: str, slot: _Model) -> float:
        if (
            slot.limits.ttl <= 0
            or not slot.limits.swappable
            or slot.phase is not Phase.READY
            or slot.in_flight
            or slot.reserved
            or self._is_swap_victim(name)
        ):
            return math.inf
        return slot.idle_since + slot.limits.ttl

    def _is_swap_victim(self, model: str) -> bool:
        return any(model in swap.victims for swap in self._swaps.values())

    def _stop_if_outdated(self, name: str) -> list[Decision]:
        """Stop a stale or removed model once nothing is in flight on it (a reload)."""
        slot = self._models[name]
        if slot.phase is not Phase.READY or slot.in_flight or not (slot.stale or slot.removed):
            return []
        slot.phase = Phase.STOPPING
        return [self._stop((name,), StopReason.RELOAD)]

    def _retire_removed(self) -> list[Decision]:
        """Forget removed models that are stopped and that nothing refers to any more."""
        retired: list[Decision] = []
        for name in sorted(self._removed):
            slot = self._models[name]
            if (
                slot.phase is Phase.COLD
                and not slot.reserved
                and not any(name == s.target or name in s.victims for s in self._swaps.values())
                and not any(name in models for models in self._stops.values())
            ):
                del self._models[name]
                self._removed.discard(name)
                retired.append(Retire(model=name))
        return retired

    def _evictions(self, target: str, running: Sequence[str]) -> tuple[str, ...]:
        """The policy's evictions; a load also evicts every removed model still running.

        A removed model is unknown to the new policy, and nothing says it may
        share the machine with the model being loaded, so it goes first (once
        its requests in flight are done, like any victim).
        """
        context = self._placement(target)
        if not self._removed:
            return self._policy.evictions(target, running, context)
        known = [name for name in running if name not in self._removed]
        evict = self._policy.evictions(target, known, context)
        if self._models[target].phase is Phase.READY:
            return evict
        return evict + tuple(name for name in running if name in self._removed)

    def _placement(self, target: str) -> Placement:
        """What a policy may weigh besides the running set (fit by memory does)."""
        busy: set[str] = set()
        pinned: set[str] = set()
        stopping: set[str] = set()
        for name, slot in self._models.items():
            if slot.in_flight:
                busy.add(name)
            if not slot.limits.swappable and not slot.removed:
                pinned.add(name)
            if slot.phase is Phase.STOPPING:
                stopping.add(name)
        return Placement(
            busy=frozenset(busy),
            pinned=frozenset(pinned),
            stopping=frozenset(stopping),
            resident=self._models[target].phase is Phase.READY,
        )

    def _stop(self, models: tuple[str, ...], reason: StopReason) -> StopModels:
        stop_id = self._next_stop
        self._next_stop += 1
        self._stops[stop_id] = models
        return StopModels(stop_id=stop_id, models=models, reason=reason)

    def _grant(self, request_id: int) -> Grant:
        request = self._requests[request_id]
        request.stage = _Stage.GRANTED
        self._models[request.model].in_flight += 1
        return Grant(request_id=request_id, model=request.model)

    def _reject(self, request_id: int, error: SwapError) -> Reject:
        request = self._requests.pop(request_id)
        self._models[request.model].reserved -= 1
        return Reject(request_id=request_id, error=error)

    def _place(self, request_id: int, now: float) -> list[Decision] | None:
        """Try to move a request on (branches numbered as in the module docstring)."""
        request = self._requests[request_id]
        target = request.model
        # (1b) a stop of it is under way (TTL, unload, reload, a load nobody waits
        # for): load it again once that is done, so its process gets the stop and
        # the start in that order (and nobody joins a load that is being stopped)
        if any(target in models for models in self._stops.values()):
            return None
        # (1) join a swap already loading this model
        for swap_id, swap in self._swaps.items():
            if swap.target == target:
                request.stage = _Stage.JOINED
                request.swap_id = swap_id
                swap.waiters.append(request_id)
                return [Joined(request_id=request_id, model=target, swap_id=swap_id)]
        # (2) what the policy wants stopped
        running = [name for name in self.running() if name != target]
        evict = self._evictions(target, running)
        slot = self._models[target]
        # (2b) it runs settings a reload replaced: wait until it stops, then load anew
        if slot.phase is Phase.READY and slot.stale:
            return None
        # (3) fast path, unless a request queued too long needs this model gone
        if slot.phase is Phase.READY and not evict and not self._is_swap_victim(target):
            if self._starves(target, request, now):
                return None  # queue behind it
            return [self._grant(request_id)]
        # (3b) a pinned model (swappable: false) is never evicted: say so at once;
        # a removed one is no longer pinned (it goes once idle: queue until then)
        pinned = [
            m for m in evict if not self._models[m].limits.swappable and not self._models[m].removed
        ]
        if pinned and self._models[pinned[0]].phase is not Phase.STOPPING:
            return [self._reject(request_id, ModelPinned(target, pinned[0]))]
        # (3c) a freshly loaded victim stays for min_resident seconds
        self._now_hint = now
        if any(
            self._models[m].phase is Phase.READY
            and now < self._models[m].ready_since + self._min_resident
            for m in evict
        ):
            return None
        # (4) collision with a swap under way
        for swap in self._swaps.values():
            if (
                target in swap.victims
                or swap.target in evict
                or not set(evict).isdisjoint(swap.victims)
            ):
                return None
        # (5) a victim still serves requests: wait for them to finish
        if any(self._models[victim].in_flight for victim in evict):
            return None
        # (6) start a swap
        swap_id = self._next_swap
        self._next_swap += 1
        swap = _Swap(target, evict)
        self._swaps[swap_id] = swap
        for victim in evict:
            self._models[victim].phase = Phase.STOPPING
        slot.phase = Phase.LOADING
        request.stage = _Stage.JOINED
        request.swap_id = swap_id
        swap.waiters.append(request_id)
        return [StartSwap(swap_id=swap_id, target=target, victims=evict)]

    def _waiting(self) -> int:
        """Requests admitted but not granted: queued, or joined to a load."""
        return sum(1 for r in self._requests.values() if r.stage is not _Stage.GRANTED)

    def _grantable(self, target: str, request: _Request, now: float) -> bool:
        """Would this request take the fast path right now (no queue, no load)?"""
        slot = self._models[target]
        if slot.phase is not Phase.READY or slot.stale or self._is_swap_victim(target):
            return False
        running = [name for name in self.running() if name != target]
        if self._evictions(target, running):
            return False
        return not self._starves(target, request, now)

    def _enqueue(self, request_id: int) -> None:
        """Insert before the first queued request of strictly lower priority."""
        level = self._models[self._requests[request_id].model].limits.priority
        for index, rid in enumerate(self._queue):
            if self._models[self._requests[rid].model].limits.priority < level:
                self._queue.insert(index, request_id)
                return
        self._queue.append(request_id)

    def _starves(self, target: str, request: _Request, now: float) -> bool:
        """Would granting ``target`` now keep delaying a request queued over ``max_wait``?

        Without this bound a steady stream of requests for a ready model holds
        back, forever, a queued request that needs it evicted.
        """
        running = self.running()
        for rid in self._queue:
            waiting = self._requests[rid]
            if now - waiting.arrived < self._max_wait:
                continue
            if waiting is request or waiting.model == target:
                continue
            others = [name for name in running if name != waiting.model]
            if target in self._evictions(waiting.model, others):
                return True
        return False

    def _drain(self, now: float) -> list[Decision]:
        decisions: list[Decision] = []
        for rid in list(self._queue):
            placed = self._place(rid, now)
            if placed is not None:
                self._queue.remove(rid)
                decisions.extend(placed)
        return decisions
