"""The router and the process supervisors together, with fake children on trio's virtual clock.

Between the pure scheduler tests (numbers for time, no tasks) and the
end-to-end tests (real processes, real sockets, real time), this layer runs
the real :class:`~trio_swap.router.Router` and real
:class:`~trio_swap.upstream.process.ModelProcess` supervisors against the
fakes of ``tests/fakes.py``. Every test uses the ``autojump_clock`` fixture:
when all tasks wait, trio jumps to the next deadline, so a 30 s load costs no
real time and virtual times are exact. Each test states what a user would
see (who was signalled, what started, what the waiting request got) and when.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import msgspec
import pytest
import trio
import trio.testing

from tests.fakes import Behaviour, FakeLauncher, fake_model
from trio_swap._sync import Reply
from trio_swap.config.address import Upstream
from trio_swap.config.model import HttpCall, ModelConfig, SchedulerConfig, SleepConfig
from trio_swap.errors import (
    ModelNotFound,
    ModelStartFailed,
    ModelUnloaded,
    RateLimited,
    ShuttingDown,
    SwapError,
)
from trio_swap.fit.ledger import FitLedger
from trio_swap.observe.hooks import ProcessHooks
from trio_swap.policy.base import SwapPolicy
from trio_swap.policy.exclusive import OneAtATime
from trio_swap.policy.fit import FitPolicy
from trio_swap.reasons import StopReason
from trio_swap.router import Admission, Router, _UnloadRequested
from trio_swap.scheduling import Phase
from trio_swap.upstream import process as process_module
from trio_swap.upstream.footprint import FootprintProbe
from trio_swap.upstream.process import PROBE_INTERVAL, ModelProcess, ProcessState, _Stop

#: A readiness probe runs every PROBE_INTERVAL: readiness is seen within one interval.
SLACK = PROBE_INTERVAL * 1.5


class _Stops(ProcessHooks):
    """Records each stop with its typed reason, as the metrics see it."""

    def __init__(self) -> None:
        self.stops: list[tuple[str, StopReason]] = []
        self.crashes: list[str] = []

    def stopping(self, model: str, reason: StopReason) -> None:
        self.stops.append((model, reason))

    def crashed(self, model: str) -> None:
        self.crashes.append(model)


@dataclass
class Box:
    router: Router
    launcher: FakeLauncher
    processes: Mapping[str, ModelProcess]
    hooks: _Stops
    nursery: trio.Nursery
    results: dict[str, list[object]] = field(default_factory=dict)

    def now(self) -> float:
        return trio.current_time()

    def spawn_model(self, model: ModelConfig, health_check_timeout: float) -> ModelProcess:
        """What server.py's ``spawn`` does, for models a reload adds."""
        process = _process(model, self.launcher, self.hooks, self.router, health_check_timeout)
        self.nursery.start_soon(process.run)
        return process

    def request(self, model: str, *, hold: trio.Event | None = None) -> None:
        """A client in the background: acquire, hold the lease until ``hold``, release.

        Its outcome lands in ``results[model]``: the grant time, or the error.
        """

        async def client() -> None:
            try:
                lease = await self.router.acquire(model)
            except SwapError as error:
                self.results.setdefault(model, []).append(error)
                return
            self.results.setdefault(model, []).append(trio.current_time())
            try:
                if hold is not None:
                    await hold.wait()
            finally:
                self.router.release(lease)

        self.nursery.start_soon(client)


def _process(
    model: ModelConfig,
    launcher: FakeLauncher,
    hooks: _Stops,
    router: Router | None,
    timeout: float,
    box: list[Router] | None = None,
) -> ModelProcess:
    def on_stopped(name: str) -> None:
        (router or (box or [])[0]).model_stopped(name)

    return ModelProcess(
        model,
        health_check_timeout=timeout,
        launcher=launcher,
        probe=launcher.probe,
        on_stopped=on_stopped,
        hooks=hooks,
    )


