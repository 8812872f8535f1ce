"""The timeline: each model's loading / ready / stopping bands, and ``GET /api/timeline``.

Unit tests drive the hooks in each order :class:`~trio_swap.upstream.process.ModelProcess`
calls them, on a fake wall clock; the HTTP tests run a real trio-swap with
responder models and read what a swap left behind.
"""

from __future__ import annotations

import msgspec
import pytest
import trio

from tests.conftest import chat, make_config, responder_model, running
from trio_swap.observe.timeline import Timeline, TimelineCounts
from trio_swap.reasons import StopReason


class Clock:
    """A wall clock that moves only when told."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def at(self, now: float) -> Clock:
        self.now = now
        return self


T0 = 1_000_000.0


def band(
    state: str,
    start: float,
    end: float | None,
    reason: str | None = None,
    evicted_by: str | None = None,
    why: str | None = None,
    asleep: bool = False,
) -> dict[str, object]:
    return {
        "state": state,
        "start": T0 + start,
        "end": None if end is None else T0 + end,
        "reason": reason,
        "evicted_by": evicted_by,
        "why": why,
        "asleep": asleep,
    }


def bands(timeline: Timeline, model: str, since: float | None = None) -> list[dict[str, object]]:
    """``model``'s bands in the snapshot (none if it has no lane)."""
    lanes = timeline.snapshot(since)["lanes"]
    assert isinstance(lanes, list)
    for lane in lanes:
        if lane["model"] == model:
            return list(lane["bands"])
    return []


@pytest.fixture
def clock() -> Clock:
    return Clock(T0)


@pytest.fixture
def timeline(clock: Clock) -> Timeline:
    return Timeline(clock=clock)


# -- transitions, in each order the supervisor reports them ------------------------


def test_a_life_is_loading_then_ready_then_stopping(clock: Clock, timeline: Timeline) -> None:
    timeline.starting("m")
    clock.at(T0 + 2)
    timeline.ready("m", 2.0)
    clock.at(T0 + 10)
    assert bands(timeline, "m") == [band("loading", 0, 2), band("ready", 2, None)]
    timeline.stopping("m", StopReason.TTL)
    clock.at(T0 + 11)
    timeline.stopped("m")
    assert bands(timeline, "m") == [
        band("loading", 0, 2),
        band("ready", 2, 10),
        band("stopping", 10, 11, "ttl"),
    ]


def test_a_stop_while_loading_ends_the_load(clock: Clock, timeline: Timeline) -> None:
    timeline.starting("m")
    clock.at(T0 + 1)
    timeline.stopping("m", StopReason.ABANDONED)
    clock.at(T0 + 1.5)
    timeline.stopped("m")
    assert bands(timeline, "m") == [
        band("loading", 0, 1),
        band("stopping", 1, 1.5, "abandoned"),
    ]


def test_a_process_that_exits_before_ready_is_a_failed_load(
    clock: Clock, timeline: Timeline
) -> None:
    timeline.starting("m")
    clock.at(T0 + 3)
    timeline.start_failed("m")
    clock.at(T0 + 3.25)  # the pipe drains
    timeline.stopped("m")
    assert bands(timeline, "m") == [band("loading", 0, 3.25, "failed")]


def test_a_health_check_timeout_is_a_failed_load_even_if_stopped_while_killed(
    clock: Clock, timeline: Timeline
) -> None:
    timeline.starting("m")
    clock.at(T0 + 30)
    timeline.start_failed("m")  # then the supervisor terminates it; a stop order can arrive
    clock.at(T0 + 31)
    timeline.stopping("m", StopReason.SHUTDOWN)
    clock.at(T0 + 32)
    timeline.stopped("m")
    assert bands(timeline, "m") == [
        band("loading", 0, 31, "failed"),
        band("stopping", 31, 32, "shutdown"),
    ]


def test_a_command_that_cannot_run_is_an_instant_failed_load(
    clock: Clock, timeline: Timeline
) -> None:
    timeline.start_failed("m")  # no ``starting``: nothing was spawned, no ``stopped`` follows
    assert bands(timeline, "m") == [band("loading", 0, 0, "failed")]


