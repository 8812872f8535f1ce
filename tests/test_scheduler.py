"""The pure scheduler: events in, decisions out, no I/O and no clock (numbers stand in)."""

from __future__ import annotations

import math
from typing import Any

from tests.scheduler_support import Quiet
from trio_swap.errors import ModelStartFailed, ModelUnloaded, RateLimited, ShuttingDown
from trio_swap.policy import OneAtATime
from trio_swap.scheduling import (
    Decision,
    FifoScheduler,
    Grant,
    ModelLimits,
    Phase,
    Reject,
    StartSwap,
    StopModels,
)


def make(limit: int = 10, ttl: float = 0.0, models: str = "ABC") -> Any:
    return Quiet(
        FifoScheduler(
            {m: ModelLimits(concurrency_limit=limit, ttl=ttl) for m in models}, OneAtATime()
        )
    )


def only(decisions: list[Decision]) -> Decision:
    assert len(decisions) == 1, decisions
    return decisions[0]


def load(s: Any, rid: int, model: str, now: float = 0.0) -> None:
    """Request ``model`` and complete its swap, leaving request ``rid`` in flight."""
    swap = only(s.on_request(rid, model, now))
    assert isinstance(swap, StartSwap)
    assert s.on_swap_done(swap.swap_id, None, now) == [Grant(request_id=rid, model=model)]


def test_fifo_cold_request_starts_one_swap_and_later_requests_join_it() -> None:
    s = make()
    swap = only(s.on_request(1, "A", 0))
    assert swap == StartSwap(swap_id=1, target="A", victims=())
    assert s.on_request(2, "A", 0) == []  # joined, no second load
    assert s.phase("A") is Phase.LOADING
    assert s.on_swap_done(1, None, 1) == [
        Grant(request_id=1, model="A"),
        Grant(request_id=2, model="A"),
    ]
    assert s.in_flight("A") == 2


def test_fifo_ready_model_takes_the_fast_path() -> None:
    s = make()
    load(s, 1, "A")
    assert s.on_request(2, "A", 1) == [Grant(request_id=2, model="A")]


def test_fifo_swap_waits_for_in_flight_requests_on_its_victim() -> None:
    s = make()
    load(s, 1, "A")
    assert s.on_request(2, "B", 1) == []  # A still serves request 1: B queues
    assert s.phase("A") is Phase.READY
    swap = only(s.on_finished(1, 2))  # A is idle now: the swap may evict it
    assert swap == StartSwap(swap_id=2, target="B", victims=("A",))
    assert s.phase("A") is Phase.STOPPING
    assert s.on_swap_done(2, None, 3) == [Grant(request_id=2, model="B")]
    assert s.phase("A") is Phase.COLD
    assert s.running() == ["B"]


def test_fifo_abcabc_is_served_aabbcc_with_one_load_per_model() -> None:
    s = make()
    order: list[int] = []
    loads: list[str] = []

    def record(decisions: list[Decision]) -> None:
        for d in decisions:
            if isinstance(d, Grant):
                order.append(d.request_id)
            elif isinstance(d, StartSwap):
                loads.append(d.target)

    for rid, model in enumerate("ABCABC", start=1):
        record(s.on_request(rid, model, 0))
    record(s.on_swap_done(1, None, 1))  # A loaded: requests 1 and 4
    record(s.on_finished(1, 2))
    record(s.on_finished(4, 2))  # A idle: B's swap starts, request 5 joins it
    record(s.on_swap_done(2, None, 3))
    record(s.on_finished(2, 4))
    record(s.on_finished(5, 4))
    record(s.on_swap_done(3, None, 5))
    assert order == [1, 4, 2, 5, 3, 6]
    assert loads == ["A", "B", "C"]


def test_fifo_over_concurrency_limit_is_rejected_with_429() -> None:
    s = make(limit=2)
    s.on_request(1, "A", 0)
    s.on_request(2, "A", 0)
    reject = only(s.on_request(3, "A", 0))
    assert isinstance(reject, Reject) and isinstance(reject.error, RateLimited)
    assert reject.error.status == 429
    s.on_finished(2, 0)  # a cancelled waiter frees its slot
    assert s.on_request(4, "A", 0) == []


def test_fifo_failed_load_rejects_every_waiter_and_leaves_model_cold() -> None:
    s = make()
    s.on_request(1, "A", 0)
    s.on_request(2, "A", 0)
    error = ModelStartFailed("A", "exit status 1", ["boom"])
    decisions = s.on_swap_done(1, error, 1)
    assert decisions == [Reject(request_id=1, error=error), Reject(request_id=2, error=error)]
    assert s.phase("A") is Phase.COLD
    assert s.pending_requests() == 0
    assert isinstance(only(s.on_request(3, "A", 2)), StartSwap)  # the next request retries