@asynccontextmanager
async def running(
    behaviours: Mapping[str, Behaviour],
    *,
    settings: Mapping[str, Mapping[str, object]] | None = None,
    policy: SwapPolicy | None = None,
    scheduler: SchedulerConfig | None = None,
    health_check_timeout: float = 60.0,
    resources: Mapping[str, int] | None = None,
    footprint: FootprintProbe | None = None,
) -> AsyncIterator[Box]:
    """A router over fake models named by ``behaviours`` (in that order); with
    ``resources``, fit by memory is the policy (the models' ``needs`` declared)."""
    settings = settings or {}
    async with trio.open_nursery() as timers:  # outlives the supervisors: children can exit
        launcher = FakeLauncher(timers, dict(behaviours))
        models = [
            fake_model(name, index, **settings.get(name, {}))
            for index, name in enumerate(behaviours)
        ]
        launcher.register(models)
        hooks = _Stops()
        box: list[Router] = []
        processes = {
            m.id: _process(m, launcher, hooks, None, health_check_timeout, box) for m in models
        }
        ledger = None
        if resources is not None:
            ledger = FitLedger(resources, {m.id: m for m in models})
            policy = FitPolicy(ledger)
        router = Router(
            processes,
            policy or OneAtATime(),
            scheduler,
            ledger=ledger,
            footprint=footprint,
            measure_every=1.0,
        )
        box.append(router)
        async with trio.open_nursery() as supervisors:
            for process in processes.values():
                await supervisors.start(process.run)
            await supervisors.start(router.run)
            yield Box(router, launcher, router.processes, hooks, supervisors)
            supervisors.cancel_scope.cancel()
        timers.cancel_scope.cancel()


async def until(condition: object) -> None:
    """Wait (in virtual time) until ``condition()`` holds."""
    assert callable(condition)
    with trio.fail_after(3600):
        while not condition():
            await trio.sleep(PROBE_INTERVAL / 2)


async def test_a_cold_model_is_granted_once_its_health_check_passes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(ready_after=2.5)}) as box:
        t0 = box.now()
        lease = await box.router.acquire("A")
        assert 2.5 <= box.now() - t0 <= 2.5 + SLACK
        assert lease.upstream.port == box.processes["A"].upstream.port
        assert box.launcher.what("A") == ["spawn"]
        box.router.release(lease)


async def test_a_swap_stops_the_victim_before_the_target_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(
        {"A": Behaviour(ready_after=1, term_delay=0.5), "B": Behaviour(ready_after=2)}
    ) as box:
        box.router.release(await box.router.acquire("A"))
        t1 = box.now()
        lease = await box.router.acquire("B")
        (a_exit,) = box.launcher.when("A", "exit -15")
        (b_spawn,) = box.launcher.when("B", "spawn")
        assert box.launcher.when("A", "SIGTERM") == [t1]
        assert b_spawn == a_exit == t1 + 0.5  # never both at once
        assert 2 <= box.now() - b_spawn <= 2 + SLACK
        assert box.launcher.running() == ["B"]
        assert box.hooks.stops == [("A", StopReason.SWAP)]
        assert box.router.swap_count == 2
        box.router.release(lease)


async def test_concurrent_requests_for_a_cold_model_share_one_load(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(ready_after=3)}) as box:
        for _ in range(5):
            box.request("A")
        await until(lambda: len(box.results.get("A", [])) == 5)
        assert box.launcher.what("A") == ["spawn"]
        assert len(set(box.results["A"])) == 1  # all granted in the same instant


