"""Fit by memory: the running set stays within what the box has; the cheapest go first.

A constraint that composes with any policy. The inner policy (groups or the
matrix; none when the config has neither) evicts what it evicts; then, if the
target's need does not fit beside what is left, fit adds the victim set that
frees enough of every exhausted resource at the lowest cost. The order of
preference, compared in turn (docs/swap-policies.md#fit):

1. fewest pinned models (``swappable: false``; choosing one gets the request
   a clear "pinned" error, so only when nothing else frees enough);
2. fewest busy models (requests in flight: the swap would wait for them);
3. lowest total eviction cost (:meth:`FitLedger.eviction_cost`; a model
   already stopping costs nothing: it is going anyway);
4. fewest models; then the earliest in running order.

A model with ``sleep:`` has two ways to go: **sleep** (its GPU memory is
freed, its asleep need stays, a wake costs little) or **stop** (everything
is freed, a cold load costs more); a model already asleep may be **stopped**
to free its host memory. Each candidate contributes at most one of its ways;
a victim of the inner policy that can sleep sleeps, unless fit stops it.
So a model too big to sleep beside the others is stopped instead
(docs/sleep.md).

The search is exact (branch and bound over the candidates' ways) while the
choices number at most :data:`EXACT_LIMIT` candidates' worth (2^12), greedy
beyond. Pure: the ledger is data the router updates between decisions.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Final, NamedTuple, final

import msgspec

from trio_swap.config.sizes import format_size
from trio_swap.fit.ledger import Basis, FitLedger, is_measured
from trio_swap.policy.base import NO_CONTEXT, Placement, SwapPolicy

__all__ = ["EXACT_LIMIT", "Action", "FitPlan", "FitPolicy", "amount", "shortage"]

#: Most candidate victims searched exactly when each has one way to go (2^n
#: choices at worst, ~10 ms at 12; pruning usually keeps it far smaller). With
#: sleepers (two ways) the exact search runs while its choices number at most
#: as many. Beyond, the greedy search runs.
EXACT_LIMIT: Final = 12
_EXACT_CHOICES: Final = 2**EXACT_LIMIT


class Action(enum.IntEnum):
    """How a candidate makes room."""

    SLEEP = 1  # a running ``sleep:`` model sleeps: its GPU memory is freed
    STOP = 2  # a running model stops, or a sleeping one is stopped


class _Option(NamedTuple):
    candidate: int
    action: Action
    frees: tuple[int, ...]  # per resource; may be negative (a sleep into host memory)
    cost: float
    pinned: bool
    busy: bool


#: A choice's rank: lower is better (the module docstring's order).
_Key = tuple[int, int, float, int, tuple[tuple[int, int], ...]]


class FitPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What fit decided for one request, with the numbers behind it."""

    evict: tuple[str, ...]
    #: Evicted by the inner policy (groups or matrix), before fit looked.
    inner: tuple[str, ...]
    #: Running models fit chose to make room (they sleep or stop).
    fit: tuple[str, ...]
    #: Of ``evict``, the models that sleep instead of stopping.
    sleep: tuple[str, ...] = ()
    #: Models asleep now that fit stops to free their host memory.
    stop_asleep: tuple[str, ...] = ()
    #: Bytes per resource: capacity, the target's need, and what stays running.
    capacity: dict[str, int]
    need: dict[str, int]
    #: What is free beside the models the inner policy keeps, before fit evicts.
    free_before: dict[str, int]
    used_after: dict[str, int]
    #: Expected seconds of reloading (or waking) for each victim fit chose.
    costs: dict[str, float]
    fits: bool