def test_a_crash_ends_the_ready_band_when_the_process_is_gone(
    clock: Clock, timeline: Timeline
) -> None:
    timeline.starting("m")
    clock.at(T0 + 1)
    timeline.ready("m", 1.0)
    clock.at(T0 + 5)
    timeline.crashed("m")
    clock.at(T0 + 5.5)
    timeline.stopped("m")
    assert bands(timeline, "m") == [band("loading", 0, 1), band("ready", 1, 5.5, "crashed")]


def test_a_restart_after_a_stop_opens_a_new_load(clock: Clock, timeline: Timeline) -> None:
    """Asked for while stopping: the life task starts the process again."""
    timeline.starting("m")
    timeline.ready("m", 0.0)
    clock.at(T0 + 1)
    timeline.stopping("m", StopReason.UNLOAD)
    timeline.stopped("m")
    clock.at(T0 + 2)
    timeline.starting("m")
    states = [b["state"] for b in bands(timeline, "m")]
    assert states == ["loading", "ready", "stopping", "loading"]
    assert bands(timeline, "m")[-1] == band("loading", 2, None)


def test_lanes_come_in_the_order_models_were_first_seen(timeline: Timeline) -> None:
    for model in ["b", "a", "c", "a"]:
        timeline.starting(model)
    lanes = timeline.snapshot()["lanes"]
    assert isinstance(lanes, list)
    assert [lane["model"] for lane in lanes] == ["b", "a", "c"]


# -- evictions ------------------------------------------------------------------------

WHY = "needs ram 1.2 GiB, 0.4 GiB free; cheapest to reload"


def test_an_eviction_goes_on_the_next_stopping_band(clock: Clock, timeline: Timeline) -> None:
    timeline.starting("a")
    timeline.ready("a", 0.0)
    clock.at(T0 + 4)
    timeline.evicted("a", by="b", why=WHY)
    timeline.stopping("a", StopReason.SWAP)
    clock.at(T0 + 5)
    timeline.stopped("a")
    assert bands(timeline, "a")[-1] == band("stopping", 4, 5, "swap", "b", WHY)
    # Only that one: the next stop is no eviction.
    timeline.starting("a")
    timeline.ready("a", 0.0)
    timeline.stopping("a", StopReason.TTL)
    assert bands(timeline, "a")[-1] == band("stopping", 5, None, "ttl")


def test_an_eviction_of_a_model_already_stopping_goes_on_that_band(
    clock: Clock, timeline: Timeline
) -> None:
    timeline.starting("a")
    timeline.ready("a", 0.0)
    clock.at(T0 + 1)
    timeline.stopping("a", StopReason.TTL)
    timeline.evicted("a", by="b", why=WHY)
    assert bands(timeline, "a")[-1] == band("stopping", 1, None, "ttl", "b", WHY)


def test_an_eviction_of_a_process_already_gone_is_forgotten(
    clock: Clock, timeline: Timeline
) -> None:
    # Crashed as the router chose it: no stopping band comes for that stop.
    timeline.starting("a")
    timeline.ready("a", 0.0)
    timeline.evicted("a", by="b", why=WHY)
    timeline.crashed("a")
    timeline.stopped("a")
    # Already stopped when chosen: the next hook is a new start.
    timeline.evicted("a", by="c", why=WHY)
    timeline.starting("a")
    timeline.ready("a", 0.0)
    clock.at(T0 + 9)
    timeline.stopping("a", StopReason.UNLOAD)
    assert bands(timeline, "a")[-1] == band("stopping", 9, None, "unload")


# -- bounded memory ------------------------------------------------------------------------


def test_bands_that_ended_over_the_horizon_ago_are_dropped(clock: Clock) -> None:
    timeline = Timeline(clock=clock, horizon=100.0)
    timeline.starting("old")
    timeline.ready("old", 0.0)
    clock.at(T0 + 10)
    timeline.stopping("old", StopReason.SWAP)
    timeline.stopped("old")
    timeline.starting("busy")
    clock.at(T0 + 11)
    timeline.ready("busy", 1.0)  # stays open: never dropped
    clock.at(T0 + 105)  # the old loading band ended 105 s ago, the rest 95 s ago
    assert bands(timeline, "old") == [band("ready", 0, 10), band("stopping", 10, 10, "swap")]
    assert bands(timeline, "busy") == [band("loading", 10, 11), band("ready", 11, None)]
    clock.at(T0 + 500)
    lanes = timeline.snapshot()["lanes"]
    assert lanes == [{"model": "busy", "bands": [band("ready", 11, None)]}]
    assert list(timeline._lanes) == ["busy"]  # the lane with nothing left is gone


