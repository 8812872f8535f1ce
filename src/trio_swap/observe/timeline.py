"""What each model's process did over the last hour, for the web UI's timeline.

A :class:`Timeline` is one more :class:`~trio_swap.observe.hooks.ProcessHooks`
observer (beside the metrics, through a
:class:`~trio_swap.observe.hooks.HookFanout`): the process supervisors tell it
each transition, and it keeps, per model, *bands* of wall-clock time:

========== ============================== ==========================================
band       opens at                       closes at
========== ============================== ==========================================
loading    ``starting``                   ``ready``; ``stopping``; ``stopped`` (a
                                          failed start: reason ``"failed"``)
ready      ``ready``                      ``stopping``; ``stopped`` (a crash: reason
                                          ``"crashed"``)
stopping   ``stopping`` (reason: the      ``stopped``
           :class:`~trio_swap.reasons.StopReason`'s value)
sleeping   ``slept`` (reason: the         ``woke`` (a ready band follows);
           StopReason's value: swap, ttl) ``stopping``; ``stopped``
========== ============================== ==========================================

At most one band per model is open (``end`` is None), always the last one.
The router calls :meth:`Timeline.evicted` just before it stops a model for a
swap (or puts it to sleep, or stops it asleep); who needed the room and why
goes on that model's next stopping or sleeping band.

Memory is bounded whatever happens: closed bands older than the horizon (an
hour) are dropped, and a model keeps at most ``max_bands`` bands (a model that
crash-loops drops its oldest first). Hooks run on the supervisors' tasks and
routes on the HTTP tasks, all in trio's one thread: no locks.
"""

from __future__ import annotations

import enum
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Final, final

import msgspec

from trio_swap.observe.hooks import ProcessHooks
from trio_swap.reasons import StopReason

__all__ = ["DEFAULT_HORIZON", "DEFAULT_MAX_BANDS", "BandState", "Timeline", "TimelineCounts"]

#: Seconds of history kept: the UI shows the last hour.
DEFAULT_HORIZON: Final = 3600.0
#: Bands kept per model: a life is three bands, so ~660 loads an hour before
#: the oldest go (a crash loop restarting every few seconds stays bounded).
DEFAULT_MAX_BANDS: Final = 2000

#: ``reason`` of a loading band whose start failed.
FAILED: Final = "failed"
#: ``reason`` of a ready band whose process exited by itself.
CRASHED: Final = "crashed"
#: Stop reasons counted as evictions (as in ``trio_swap_model_evictions_total``).
_EVICTIONS: Final = frozenset(reason.value for reason in StopReason if reason.is_eviction)


class BandState(enum.StrEnum):
    LOADING = "loading"  # spawned, waiting for the health check
    READY = "ready"  # serving
    STOPPING = "stopping"  # told to stop, not gone yet
    SLEEPING = "sleeping"  # ``sleep:``: the process lives, its GPU memory released


@final
class _Band(msgspec.Struct):
    """One stretch of a model's life. Mutable: the open band gets its end (and reasons) later."""

    state: BandState
    start: float
    end: float | None = None  # None while open; invariant: only a lane's last band is open
    reason: str | None = None
    evicted_by: str | None = None
    why: str | None = None
    #: A stopping band of a model that was asleep (not counted as an eviction again).
    asleep: bool = False

    def overlaps(self, since: float, until: float) -> bool:
        return since <= until and self.start <= until and (self.end is None or self.end >= since)


@final
class _Eviction(msgspec.Struct, frozen=True):
    by: str
    why: str


@final
class _Lane:
    """One model's bands, oldest first."""

    def __init__(self, max_bands: int) -> None:
        self.bands: deque[_Band] = deque(maxlen=max_bands)
        #: An eviction announced before its ``stopping`` hook; dropped when the
        #: process turns out to be gone already (no stopping band will come).
        self.pending: _Eviction | None = None

    @property
    def open(self) -> _Band | None:
        last = self.bands[-1] if self.bands else None
        return last if last is not None and last.end is None else None

    def close(self, now: float) -> _Band | None:
        band = self.open
        if band is not None:
            band.end = now
        return band

    def trim(self, oldest: float) -> None:
        """Drop closed bands that ended before ``oldest`` (bands end in order)."""
        while self.bands and self.bands[0].end is not None and self.bands[0].end < oldest:
            self.bands.popleft()


@final
class TimelineCounts(msgspec.Struct, frozen=True):
    """What the timeline's summary line says about a window."""

    loads: int  # starts in the window, failed ones included
    failed_loads: int  # of those, the ones that never became ready
    evictions: int  # stops and sleeps in the window for an eviction reason (not shutdown,
    # not crashes, not the later stop of a model already asleep)
    crashes: int  # ready processes that exited by themselves, in the window
    loading_seconds: float  # time spent loading within the window, all models together