@final
class FitPolicy:
    """``inner``'s evictions, plus the cheapest set that makes ``target`` fit."""

    def __init__(self, ledger: FitLedger, inner: SwapPolicy | None = None) -> None:
        self.ledger = ledger
        self.inner = inner
        #: The latest plan per target: what :meth:`explain` describes (a memo, not state).
        self._latest: dict[str, FitPlan] = {}
        #: Plans of this router step (the scheduler asks again for each queued request),
        #: valid while the ledger's version and clock are unchanged.
        self._cache: dict[tuple[str, tuple[str, ...], Placement], FitPlan] = {}
        self._cache_key: tuple[int, float] = (-1, 0.0)
        #: Whether a swap to this target is under way (the router sets it). A plan asked
        #: for such a target is a what-if (the scheduler's starvation check asks what it
        #: would need, its victims already stopping), not the plan behind that swap:
        #: it does not replace :meth:`latest`, which the router reads as it starts it.
        self.swapping: Callable[[str], bool] = lambda target: False

    def evictions(
        self, target: str, running: Sequence[str], context: Placement = NO_CONTEXT
    ) -> tuple[str, ...]:
        return self.plan(target, running, context).evict

    def plan(self, target: str, running: Sequence[str], context: Placement = NO_CONTEXT) -> FitPlan:
        ledger = self.ledger
        if self._cache_key != (ledger.version, ledger.now):
            self._cache.clear()
            self._cache_key = (ledger.version, ledger.now)
        key = (target, tuple(running), context)
        cached = self._cache.get(key)
        if cached is None:
            cached = self._cache[key] = self._plan(target, running, context)
        if not self.swapping(target):
            self._latest[target] = cached
        return cached

    def latest(self, target: str) -> FitPlan | None:
        """The plan behind the latest :meth:`evictions` for ``target`` (the router reads
        which victims sleep and which sleepers stop as it starts the swap)."""
        return self._latest.get(target)

    def _plan(self, target: str, running: Sequence[str], context: Placement) -> FitPlan:
        ledger = self.ledger
        running = [m for m in dict.fromkeys(running) if m != target]
        inner = self.inner.evictions(target, running, context) if self.inner else ()
        kept = [m for m in running if m not in inner]
        # The inner policy's victims that can sleep will: they join the sleepers.
        inner_sleepers = [m for m in inner if ledger.can_sleep(m) and m not in context.stopping]
        sleepers = [m for m in ledger.asleep() if m != target and m not in running]
        capacity = ledger.resources
        needs = {m: ledger.need(m) for m in kept}
        held = {m: ledger.asleep_need(m) for m in [*sleepers, *inner_sleepers]}
        need = self._target_need(target, kept, needs, context)
        taken = {
            name: sum(n.get(name, 0) for n in needs.values())
            + sum(h.get(name, 0) for h in held.values())
            for name in capacity
        }
        # Per resource, what must be freed (negative: the room to spare, which a
        # sleep that moves weights into host memory may use up).
        goal = {name: taken[name] + need.get(name, 0) - size for name, size in capacity.items()}
        chosen: list[_Option] = []
        candidates = [*kept, *inner_sleepers, *sleepers]
        # A target already running needs no room: an overcommit a new measurement
        # found is settled at the next load, never by cutting a ready model.
        if any(excess > 0 for excess in goal.values()) and not context.resident:
            options = self._options(kept, [*inner_sleepers, *sleepers], needs, held, goal, context)
            chosen = _cheapest(options, list(goal.values()))
        picked = {candidates[o.candidate]: o for o in chosen}
        going = [m for m in kept if m in picked]
        sleep = tuple(
            m
            for m in running
            if (m in inner_sleepers and m not in picked)
            or (m in picked and picked[m].action is Action.SLEEP)
        )
        stop_asleep = tuple(m for m in sleepers if m in picked)
        after = dict.fromkeys(capacity, 0)
        for m in kept:
            option = picked.get(m)
            if option is None:
                hold = needs[m]
            elif option.action is Action.SLEEP:
                hold = ledger.asleep_need(m)
            else:
                hold = {}
            for name in capacity:
                after[name] += hold.get(name, 0)
        for m in [*inner_sleepers, *sleepers]:
            if m not in picked:
                for name in capacity:
                    after[name] += held[m].get(name, 0)
        used_after = {name: after[name] + need.get(name, 0) for name in capacity}
        return FitPlan(
            evict=tuple(m for m in running if m in inner or m in picked),
            inner=tuple(inner),
            fit=tuple(going),
            sleep=sleep,
            stop_asleep=stop_asleep,
            capacity=dict(capacity),
            need=need,
            free_before={name: size - taken[name] for name, size in capacity.items()},
            used_after=used_after,
            costs={candidates[o.candidate]: o.cost for o in chosen},
            fits=all(used_after[name] <= size for name, size in capacity.items()),
        )

    def _options(
        self,
        kept: Sequence[str],
        asleep: Sequence[str],
        needs: Mapping[str, Mapping[str, int]],
        held: Mapping[str, dict[str, int]],
        goal: Mapping[str, int],
        context: Placement,
    ) -> list[_Option]:
        """Every way each candidate (``kept`` first, then ``asleep``) can make room."""
        ledger = self.ledger
        names = list(goal)
        options: list[_Option] = []
        for index, m in enumerate(kept):
            pinned, busy = m in context.pinned, m in context.busy
            if m in context.stopping:  # going anyway: stopping it costs nothing
                frees = tuple(needs[m].get(r, 0) for r in names)
                options.append(_Option(index, Action.STOP, frees, 0.0, pinned, busy))
                continue
            if ledger.can_sleep(m):
                asleep_need = ledger.asleep_need(m)
                frees = tuple(needs[m].get(r, 0) - asleep_need.get(r, 0) for r in names)
                cost = ledger.sleep_cost(m)
                options.append(_Option(index, Action.SLEEP, frees, cost, pinned, busy))
            frees = tuple(needs[m].get(r, 0) for r in names)
            cost = ledger.eviction_cost(m)
            options.append(_Option(index, Action.STOP, frees, cost, pinned, busy))
        for offset, m in enumerate(asleep):
            if m in context.pinned:
                continue  # ``swappable: false``: only an unload stops it
            frees = tuple(held[m].get(r, 0) for r in names)
            cost = ledger.asleep_stop_cost(m)
            options.append(_Option(len(kept) + offset, Action.STOP, frees, cost, False, False))
        return options

    def _target_need(
        self,
        target: str,
        kept: Sequence[str],
        needs: Mapping[str, Mapping[str, int]],
        context: Placement,
    ) -> dict[str, int]:
        """The target's need; where it is unknown ("the whole resource"), the whole
        resource *but what pinned models hold*: they cannot go, so it is loaded
        beside them and measured, rather than refused forever."""
        need = self.ledger.need(target)
        basis = self.ledger.basis(target)
        pinned = [m for m in kept if m in context.pinned]
        for name, size in self.ledger.resources.items():
            if basis.get(name) == Basis.UNKNOWN.value and pinned:
                held = sum(needs[m].get(name, 0) for m in pinned)
                need[name] = max(0, size - held)
        return need

    def explain(self, target: str, victim: str) -> str:
        """Why the latest plan for ``target`` evicts ``victim`` (the router asks as it swaps)."""
        plan = self._latest.get(target)
        if plan is None or (victim not in plan.evict and victim not in plan.stop_asleep):
            return f"evicted for {target}"
        return self.explain_victim(target, plan, victim)

    def explain_victim(self, target: str, plan: FitPlan, victim: str) -> str:
        """Why ``victim`` goes, in one sentence (the timeline and the log show it)."""
        if victim in plan.inner:
            how = "sleeps" if victim in plan.sleep else "stops"
            return f"the swap policy evicts it for {target}; it {how}"
        cost = plan.costs.get(victim, 0.0)
        if victim in plan.stop_asleep:
            return (
                f"{target} needs {shortage(plan)}: {victim} is asleep and stopping it is in "
                f"the cheapest set (expected {cost:.2f}s more to load it than to wake it)"
            )
        if victim in plan.sleep:
            return (
                f"{target} needs {shortage(plan)}: {victim} sleeps, in the cheapest set "
                f"(expected {cost:.2f}s of waking for it)"
            )
        return (
            f"{target} needs {shortage(plan)}: {victim} is in the cheapest set to reload "
            f"(expected {cost:.2f}s of loading for it)"
        )