def test_a_crash_loop_keeps_at_most_max_bands_per_model(clock: Clock) -> None:
    timeline = Timeline(clock=clock, max_bands=5)
    for second in range(100):
        clock.at(T0 + second)
        timeline.starting("m")
        timeline.ready("m", 0.0)
        timeline.crashed("m")
        timeline.stopped("m")
    kept = bands(timeline, "m")
    assert len(kept) == 5
    assert kept[-1] == band("ready", 99, 99, "crashed")
    assert len(timeline._lanes["m"].bands) == 5


def test_bad_bounds_are_refused() -> None:
    with pytest.raises(ValueError, match="horizon"):
        Timeline(horizon=0)
    with pytest.raises(ValueError, match="max_bands"):
        Timeline(max_bands=0)


# -- reading a window ------------------------------------------------------------------------


def swapped_day(clock: Clock) -> Timeline:
    """a: load 0-2, ready 2-10, evicted 10-11; b: load 10-14, ready from 14; now 20."""
    timeline = Timeline(clock=clock)
    timeline.starting("a")
    clock.at(T0 + 2)
    timeline.ready("a", 2.0)
    clock.at(T0 + 10)
    timeline.evicted("a", by="b", why=WHY)
    timeline.stopping("a", StopReason.SWAP)
    timeline.starting("b")
    clock.at(T0 + 11)
    timeline.stopped("a")
    clock.at(T0 + 14)
    timeline.ready("b", 4.0)
    clock.at(T0 + 20)
    return timeline


def test_a_snapshot_holds_the_bands_overlapping_the_window(clock: Clock) -> None:
    timeline = swapped_day(clock)
    snapshot = timeline.snapshot(T0 + 10.5)
    assert snapshot["now"] == T0 + 20
    assert snapshot["since"] == T0 + 10.5
    assert snapshot["horizon"] == 3600.0
    assert snapshot["lanes"] == [
        {"model": "a", "bands": [band("stopping", 10, 11, "swap", "b", WHY)]},
        {"model": "b", "bands": [band("loading", 10, 14), band("ready", 14, None)]},
    ]
    assert timeline.snapshot(T0 + 12)["lanes"] == [
        {"model": "b", "bands": [band("loading", 10, 14), band("ready", 14, None)]}
    ]
    assert timeline.snapshot(T0 + 30)["lanes"] == []
    # Further back than the horizon: the horizon.
    assert timeline.snapshot(0.0)["since"] == T0 + 20 - 3600
    # JSON as it is.
    assert msgspec.json.decode(msgspec.json.encode(timeline.snapshot())) == timeline.snapshot()


def test_counts_cover_loads_evictions_and_loading_time_in_the_window(clock: Clock) -> None:
    timeline = swapped_day(clock)
    assert timeline.counts() == TimelineCounts(
        loads=2, failed_loads=0, evictions=1, crashes=0, loading_seconds=6.0
    )
    # From t=12: no load started, 2 of b's loading seconds, no eviction.
    assert timeline.counts(T0 + 12) == TimelineCounts(0, 0, 0, 0, 2.0)
    clock.at(T0 + 21)
    timeline.crashed("b")
    timeline.stopped("b")
    timeline.start_failed("a")
    timeline.starting("c")
    clock.at(T0 + 22.5)  # c is still loading: counted up to now
    assert timeline.counts(T0 + 20) == TimelineCounts(
        loads=2, failed_loads=1, evictions=0, crashes=1, loading_seconds=1.5
    )


def test_shutdown_stops_are_no_evictions(clock: Clock, timeline: Timeline) -> None:
    timeline.starting("a")
    timeline.ready("a", 0.0)
    timeline.stopping("a", StopReason.SHUTDOWN)
    timeline.stopped("a")
    assert timeline.counts().evictions == 0


# -- over HTTP -----------------------------------------------------------------------------