@final
class Timeline(ProcessHooks):
    """Per-model bands of loading / ready / stopping, for ``GET /api/timeline``.

    Args:
        clock: wall-clock seconds (``time.time``); tests pass a fake.
        horizon: seconds of history kept.
        max_bands: most bands kept per model.
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.time,
        horizon: float = DEFAULT_HORIZON,
        max_bands: int = DEFAULT_MAX_BANDS,
    ) -> None:
        if horizon <= 0 or max_bands < 1:
            raise ValueError("horizon must be positive and max_bands at least 1")
        self._clock = clock
        self.horizon = horizon
        self._max_bands = max_bands
        self._lanes: dict[str, _Lane] = {}  # first seen first

    # -- the hooks (supervisor tasks) -------------------------------------------

    def starting(self, model: str) -> None:
        now = self._clock()
        lane = self._lane(model, now)
        lane.close(now)  # defensive: every life ends with ``stopped``
        lane.pending = None  # an eviction of a process that was already gone
        lane.bands.append(_Band(BandState.LOADING, now))

    def ready(self, model: str, seconds: float) -> None:
        now = self._clock()
        lane = self._lane(model, now)
        lane.close(now)
        lane.bands.append(_Band(BandState.READY, now))

    def start_failed(self, model: str) -> None:
        now = self._clock()
        lane = self._lane(model, now)
        band = lane.open
        if band is not None and band.state is BandState.LOADING:
            band.reason = FAILED  # ends when the process is gone
        elif band is None:  # could not even spawn: an instant, failed load
            lane.bands.append(_Band(BandState.LOADING, now, now, FAILED))

    def stopping(self, model: str, reason: StopReason) -> None:
        self._open(model, BandState.STOPPING, reason)

    def slept(self, model: str, reason: StopReason) -> None:
        self._open(model, BandState.SLEEPING, reason)

    def woke(self, model: str, seconds: float) -> None:
        self.ready(model, seconds)
        # An eviction told while it slept named a victim that stayed asleep: no
        # stopping or sleeping band took it, and none will now.
        self._lane(model, self._clock()).pending = None

    def _open(self, model: str, state: BandState, reason: StopReason) -> None:
        """Close the open band; open a ``state`` band carrying the pending eviction."""
        now = self._clock()
        lane = self._lane(model, now)
        closed = lane.close(now)
        band = _Band(state, now, reason=reason.value)
        if closed is not None and closed.state is BandState.SLEEPING:
            band.asleep = True  # the stop of a sleeper: its sleep was the eviction
        if lane.pending is not None:
            band.evicted_by, band.why = lane.pending.by, lane.pending.why
            lane.pending = None
        lane.bands.append(band)

    def crashed(self, model: str) -> None:
        lane = self._lane(model, self._clock())
        band = lane.open
        if band is not None and band.state is BandState.READY:
            band.reason = CRASHED  # ends when the process is gone

    def stopped(self, model: str) -> None:
        now = self._clock()
        lane = self._lane(model, now)
        lane.close(now)
        lane.pending = None

    # -- the router ---------------------------------------------------------------

    def evicted(self, model: str, *, by: str, why: str) -> None:
        """``model`` is about to be stopped to make room for ``by``, because ``why``.

        Called by the router just before the stop order. Goes on the model's
        stopping band: the current one if it is stopping already, else the
        next (dropped if the process ends or starts again without one).
        """
        lane = self._lane(model, self._clock())
        band = lane.open
        if band is not None and band.state is BandState.STOPPING:
            band.evicted_by, band.why = by, why
        else:
            lane.pending = _Eviction(by, why)

    # -- readers (HTTP tasks) -------------------------------------------------------

    def snapshot(self, since: float | None = None) -> dict[str, object]:
        """The bands overlapping ``[since, now]`` (``since`` defaults to, and is
        at most, a horizon ago), JSON-ready; lanes in the order models were first seen."""
        now = self._clock()
        since = self._window_start(since, now)
        lanes: list[dict[str, object]] = []
        for model, lane in self._lanes.items():
            bands = [msgspec.to_builtins(band) for band in lane.bands if band.overlaps(since, now)]
            if bands:
                lanes.append({"model": model, "bands": bands})
        return {"now": now, "since": since, "horizon": self.horizon, "lanes": lanes}

    def counts(self, since: float | None = None) -> TimelineCounts:
        """Loads, evictions, crashes and loading time within ``[since, now]``."""
        now = self._clock()
        since = self._window_start(since, now)
        loads = failed = evictions = crashes = 0
        loading = 0.0
        for band in self._bands():
            end = now if band.end is None else band.end
            if band.state is BandState.LOADING:
                loading += max(0.0, min(end, now) - max(band.start, since))
                if since <= band.start <= now:
                    loads += 1
                    failed += band.reason == FAILED
            elif band.state in (BandState.STOPPING, BandState.SLEEPING) and not band.asleep:
                evictions += since <= band.start <= now and band.reason in _EVICTIONS
            elif band.reason == CRASHED and band.end is not None:
                crashes += since <= band.end <= now
        return TimelineCounts(loads, failed, evictions, crashes, loading)

    # -- helpers ----------------------------------------------------------------------

    def _lane(self, model: str, now: float) -> _Lane:
        lane = self._lanes.get(model)
        if lane is None:
            self._trim(now)  # a new model: forget the ones with nothing left
            lane = self._lanes[model] = _Lane(self._max_bands)
        else:
            lane.trim(now - self.horizon)
        return lane

    def _trim(self, now: float) -> None:
        oldest = now - self.horizon
        for model in list(self._lanes):
            lane = self._lanes[model]
            lane.trim(oldest)
            if not lane.bands and lane.pending is None:
                del self._lanes[model]

    def _window_start(self, since: float | None, now: float) -> float:
        self._trim(now)
        oldest = now - self.horizon
        return oldest if since is None else max(since, oldest)

    def _bands(self) -> Iterable[_Band]:
        for lane in self._lanes.values():
            yield from lane.bands