def shortage(plan: FitPlan) -> str:
    """``ram 400 MiB with 224 MiB free``, per resource the target did not fit in."""
    short = [
        f"{name} {amount(name, plan.need[name])} with {amount(name, max(0, free))} free"
        for name, free in plan.free_before.items()
        if plan.need.get(name, 0) > free
    ]
    return "; ".join(short) or "room"


def amount(resource: str, size: int) -> str:
    """Bytes for memory, a plain number for a counted resource (``slots``)."""
    return format_size(size) if is_measured(resource) else str(size)


def _key(chosen: Sequence[_Option]) -> _Key:
    """The rank of a choice (lower wins)."""
    return (
        sum(o.pinned for o in chosen),
        sum(o.busy for o in chosen),
        round(sum(o.cost for o in chosen), 9),
        len(chosen),
        tuple(sorted((o.candidate, int(o.action)) for o in chosen)),
    )


def _cheapest(options: Sequence[_Option], goal: Sequence[int]) -> list[_Option]:
    """The best-ranked choice (at most one option per candidate) freeing ``goal``."""
    by_candidate: dict[int, list[_Option]] = {}
    for option in options:
        by_candidate.setdefault(option.candidate, []).append(option)
    groups = list(by_candidate.values())
    most = [max(group, key=lambda o: sum(o.frees)) for group in groups]  # STOP: frees all
    if not _enough(most, goal):
        return most  # even evicting all cannot make room: the target runs alone
    if math.prod(len(group) + 1 for group in groups) > _EXACT_CHOICES:
        return _greedy(groups, goal)
    best: list[tuple[_Key, list[_Option]]] = []

    def search(start: int, chosen: list[_Option]) -> None:
        if _enough(chosen, goal):
            key = _key(chosen)
            if not best or key < best[0][0]:
                best[:] = [(key, list(chosen))]
            return  # adding only adds (costs and counts are never negative)
        if best and _key(chosen)[:3] > best[0][0][:3]:
            return  # already worse on pinned, busy or cost
        for index in range(start, len(groups)):
            for option in groups[index]:
                chosen.append(option)
                search(index + 1, chosen)
                chosen.pop()

    search(0, [])
    return best[0][1]