async def test_a_swap_waits_for_the_request_in_flight_on_its_victim(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Invariant 3: the victim is signalled only once its last request is over."""
    async with running({"A": Behaviour(), "B": Behaviour()}) as box:
        done = trio.Event()
        box.request("A", hold=done)
        await until(lambda: "A" in box.results)
        box.request("B")
        await trio.sleep(300)  # a five-minute generation on A
        assert box.launcher.what("A") == ["spawn"]
        assert box.launcher.what("B") == []
        released = box.now()
        done.set()
        await until(lambda: "B" in box.results)
        assert box.launcher.when("A", "SIGTERM") == [released]


async def test_a_crash_during_the_load_fails_the_waiters_with_the_log_tail(
    autojump_clock: trio.testing.MockClock,
) -> None:
    crashing = Behaviour(
        ready_after=5, crash_after=1, lines=("loading weights", "CUDA error: out of memory")
    )
    async with running({"A": crashing}) as box:
        with pytest.raises(ModelStartFailed) as failed:
            await box.router.acquire("A")
        assert "exited before becoming ready (exit status 1)" in failed.value.message
        assert "CUDA error: out of memory" in failed.value.message
        assert not box.router.is_ready("A")
        with pytest.raises(ModelStartFailed):  # the next request tries again
            await box.router.acquire("A")
        assert box.launcher.what("A") == ["spawn", "exit 1", "spawn", "exit 1"]


async def test_a_failed_spawn_is_reported_and_nothing_runs(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(spawn_error=True)}) as box:
        with pytest.raises(ModelStartFailed, match="could not run 'fake'"):
            await box.router.acquire("A")
        assert box.processes["A"].state is ProcessState.STOPPED


async def test_a_health_check_that_never_passes_gives_up_after_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(ready_after=1e9)}, health_check_timeout=45) as box:
        t0 = box.now()
        with pytest.raises(ModelStartFailed, match="not ready after 45s"):
            await box.router.acquire("A")
        assert box.launcher.when("A", "SIGTERM") == [t0 + 45]
        assert box.launcher.running() == []


async def test_unloading_a_model_cancels_its_load_in_flight(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(ready_after=30)}) as box:
        box.request("A")
        await until(lambda: box.launcher.running() == ["A"])
        t_unload = box.now()
        await box.router.unload(["A"])
        assert box.launcher.running() == []
        assert box.launcher.when("A", "SIGTERM") == [t_unload]
        await until(lambda: "A" in box.results)
        (outcome,) = box.results["A"]
        assert isinstance(outcome, ModelUnloaded)
        assert box.now() - t_unload < 30  # the load was cut, not waited out
        assert box.hooks.stops == [("A", StopReason.UNLOAD)]


async def test_a_target_unloaded_while_its_victim_stops_never_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Invariant 5: a swap cancelled while its victims stop sends no start."""
    async with running({"A": Behaviour(term_delay=5), "B": Behaviour()}) as box:
        box.router.release(await box.router.acquire("A"))
        box.request("B")
        await until(lambda: box.launcher.what("A")[-1:] == ["SIGTERM"])
        await box.router.unload(["B"])
        await until(lambda: "B" in box.results)
        assert isinstance(box.results["B"][0], ModelUnloaded)
        await until(lambda: box.launcher.running() == [])
        await trio.sleep(60)
        assert box.launcher.what("B") == []


async def test_an_idle_model_stops_exactly_when_its_ttl_runs_out(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour()}, settings={"A": {"ttl": 60.0}}) as box:
        box.router.release(await box.router.acquire("A"))
        await trio.sleep(59)
        box.router.release(await box.router.acquire("A"))  # used again: the ttl restarts
        last_use = box.now()
        await until(lambda: box.launcher.running() == [])
        assert box.launcher.when("A", "SIGTERM") == [last_use + 60]
        assert box.hooks.stops == [("A", StopReason.TTL)]


async def test_a_server_ignoring_sigterm_is_killed_after_its_unload_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running(
        {"A": Behaviour(ignore_sigterm=True)}, settings={"A": {"unload_timeout": 7.0}}
    ) as box:
        box.router.release(await box.router.acquire("A"))
        t_unload = box.now()
        await box.router.unload(["A"])
        assert box.launcher.when("A", "SIGTERM") == [t_unload]
        assert box.launcher.when("A", "SIGKILL")[0] == t_unload + 7
        assert box.processes["A"].state is ProcessState.STOPPED