def test_fifo_cancel_while_queued_or_joined_releases_the_slot() -> None:
    s = make(limit=1, models="AB")
    load(s, 1, "A")
    s.on_request(2, "B", 0)  # queued behind A's request
    assert s.queued("B") == 1
    assert s.on_finished(2, 0) == []  # client left
    assert s.queued("B") == 0
    assert s.pending_requests() == 1
    s.on_finished(1, 1)
    swap = only(s.on_request(3, "B", 2))
    assert isinstance(swap, StartSwap)
    s.on_finished(3, 2)  # left while joined to the load
    assert s.on_swap_done(swap.swap_id, None, 3) == []
    assert s.pending_requests() == 0
    assert s.in_flight("B") == 0


def test_fifo_crash_marks_model_cold_so_next_request_restarts_it() -> None:
    s = make()
    load(s, 1, "A")
    s.on_finished(1, 1)
    assert s.on_model_stopped("A", 2) == []
    assert s.phase("A") is Phase.COLD
    assert isinstance(only(s.on_request(2, "A", 3)), StartSwap)


def test_fifo_ttl_counts_from_the_end_of_the_last_request() -> None:
    s = make(ttl=10)
    load(s, 1, "A", now=0)
    assert s.next_deadline() == math.inf  # busy: no TTL while in flight
    s.on_finished(1, 5)
    assert s.next_deadline() == 15
    assert s.on_tick(14) == []
    stop = only(s.on_tick(15))
    assert stop == StopModels(stop_id=1, models=("A",), reason="ttl")
    assert s.phase("A") is Phase.STOPPING
    s.on_stops_done(1, 16)
    assert s.phase("A") is Phase.COLD


def test_fifo_unload_rejects_queued_requests_for_that_model() -> None:
    s = make()
    load(s, 1, "A")
    s.on_request(2, "B", 0)
    decisions = s.on_unload(["B", "A"], 1)
    reject, stop = decisions
    assert isinstance(reject, Reject) and isinstance(reject.error, ModelUnloaded)
    assert isinstance(stop, StopModels) and stop.models == ("A",)


def test_fifo_shutdown_rejects_waiters_and_new_requests() -> None:
    s = make()
    s.on_request(1, "A", 0)
    (reject,) = s.on_shutdown()
    assert isinstance(reject, Reject) and isinstance(reject.error, ShuttingDown)
    late = only(s.on_request(2, "B", 0))
    assert isinstance(late, Reject) and isinstance(late.error, ShuttingDown)


def test_fifo_request_for_a_victim_during_its_eviction_waits_then_reloads_it() -> None:
    s = make()
    load(s, 1, "A")
    s.on_finished(1, 1)
    swap_b = only(s.on_request(2, "B", 1))
    assert isinstance(swap_b, StartSwap) and swap_b.victims == ("A",)
    assert s.on_request(3, "A", 1) == []  # A is being evicted: wait, never grant a dying model
    assert s.on_swap_done(swap_b.swap_id, None, 2) == [Grant(request_id=2, model="B")]
    assert s.queued("A") == 1  # B serves request 2: A may not evict it yet
    swap_a = only(s.on_finished(2, 3))
    assert swap_a == StartSwap(swap_id=3, target="A", victims=("B",))


def test_fifo_starvation_bound_stops_the_fast_path_for_a_model_a_queued_request_needs() -> None:
    """llama-swap #612: steady A traffic must not hold back a queued B forever."""
    s = Quiet(
        FifoScheduler(
            {m: ModelLimits(concurrency_limit=100, ttl=0) for m in "AB"},
            OneAtATime(),
            max_wait=30,
        )
    )
    load(s, 1, "A", now=0)
    assert s.on_request(2, "B", 1) == []  # queued: A is busy
    previous = 1
    for now in range(2, 31):  # overlapping A requests: A is never idle
        rid = now + 10
        assert s.on_request(rid, "A", now) == [Grant(request_id=rid, model="A")]
        assert s.on_finished(previous, now) == []
        previous = rid
    # B has waited 30 s: a new A request queues instead of keeping A busy
    assert s.on_request(100, "A", 31) == []
    assert s.on_finished(previous, 32) == [StartSwap(swap_id=2, target="B", victims=("A",))]


def test_fifo_failed_load_stays_stopping_while_an_unload_is_still_stopping_it() -> None:
    s = make()
    swap = only(s.on_request(1, "A", 0))
    assert isinstance(swap, StartSwap)
    stop = next(d for d in s.on_unload(["A"], 1) if isinstance(d, StopModels))
    s.on_swap_done(swap.swap_id, ModelUnloaded("A"), 2)
    assert s.phase("A") is Phase.STOPPING  # the process may still be alive
    swap_b = only(s.on_request(2, "B", 2))
    assert isinstance(swap_b, StartSwap) and swap_b.victims == ("A",)  # B waits for A's stop
    s.on_stops_done(stop.stop_id, 3)
    s.on_swap_done(swap_b.swap_id, None, 4)
    assert s.phase("A") is Phase.COLD
    assert s.running() == ["B"]
