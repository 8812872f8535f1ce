"""Scheduler rules added for churn: priorities, minResident, maxQueue, pinning, abandoned loads.

Pure: numbers stand in for the clock; no I/O.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

from tests.conftest import chat, make_config, responder_model, running
from tests.scheduler_support import Quiet
from trio_swap.errors import ModelPinned, QueueFull
from trio_swap.policy import OneAtATime
from trio_swap.reasons import StopReason
from trio_swap.scheduling import (
    FifoScheduler,
    Grant,
    Joined,
    ModelLimits,
    Phase,
    Queued,
    Reject,
    StartSwap,
    StopModels,
)


def make(
    *,
    priority: dict[str, int] | None = None,
    pinned: str = "",
    ttl: float = 0,
    **options: Any,
) -> Any:
    limits = {
        m: ModelLimits(
            concurrency_limit=10,
            ttl=ttl,
            swappable=m != pinned,
            priority=(priority or {}).get(m, 0),
        )
        for m in "ABCD"
    }
    return Quiet(FifoScheduler(limits, OneAtATime(), **options))


def loaded(s: Any, model: str, rid: int, now: float = 0) -> None:
    (swap,) = s.on_request(rid, model, now)
    assert isinstance(swap, StartSwap)
    assert s.on_swap_done(swap.swap_id, None, now) == [Grant(request_id=rid, model=model)]


def test_fifo_higher_priority_queued_requests_go_first_fifo_within_a_level() -> None:
    s = make(priority={"C": 5, "D": 5})
    loaded(s, "A", 1)
    for rid, model in [(2, "B"), (3, "C"), (4, "D"), (5, "B")]:
        assert s.on_request(rid, model, 1) == []
    assert [s.queue_position(r) for r in (3, 4, 2, 5)] == [1, 2, 3, 4]
    (swap,) = s.on_finished(1, 2)
    assert swap == StartSwap(swap_id=2, target="C", victims=("A",))


def test_fifo_min_resident_keeps_a_fresh_model_until_its_time_is_up() -> None:
    s = make(min_resident=10)
    loaded(s, "A", 1, now=0)
    s.on_finished(1, 1)
    assert s.on_request(2, "B", 2) == []  # A loaded 2 s ago: not evictable yet
    assert s.next_deadline() == 10
    assert s.on_tick(9.9) == []
    assert s.on_tick(10) == [StartSwap(swap_id=2, target="B", victims=("A",))]


def test_fifo_max_queue_rejects_with_503_but_still_serves_ready_models() -> None:
    s = make(max_queue=1)
    loaded(s, "A", 1)
    assert s.on_request(2, "B", 1) == []  # one waiting: the limit
    (reject,) = s.on_request(3, "C", 1)
    assert isinstance(reject, Reject) and isinstance(reject.error, QueueFull)
    assert reject.error.status == 503 and reject.error.headers() == {"Retry-After": "1"}
    assert s.on_request(4, "A", 1) == [Grant(request_id=4, model="A")]  # no queue needed


def test_fifo_pinned_model_is_never_evicted_and_requests_needing_it_get_409() -> None:
    s = make(pinned="A", ttl=5)
    loaded(s, "A", 1)
    s.on_finished(1, 1)
    (reject,) = s.on_request(2, "B", 2)
    assert isinstance(reject, Reject) and isinstance(reject.error, ModelPinned)
    assert reject.error.status == 409 and "swappable: false" in reject.error.message
    assert s.next_deadline() == math.inf  # no TTL for a pinned model
    assert s.on_tick(1000) == []
    assert s.phase("A") is Phase.READY
    (stop,) = [d for d in s.on_unload(["A"], 3) if isinstance(d, StopModels)]
    s.on_stops_done(stop.stop_id, 4)
    assert isinstance(s.on_request(3, "B", 5)[0], StartSwap)  # after an unload, B may load


def test_fifo_a_load_nobody_waits_for_is_stopped_unless_someone_queued_for_it() -> None:
    s = make()
    (swap,) = s.on_request(1, "A", 0)
    assert isinstance(swap, StartSwap)
    assert s.on_finished(1, 1) == [
        StopModels(stop_id=1, models=("A",), reason=StopReason.ABANDONED)
    ]
    # with another waiter the load goes on
    s2 = make()
    s2.on_request(1, "A", 0)
    s2.on_request(2, "A", 0)  # joins
    assert s2.on_finished(1, 1) == []


def test_fifo_queued_and_joined_are_reported_for_the_log() -> None:
    raw = FifoScheduler({m: ModelLimits(concurrency_limit=10, ttl=0) for m in "AB"}, OneAtATime())
    raw.on_request(1, "A", 0)
    assert raw.on_request(2, "A", 0) == [Joined(request_id=2, model="A", swap_id=1)]
    assert raw.on_request(3, "B", 0) == [Queued(request_id=3, model="B", position=1)]


async def test_preload_loads_listed_models_at_startup_through_the_scheduler() -> None:
    import trio

    base = make_config(responder_model("A"), responder_model("B"))
    config = type(base)(
        source=base.source, models=base.models, log_to_stdout="none", preload=("A", "B")
    )
    with trio.fail_after(30):
        async with running(config) as h:
            await h.wait_for_state("B", "ready")
            models = await h.models()
            # one model at a time: preloading A then B leaves B (as llama-swap does)
            assert models["A"]["start_count"] == 1 and models["A"]["state"] == "stopped"


async def test_pinned_model_conflict_is_a_409_over_http() -> None:
    import trio

    config = make_config(responder_model("A", swappable=False), responder_model("B"))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).is_success
            response = await h.client.post("/v1/chat/completions", json=chat("B"))
            assert response.status_code == 409
            assert response.json()["error"]["code"] == "model_pinned"
            assert (await h.client.post("/api/models/unload/A")).is_success
            assert (await h.client.post("/v1/chat/completions", json=chat("B"))).is_success


async def test_a_load_abandoned_by_its_only_client_is_stopped() -> None:
    import trio

    config = make_config(responder_model("slow", "--load-delay", "30"))
    with trio.fail_after(30):
        async with running(config) as h:
            async with trio.open_nursery() as client:
                client.start_soon(partial(h.client.post, "/v1/chat/completions", json=chat("slow")))
                await h.wait_for_state("slow", "starting")
                client.cancel_scope.cancel()  # the client gives up while the model loads
            await h.wait_for_state("slow", "stopped")
            assert h.pid("slow") is None
            assert (await h.models())["slow"]["start_count"] == 1