async def test_a_crash_of_a_ready_model_is_noticed_and_the_next_request_restarts_it(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(ready_after=1, crash_after=10)}) as box:
        box.router.release(await box.router.acquire("A"))
        await until(lambda: not box.router.is_ready("A"))
        assert box.launcher.when("A", "exit 1") == [10]
        assert box.hooks.crashes == ["A"]
        lease = await box.router.acquire("A")
        assert box.launcher.what("A")[-1] == "spawn"
        assert box.launcher.what("A").count("spawn") == 2
        box.router.release(lease)


async def test_a_reload_restarts_a_changed_model_once_its_request_finishes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(), "B": Behaviour()}) as box:
        done = trio.Event()
        box.request("A", hold=done)
        await until(lambda: "A" in box.results)
        changed = msgspec.structs.replace(box.processes["A"].model, cmd=("fake", "A", "--new-flag"))
        models = {"A": changed, "B": box.processes["B"].model}
        await box.router.reconfigure(
            models,
            OneAtATime(),
            SchedulerConfig(),
            health_check_timeout=60,
            restart={"A"},
            spawn=box.spawn_model,
        )
        await trio.sleep(100)
        assert box.launcher.what("A") == ["spawn"]  # its stream goes on
        released = box.now()
        done.set()
        await until(lambda: box.launcher.running() == [])
        assert box.launcher.when("A", "SIGTERM") == [released]
        assert box.hooks.stops == [("A", StopReason.RELOAD)]
        lease = await box.router.acquire("A")
        assert box.launcher.children[-1].name == "A"
        assert box.processes["A"].model.cmd == ("fake", "A", "--new-flag")
        box.router.release(lease)


async def test_shutdown_rejects_the_waiters_and_cancels_the_load(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(ready_after=30)}) as box:
        box.request("A")
        await until(lambda: box.launcher.running() == ["A"])
        await box.router.shutdown()
        await until(lambda: "A" in box.results)
        assert isinstance(box.results["A"][0], ShuttingDown)
        with pytest.raises(ShuttingDown):
            await box.router.acquire("A")
        await box.router.stop_all()
        assert box.launcher.running() == []


async def test_admission_is_the_routers_answer(autojump_clock: trio.testing.MockClock) -> None:
    """``on_wait`` says why an admitted request waits; grants and rejections never call it."""
    async with running(
        {"A": Behaviour(), "B": Behaviour()}, settings={"B": {"concurrency_limit": 1}}
    ) as box:
        seen: list[Admission] = []
        lease_a = await box.router.acquire("A", on_wait=seen.append)
        assert seen == [Admission.LOADING]  # cold: it started the load
        seen.clear()
        lease_a2 = await box.router.acquire("A", on_wait=seen.append)
        assert seen == []  # ready: granted at once
        box.router.release(lease_a2)

        async def want_b() -> None:
            box.router.release(await box.router.acquire("B", on_wait=seen.append))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(want_b)
            await until(lambda: seen == [Admission.QUEUED])  # behind A's request in flight
            with pytest.raises(RateLimited):  # over B's concurrencyLimit of 1
                await box.router.acquire("B", on_wait=seen.append)
            assert seen == [Admission.QUEUED]
            box.router.release(lease_a)


async def test_a_load_cancelled_by_a_reload_while_its_victim_stops_never_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """B's swap first stops A (slowly: it ignores SIGTERM); a reload removes B
    meanwhile. B must never start once A is gone (nobody would track it)."""
    async with running(
        {"A": Behaviour(ignore_sigterm=True), "B": Behaviour()},
        settings={"A": {"unload_timeout": 3.0}},
    ) as box:
        box.router.release(await box.router.acquire("A"))
        box.request("B")
        await until(lambda: box.processes["A"].state is ProcessState.STOPPING)
        await box.router.reconfigure(
            {"A": box.processes["A"].model},
            OneAtATime(),
            SchedulerConfig(),
            health_check_timeout=60,
            restart=set(),
            spawn=box.spawn_model,
        )
        await until(lambda: "B" in box.results)
        assert isinstance(box.results["B"][0], ModelNotFound)
        box.router.release(await box.router.acquire("A"))  # A loads again after the swap
        await until(lambda: "B" not in box.processes)  # B's supervisor retired
        assert box.launcher.what("B") == []
        assert box.launcher.running() == ["A"]


