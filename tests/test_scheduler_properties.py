"""Random event sequences against the scheduler: the bookkeeping never drifts.

Checked after every event: each request ends exactly once (one grant then one
finish, or one reject), a swap never evicts a model with requests in flight,
at most one model is loading or ready (the one-at-a-time policy), and when
everything is finished no slot or in-flight count is left over. The same
properties are checked twice: over plain random event lists, and by a hypothesis
``RuleBasedStateMachine`` that also varies the policy (one at a time, or groups).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from trio_swap.config.model import GroupConfig
from trio_swap.errors import ModelStartFailed
from trio_swap.policy import GroupsPolicy, OneAtATime, SwapPolicy
from trio_swap.scheduling import (
    Decision,
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

MODELS = ("A", "B", "C")

operation = st.one_of(
    st.tuples(st.just("request"), st.sampled_from(MODELS)),
    st.tuples(st.just("finish"), st.integers(0, 50)),
    st.tuples(st.just("swap_ok"), st.integers(0, 10)),
    st.tuples(st.just("swap_fail"), st.integers(0, 10)),
    st.tuples(st.just("stops_done"), st.integers(0, 10)),
    st.tuples(st.just("crash"), st.sampled_from(MODELS)),
    st.tuples(st.just("unload"), st.sampled_from(MODELS)),
    st.tuples(st.just("tick"), st.integers(0, 5)),
)


@dataclass
class Ledger:
    scheduler: FifoScheduler
    granted: set[int] = field(default_factory=set)
    ended: set[int] = field(default_factory=set)
    waiting: set[int] = field(default_factory=set)
    swaps: list[int] = field(default_factory=list)
    stops: list[int] = field(default_factory=list)

    def apply(self, decisions: list[Decision]) -> None:
        s = self.scheduler
        for d in decisions:
            match d:
                case Grant(request_id=rid):
                    assert rid in self.waiting, f"grant for {rid} which is not waiting"
                    self.waiting.remove(rid)
                    self.granted.add(rid)
                case Reject(request_id=rid):
                    assert rid in self.waiting, f"reject for {rid} which is not waiting"
                    self.waiting.remove(rid)
                    self.ended.add(rid)
                case StartSwap(swap_id=sid, victims=victims):
                    for victim in victims:
                        assert s.in_flight(victim) == 0, "a swap would cut a request off"
                    self.swaps.append(sid)
                case StopModels(stop_id=stop_id):
                    self.stops.append(stop_id)
                case Queued() | Joined():
                    pass

    def check(self) -> None:
        s = self.scheduler
        live = [m for m in MODELS if s.phase(m) in (Phase.LOADING, Phase.READY)]
        assert len(live) <= 1, f"one-at-a-time broken: {live}"
        assert sum(s.in_flight(m) for m in MODELS) == len(self.granted)
        assert s.pending_requests() == len(self.granted) + len(self.waiting)
        assert sum(s.queued(m) for m in MODELS) <= len(self.waiting)


@settings(max_examples=400, deadline=None)
@given(
    st.lists(operation, max_size=60),
    st.integers(1, 4),
    st.sampled_from([0, 1, 3]),
    st.sampled_from([0.0, 1.0]),
    st.sampled_from(["", "A"]),
    st.dictionaries(st.sampled_from(MODELS), st.integers(-1, 2)),
)
def test_fifo_random_sequences_keep_every_request_accounted_for(
    operations: list[tuple[str, object]],
    limit: int,
    max_queue: int,
    min_resident: float,
    pinned: str,
    priority: dict[str, int],
) -> None:
    limits = {
        m: ModelLimits(
            concurrency_limit=limit,
            ttl=1.0,
            swappable=m != pinned,
            priority=priority.get(m, 0),
        )
        for m in MODELS
    }
    ledger = Ledger(
        FifoScheduler(
            limits, OneAtATime(), max_queue=max_queue, min_resident=min_resident, max_wait=2.0
        )
    )
    s = ledger.scheduler
    now = 0.0
    next_id = 1
    for kind, arg in operations:
        now += 0.25
        if kind == "request":
            rid, next_id = next_id, next_id + 1
            ledger.waiting.add(rid)
            ledger.apply(s.on_request(rid, str(arg), now))
        elif kind == "finish":
            pool = sorted(ledger.granted | ledger.waiting)
            if pool:
                rid = pool[int(arg) % len(pool)]
                ledger.granted.discard(rid)
                ledger.waiting.discard(rid)
                ledger.ended.add(rid)
                ledger.apply(s.on_finished(rid, now))
        elif kind in ("swap_ok", "swap_fail") and ledger.swaps:
            sid = ledger.swaps.pop(int(arg) % len(ledger.swaps))
            error = None
            if kind == "swap_fail":
                error = ModelStartFailed("?", "random failure")
            ledger.apply(s.on_swap_done(sid, error, now))
        elif kind == "stops_done" and ledger.stops:
            ledger.apply(s.on_stops_done(ledger.stops.pop(int(arg) % len(ledger.stops)), now))
        elif kind == "crash":
            ledger.apply(s.on_model_stopped(str(arg), now))
        elif kind == "unload":
            ledger.apply(s.on_unload([str(arg)], now))
        elif kind == "tick":
            now += float(str(arg))
            ledger.apply(s.on_tick(now))
        ledger.check()

    # wind down: finish every swap and stop, then every request
    while ledger.swaps or ledger.stops or ledger.granted or ledger.waiting:
        if ledger.swaps:
            ledger.apply(s.on_swap_done(ledger.swaps.pop(0), None, now))
        elif ledger.stops:
            ledger.apply(s.on_stops_done(ledger.stops.pop(0), now))
        else:
            rid = min(ledger.granted | ledger.waiting)
            ledger.granted.discard(rid)
            ledger.waiting.discard(rid)
            ledger.apply(s.on_finished(rid, now))
        ledger.check()
    assert s.pending_requests() == 0
    assert all(s.in_flight(m) == 0 for m in MODELS)
    assert all(s.queued(m) == 0 for m in MODELS)


class SchedulerMachine(RuleBasedStateMachine):
    """The same invariants as a hypothesis state machine, with the policy varied too.

    Rules are the events the router feeds the scheduler; the invariant runs
    after each one; ``teardown`` winds everything down and checks no slot leaks.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ledger: Ledger | None = None
        self.now = 0.0
        self.next_id = 1

    @initialize(
        limit=st.integers(1, 3),
        max_queue=st.sampled_from([0, 2]),
        pinned=st.sampled_from(["", "B"]),
        groups=st.booleans(),
    )
    def setup(self, limit: int, max_queue: int, pinned: str, groups: bool) -> None:
        policy: SwapPolicy = OneAtATime()
        if groups:  # A and B may run together; C runs alone
            policy = GroupsPolicy([GroupConfig(name="ab", swap=False, members=("A", "B"))], MODELS)
        limits = {
            m: ModelLimits(concurrency_limit=limit, ttl=1.0, swappable=m != pinned) for m in MODELS
        }
        self.policy = policy
        self.ledger = Ledger(FifoScheduler(limits, policy, max_queue=max_queue, max_wait=2.0))

    @property
    def s(self) -> FifoScheduler:
        assert self.ledger is not None
        return self.ledger.scheduler

    @rule(model=st.sampled_from(MODELS))
    def request(self, model: str) -> None:
        assert self.ledger is not None
        rid, self.next_id = self.next_id, self.next_id + 1
        self.ledger.waiting.add(rid)
        self.ledger.apply(self.s.on_request(rid, model, self.now))

    @rule(pick=st.integers(0, 50))
    def finish(self, pick: int) -> None:
        assert self.ledger is not None
        pool = sorted(self.ledger.granted | self.ledger.waiting)
        if pool:
            rid = pool[pick % len(pool)]
            self.ledger.granted.discard(rid)
            self.ledger.waiting.discard(rid)
            self.ledger.apply(self.s.on_finished(rid, self.now))

    @rule(pick=st.integers(0, 10), ok=st.booleans())
    def swap_done(self, pick: int, ok: bool) -> None:
        assert self.ledger is not None
        if self.ledger.swaps:
            sid = self.ledger.swaps.pop(pick % len(self.ledger.swaps))
            error = None if ok else ModelStartFailed("?", "random failure")
            self.ledger.apply(self.s.on_swap_done(sid, error, self.now))

    @rule(pick=st.integers(0, 10))
    def stops_done(self, pick: int) -> None:
        assert self.ledger is not None
        if self.ledger.stops:
            stop = self.ledger.stops.pop(pick % len(self.ledger.stops))
            self.ledger.apply(self.s.on_stops_done(stop, self.now))

    @rule(model=st.sampled_from(MODELS))
    def crash(self, model: str) -> None:
        assert self.ledger is not None
        self.ledger.apply(self.s.on_model_stopped(model, self.now))

    @rule(model=st.sampled_from(MODELS))
    def unload(self, model: str) -> None:
        assert self.ledger is not None
        self.ledger.apply(self.s.on_unload([model], self.now))

    @rule(seconds=st.sampled_from([0.25, 1.0, 3.0]))
    def tick(self, seconds: float) -> None:
        assert self.ledger is not None
        self.now += seconds
        self.ledger.apply(self.s.on_tick(self.now))

    @invariant()
    def bookkeeping_holds(self) -> None:
        if self.ledger is None:
            return
        s = self.s
        assert sum(s.in_flight(m) for m in MODELS) == len(self.ledger.granted)
        assert s.pending_requests() == len(self.ledger.granted) + len(self.ledger.waiting)
        live = [m for m in MODELS if s.phase(m) in (Phase.LOADING, Phase.READY)]
        for model in live:  # every pair of live models is allowed together by the policy
            others = [m for m in live if m != model]
            assert not self.policy.evictions(model, others) or s.phase(model) is Phase.LOADING

    def teardown(self) -> None:
        ledger = self.ledger
        if ledger is None:
            return
        s = ledger.scheduler
        while ledger.swaps or ledger.stops or ledger.granted or ledger.waiting:
            if ledger.swaps:
                ledger.apply(s.on_swap_done(ledger.swaps.pop(0), None, self.now))
            elif ledger.stops:
                ledger.apply(s.on_stops_done(ledger.stops.pop(0), self.now))
            else:
                rid = min(ledger.granted | ledger.waiting)
                ledger.granted.discard(rid)
                ledger.waiting.discard(rid)
                ledger.apply(s.on_finished(rid, self.now))
        assert s.pending_requests() == 0
        assert all(s.in_flight(m) == 0 and s.queued(m) == 0 for m in MODELS)


SchedulerMachine.TestCase.settings = settings(
    max_examples=150, stateful_step_count=40, deadline=None
)
test_scheduler_state_machine = SchedulerMachine.TestCase