def _enough(chosen: Sequence[_Option], goal: Sequence[int]) -> bool:
    return all(sum(o.frees[r] for o in chosen) >= need for r, need in enumerate(goal))


def _greedy(groups: Sequence[Sequence[_Option]], goal: Sequence[int]) -> list[_Option]:
    """Many candidates: repeatedly take the option with the best rank per byte of
    shortage it removes (a stop may replace a sleep of the same model), then drop
    what is not needed, most expensive first."""
    chosen: dict[int, _Option] = {}

    def shortage(picked: Sequence[_Option]) -> int:
        return sum(max(0, need - sum(o.frees[r] for o in picked)) for r, need in enumerate(goal))

    while not _enough(list(chosen.values()), goal):
        before = shortage(list(chosen.values()))
        best: tuple[tuple[bool, bool, float], _Option] | None = None
        for option in (o for group in groups for o in group):
            current = chosen.get(option.candidate)
            if current is option:
                continue
            trial = [o for o in chosen.values() if o.candidate != option.candidate]
            gain = before - shortage([*trial, option])
            if gain <= 0:
                continue
            extra = option.cost - (current.cost if current is not None else 0.0)
            rank = (option.pinned, option.busy, max(extra, 0.0) / gain)
            if best is None or rank < best[0]:
                best = (rank, option)
        if best is None:  # nothing helps any more (cannot happen: stopping all is enough)
            return [max(group, key=lambda o: sum(o.frees)) for group in groups]
        chosen[best[1].candidate] = best[1]
    for option in sorted(chosen.values(), key=lambda o: (o.pinned, o.busy, o.cost), reverse=True):
        trial = [o for o in chosen.values() if o.candidate != option.candidate]
        if _enough(trial, goal):
            del chosen[option.candidate]
    return sorted(chosen.values(), key=lambda o: o.candidate)