async def test_a_load_abandoned_while_its_victim_stops_never_starts(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """B's only client gives up while A is being evicted: B stays stopped, or A's
    next load would run beside it."""
    async with running(
        {"A": Behaviour(ignore_sigterm=True), "B": Behaviour()},
        settings={"A": {"unload_timeout": 5.0}},
    ) as box:
        box.router.release(await box.router.acquire("A"))
        async with trio.open_nursery() as nursery:
            give_up = trio.CancelScope()

            async def want_b() -> None:
                with give_up:
                    await box.router.acquire("B")

            nursery.start_soon(want_b)
            await until(lambda: box.processes["A"].state is ProcessState.STOPPING)
            give_up.cancel()
        await until(lambda: not box.router.scheduler.pending_requests())
        box.router.release(await box.router.acquire("A"))
        assert box.launcher.what("B") == []
        assert box.router.scheduler.running() == ["A"]


async def test_a_stop_in_the_instant_the_health_check_passes_is_a_stop(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Regression: the stop failed the waiters and set STOPPING, then the probe's win
    wrote READY over it (a dying process shown ready, a load counted that never served)."""
    async with trio.open_nursery() as timers:
        launcher = FakeLauncher(timers, {"A": Behaviour(ready_after=1)})
        model = fake_model("A", 0)
        launcher.register([model])
        hooks = _Stops()
        loads: list[str] = []
        hooks.ready = lambda name, seconds: loads.append(name)  # type: ignore[method-assign]

        async def probe_then_stop(upstream: Upstream, path: str, *, timeout: float) -> bool:
            healthy = await launcher.probe(upstream, path, timeout=timeout)
            if healthy:
                # The stop message is handled in the very instant the probe answers 200
                # (the supervisor task handles its inbox between the probe's checkpoints).
                process._handle(_Stop(5.0, StopReason.UNLOAD, Reply()))
            return healthy

        process = ModelProcess(
            model, health_check_timeout=60, launcher=launcher, probe=probe_then_stop, hooks=hooks
        )
        async with trio.open_nursery() as supervisors:
            await supervisors.start(process.run)
            with pytest.raises(ModelStartFailed, match="stopped while starting"):
                await process.ensure_ready()
            await until(lambda: process.state is ProcessState.STOPPED)
            supervisors.cancel_scope.cancel()
        assert loads == []
        assert launcher.what("A") == ["spawn", "SIGTERM", "exit -15"]
        timers.cancel_scope.cancel()


async def test_a_request_joining_a_load_is_told_it_waits_for_the_load(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with running({"A": Behaviour(ready_after=5)}) as box:
        first: list[Admission] = []
        joined: list[Admission] = []
        async with trio.open_nursery() as nursery:

            async def want(seen: list[Admission]) -> None:
                box.router.release(await box.router.acquire("A", on_wait=seen.append))

            nursery.start_soon(want, first)
            await until(lambda: first == [Admission.LOADING])  # it started the load
            nursery.start_soon(want, joined)
            await until(lambda: joined == [Admission.LOADING])  # it joined that load
        assert box.launcher.what("A") == ["spawn"]


# --- sleep: under fit by memory (the sleep and wake calls faked) ---------------------

SLEEPS = SleepConfig(
    sleep=HttpCall(method="POST", path="/sleep"), wake=(HttpCall(method="POST", path="/wake_up"),)
)
#: Seconds each faked sleep or wake call takes.
SLEEP_CALL = 0.5


@pytest.fixture
def sleep_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, int, str]]:
    """The sleep and wake HTTP calls replaced by timers: (virtual time, port, "sleep"/"wake")."""
    calls: list[tuple[float, int, str]] = []

    async def sleep_server(upstream: Upstream, config: SleepConfig) -> None:
        calls.append((trio.current_time(), upstream.port, "sleep"))
        await trio.sleep(SLEEP_CALL)

    async def wake_server(upstream: Upstream, config: SleepConfig) -> None:
        calls.append((trio.current_time(), upstream.port, "wake"))
        await trio.sleep(SLEEP_CALL)

    monkeypatch.setattr(process_module, "sleep_server", sleep_server)
    monkeypatch.setattr(process_module, "wake_server", wake_server)
    return calls


def needs(ram: int, vram0: int = 0, *, sleeps: bool = False) -> dict[str, object]:
    """A fake model's settings: declared needs, and ``sleep:`` when ``sleeps``."""
    settings: dict[str, object] = {"needs": {"ram": ram, "vram0": vram0}}
    if sleeps:
        settings["sleep"] = SLEEPS
    return settings


async def test_a_victim_asleep_when_its_swap_ends_is_counted_for_the_queue_placed_then(
    autojump_clock: trio.testing.MockClock, sleep_calls: list[tuple[float, int, str]]
) -> None:
    """Regression: the sleepers were read before the scheduler turned the swap's victim
    cold, so the queue placed in that same step counted its host memory nowhere: C
    started beside B and A asleep, 120 of 100 in ram. A (asleep: its 60 of GPU memory
    assumed moved to ram) must stop for C."""
    async with running(
        {"A": Behaviour(), "B": Behaviour(), "C": Behaviour()},
        settings={"A": needs(10, 60, sleeps=True), "B": needs(10, 60), "C": needs(40)},
        resources={"ram": 100, "vram0": 100},
    ) as box:
        box.router.release(await box.router.acquire("A"))
        box.request("B")  # the GPU: A sleeps (asleep, 70 + 10 of ram fits)
        await until(lambda: box.router.scheduler.phase("B") is Phase.LOADING)
        box.request("C")  # queued behind B's swap (it would evict A, B's victim)
        await until(lambda: "C" in box.results and "B" in box.results)
        assert all(isinstance(t, float) for t in (*box.results["B"], *box.results["C"]))
        assert box.launcher.what("A") == ["spawn", "SIGTERM", "exit -15"]
        assert box.processes["A"].state is ProcessState.STOPPED
        assert [call for _, _, call in sleep_calls] == ["sleep"]


async def test_a_sleeper_a_swap_stops_is_stopped_before_a_request_for_it_starts_it(
    autojump_clock: trio.testing.MockClock, sleep_calls: list[tuple[float, int, str]]
) -> None:
    """X needs the ram S holds asleep (its GPU memory moved there), so X's swap stops
    S; awake, S needs little ram, so S's request, placed in the same step, starts a
    swap of its own. Its start must reach S's process after that stop (a cold start),
    never before it: woken first, the stop cut its wake and the client got an error.
    (Which swap task runs first is trio's choice, so several rounds.)"""
    async with running(
        {
            "S": Behaviour(),
            "V": Behaviour(),
            "Z": Behaviour(ready_after=10),  # costly to reload: fit stops S asleep instead
            "X": Behaviour(),
        },
        settings={
            "S": needs(10, 30, sleeps=True),
            "V": needs(100, 80),
            "Z": needs(10, 30),
            "X": needs(160),
        },
        resources={"ram": 200, "vram0": 100},
    ) as box:
        scheduler = box.router.scheduler
        for _ in range(6):
            box.results.clear()
            box.router.release(await box.router.acquire("S"))
            box.router.release(await box.router.acquire("V"))  # S sleeps for V's GPU memory
            assert box.processes["S"].state is ProcessState.SLEEPING
            box.request("Z")  # Z's swap stops V (the GPU)
            await until(lambda: scheduler.phase("Z") is Phase.LOADING)
            box.request("X")  # both queued behind Z's swap (they would evict its victim)
            await until(lambda: scheduler.queued("X") == 1)
            box.request("S")
            await until(lambda: scheduler.queued("S") == 1)
            await until(lambda: all(m in box.results for m in "ZXS"))
            assert [type(box.results[m][0]) for m in "ZXS"] == [float] * 3, box.results
            assert box.router.is_ready("S")
            assert box.launcher.what("S")[-3:] == ["SIGTERM", "exit -15", "spawn"]
            await box.router.unload()


async def test_a_request_right_after_the_unload_of_a_sleeper_starts_it_after_its_stop(
    autojump_clock: trio.testing.MockClock, sleep_calls: list[tuple[float, int, str]]
) -> None:
    """The scheduler thinks a sleeper COLD, so an unload's stop of it does not hold back
    a request for it, as it does for a model awake: the request's start must still
    reach the process after the stop (a cold start), never wake it for the stop to cut."""
    async with running(
        {"S": Behaviour(), "V": Behaviour()},
        settings={"S": needs(10, 60, sleeps=True), "V": needs(10, 60)},
        resources={"ram": 100, "vram0": 100},
    ) as box:
        for _ in range(6):
            box.results.clear()
            box.router.release(await box.router.acquire("S"))
            box.router.release(await box.router.acquire("V"))  # S sleeps for V's GPU memory
            assert box.processes["S"].state is ProcessState.SLEEPING
            unloaded: Reply[None] = Reply()
            box.router._send.send_nowait(_UnloadRequested(("S",), unloaded))  # this order:
            box.request("S")  # both in the router's inbox before either is handled
            await unloaded.wait()
            await until(lambda: "S" in box.results)
            assert isinstance(box.results["S"][0], float), box.results
            assert box.launcher.what("S")[-3:] == ["SIGTERM", "exit -15", "spawn"]
            await box.router.unload()


@pytest.mark.parametrize(
    ("ram_of_b", "then"), [(20, ProcessState.SLEEPING), (50, ProcessState.STOPPED)]
)
async def test_a_ttl_under_fit_puts_a_model_to_sleep_only_where_it_fits_asleep(
    autojump_clock: trio.testing.MockClock,
    sleep_calls: list[tuple[float, int, str]],
    ram_of_b: int,
    then: ProcessState,
) -> None:
    """Asleep, A holds its 60 of GPU memory in ram (assumed so until measured), 70 in
    all: beside B's 20 that fits in 100 and A sleeps; beside B's 50 it would not (a
    TTL never overcommits what fit counts), so A stops."""
    async with running(
        {"A": Behaviour(), "B": Behaviour()},
        settings={"A": {**needs(10, 60, sleeps=True), "ttl": 60.0}, "B": needs(ram_of_b)},
        resources={"ram": 100, "vram0": 100},
    ) as box:
        box.router.release(await box.router.acquire("A"))
        box.router.release(await box.router.acquire("B"))  # beside A: 60 of 100 in ram
        await until(lambda: box.router.scheduler.phase("A") is Phase.COLD)  # its TTL ran out
        await until(
            lambda: box.processes["A"].state in (ProcessState.SLEEPING, ProcessState.STOPPED)
        )
        assert box.processes["A"].state is then
        assert box.hooks.stops == ([] if then is ProcessState.SLEEPING else [("A", StopReason.TTL)])


async def test_the_plan_behind_a_swap_decides_its_victims_way_not_a_later_what_if(
    autojump_clock: trio.testing.MockClock, sleep_calls: list[tuple[float, int, str]]
) -> None:
    """In the step X's swap starts (V to sleep), placing T's queued request asks fit,
    for the starvation bound, what X would need with V already STOPPING (stop V: it
    costs nothing). That what-if was read as the plan behind X's swap: V stopped."""
    async with running(
        {"V": Behaviour(), "T": Behaviour(), "X": Behaviour()},
        settings={"V": needs(10, 40, sleeps=True), "T": needs(10, 40), "X": needs(10, 40)},
        resources={"ram": 1000, "vram0": 100},
        scheduler=SchedulerConfig(min_resident=100, max_wait=30),
    ) as box:
        scheduler = box.router.scheduler
        v_done = trio.Event()
        box.request("V", hold=v_done)  # busy until v_done
        await trio.sleep_until(200)
        box.router.release(await box.router.acquire("T"))  # beside V; protected until ~301
        await trio.sleep_until(210)
        box.request("X")  # V is busy: fit picks T, which minResident keeps: queued
        await trio.sleep_until(250)
        box.request("T")  # X waited 40s > maxWait and needs T gone: queued behind it
        await until(lambda: scheduler.queued("T") == 1)
        await trio.sleep_until(260)
        box.request("X")  # a second X request, queued
        await trio.sleep_until(295)
        v_done.set()  # V idle: X's swap puts it to sleep (a wake costs a tenth of a load)
        await until(lambda: len(box.results.get("X", [])) == 2 and len(box.results["T"]) == 1)
        assert box.processes["V"].state is ProcessState.SLEEPING
        assert box.launcher.what("V") == ["spawn"]
        assert [call for _, _, call in sleep_calls] == ["sleep"]


async def test_a_start_out_of_host_memory_beside_sleepers_is_retried_after_stopping_them(
    autojump_clock: trio.testing.MockClock, sleep_calls: list[tuple[float, int, str]]
) -> None:
    """Only S was resident, asleep (holding 70 of ram by fit's count), when T ran out of
    host memory: fit learns T needs more than was free beside S, stops S and loads T
    once more. The sleepers were not counted as resident: no retry, no learning."""
    async with running(
        {
            "S": Behaviour(),
            "V": Behaviour(),
            "T": Behaviour(ready_after=5, crash_after=1, lines=("std::bad_alloc",)),
        },
        settings={"S": needs(10, 60, sleeps=True), "V": needs(10, 60), "T": needs(20)},
        resources={"ram": 100, "vram0": 100},
    ) as box:
        box.router.release(await box.router.acquire("S"))
        box.router.release(await box.router.acquire("V"))  # S sleeps for V's GPU memory
        await box.router.unload(["V"])
        assert box.processes["S"].state is ProcessState.SLEEPING
        with pytest.raises(ModelStartFailed, match="bad_alloc"):  # it always runs out
            await box.router.acquire("T")
        assert box.launcher.what("T") == ["spawn", "exit 1", "spawn", "exit 1"]
        (stopped,) = box.launcher.when("S", "exit -15")
        assert box.launcher.when("T", "exit 1")[0] < stopped <= box.launcher.when("T", "spawn")[1]


async def test_a_model_is_not_measured_awake_while_its_sleep_call_runs(
    autojump_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """vLLM's level 1 copies the weights to host memory during the sleep call, while the
    process is still READY: measured then as awake, its ram need took the weights in for
    good (an overrun of its declared 10). Asleep it is measured as asleep."""
    moving = trio.Event()
    moved = trio.Event()

    async def sleep_server(upstream: Upstream, config: SleepConfig) -> None:
        moving.set()
        await trio.sleep(20)  # measured every second meanwhile
        moved.set()

    monkeypatch.setattr(process_module, "sleep_server", sleep_server)

    async def footprint(pid: int) -> dict[str, int]:
        await trio.lowlevel.checkpoint()
        if moved.is_set():
            return {"ram": 300, "vram0": 0}  # asleep: the weights in host memory
        return {"ram": 500 if moving.is_set() else 5, "vram0": 50}

    async with running(
        {"A": Behaviour(), "V": Behaviour()},
        settings={"A": needs(10, 60, sleeps=True), "V": needs(10, 60)},
        resources={"ram": 1000, "vram0": 100},
        footprint=footprint,
    ) as box:
        ledger = box.router.ledger
        assert ledger is not None
        box.router.release(await box.router.acquire("A"))
        await trio.sleep(5)
        box.router.release(await box.router.acquire("V"))  # A sleeps for V's GPU memory
        await until(lambda: ledger.asleep_need("A")["ram"] == 330)  # measured asleep, +10 %
        assert ledger.peak("A") == {"ram": 5, "vram0": 50}
        assert ledger.need("A") == {"ram": 10, "vram0": 60}  # as declared