async def test_a_swap_leaves_loading_ready_and_stopping_bands_for_the_victim() -> None:
    config = make_config(responder_model("A"), responder_model("B"))
    with trio.fail_after(30):
        async with running(config) as h:
            for model in ["A", "B"]:
                response = await h.client.post("/v1/chat/completions", json=chat(model))
                assert response.status_code == 200, response.text
            response = await h.client.get("/api/timeline")
            assert response.status_code == 200, response.text
            body = response.json()
            lanes = {lane["model"]: lane["bands"] for lane in body["lanes"]}
            assert list(lanes) == ["A", "B"]
            a_states = [(b["state"], b["reason"]) for b in lanes["A"]]
            assert a_states == [("loading", None), ("ready", None), ("stopping", "swap")]
            # The router said who needed the room, and why.
            stop = lanes["A"][-1]
            assert stop["evicted_by"] == "B"
            assert "B" in stop["why"]
            assert all(b["end"] is not None for b in lanes["A"])
            assert [b["state"] for b in lanes["B"]] == ["loading", "ready"]
            assert lanes["B"][-1]["end"] is None
            starts = [b["start"] for b in lanes["A"]]
            assert starts == sorted(starts)
            assert body["since"] <= starts[0] <= body["now"]
            assert body["horizon"] == 3600.0
            counts = body["counts"]
            assert (counts["loads"], counts["evictions"], counts["failed_loads"]) == (2, 1, 0)
            assert counts["loading_seconds"] > 0

            # A window after the swap: only what still ran then.
            later = await h.client.get("/api/timeline", params={"since": body["now"]})
            assert [lane["model"] for lane in later.json()["lanes"]] == ["B"]
            assert later.json()["counts"]["loads"] == 0


BAD_SINCE = ["abc", "nan", "inf", "-inf", "1_0", "0x10", " 5", "\uff11", "1e5000", "9" * 50]


async def test_a_bad_since_is_a_400() -> None:
    config = make_config(responder_model("A"))
    with trio.fail_after(30):
        async with running(config) as h:
            for since in BAD_SINCE:
                response = await h.client.get("/api/timeline", params={"since": since})
                assert response.status_code == 400, (since, response.text)
                error = response.json()["error"]
                assert error["type"] == "invalid_request_error"
                assert "since" in error["message"]
            for good in ("1733900000.5", "-1", "1e9", ".5", ""):
                ok = await h.client.get("/api/timeline", params={"since": good})
                assert ok.status_code == 200, (good, ok.text)


def test_a_sleep_is_a_sleeping_band_an_eviction_once_and_a_wake_opens_a_ready_band(
    clock: Clock, timeline: Timeline
) -> None:
    timeline.starting("m")
    clock.at(T0 + 1)
    timeline.ready("m", 1.0)
    clock.at(T0 + 5)
    timeline.evicted("m", by="big", why="big needs vram0 20 GiB with 4 GiB free")
    timeline.slept("m", StopReason.SWAP)
    clock.at(T0 + 9)
    timeline.woke("m", 0.5)
    clock.at(T0 + 12)
    timeline.slept("m", StopReason.TTL)
    clock.at(T0 + 20)
    timeline.evicted("m", by="other", why="its host memory is needed")
    timeline.stopping("m", StopReason.SWAP)  # stopped asleep: not a second eviction
    clock.at(T0 + 21)
    timeline.stopped("m")
    assert bands(timeline, "m") == [
        band("loading", 0, 1),
        band("ready", 1, 5),
        band("sleeping", 5, 9, "swap", "big", "big needs vram0 20 GiB with 4 GiB free"),
        band("ready", 9, 12),
        band("sleeping", 12, 20, "ttl"),
        band("stopping", 20, 21, "swap", "other", "its host memory is needed", asleep=True),
    ]
    counts = timeline.counts()
    assert counts.evictions == 2  # the two sleeps; the stop of the sleeper is not another
    assert counts.loads == 1  # a wake is not a load


def test_an_eviction_told_of_a_model_that_stays_asleep_is_not_pinned_on_a_later_stop(
    clock: Clock, timeline: Timeline
) -> None:
    """A swap may name a victim that is asleep already (it stays so: no band opens);
    its wake must drop that eviction, or the next stop says the old swap caused it."""
    timeline.starting("m")
    timeline.ready("m", 1.0)
    clock.at(T0 + 2)
    timeline.slept("m", StopReason.TTL)
    clock.at(T0 + 3)
    timeline.evicted("m", by="big", why="big needs the GPU")  # asleep already: stays so
    clock.at(T0 + 5)
    timeline.woke("m", 0.5)
    clock.at(T0 + 9)
    timeline.stopping("m", StopReason.TTL)
    assert bands(timeline, "m")[-1] == band("stopping", 9, None, "ttl")
