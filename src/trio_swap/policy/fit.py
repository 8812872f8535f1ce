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

The search is exact (branch and bound over subsets) up to
:data:`EXACT_LIMIT` candidates, greedy beyond. Pure: the ledger is data the
router updates between decisions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final, final

import msgspec

from trio_swap.config.sizes import format_size
from trio_swap.fit.ledger import Basis, FitLedger, is_measured
from trio_swap.policy.base import NO_CONTEXT, Placement, SwapPolicy

__all__ = ["EXACT_LIMIT", "FitPlan", "FitPolicy", "amount", "shortage", "victim_key"]

#: Most candidate victims searched exactly (2^n subsets at worst, ~10 ms at 12; pruning
#: usually keeps it far smaller). Beyond it the greedy search runs.
EXACT_LIMIT: Final = 12

#: A victim set's rank: lower is better (the module docstring's order).
_Key = tuple[int, int, float, int, tuple[int, ...]]


class FitPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What fit decided for one request, with the numbers behind it."""

    evict: tuple[str, ...]
    #: Evicted by the inner policy (groups or matrix), before fit looked.
    inner: tuple[str, ...]
    #: Added by fit to make room.
    fit: tuple[str, ...]
    #: Bytes per resource: capacity, the target's need, and what stays running.
    capacity: dict[str, int]
    need: dict[str, int]
    #: What is free beside the models the inner policy keeps, before fit evicts.
    free_before: dict[str, int]
    used_after: dict[str, int]
    #: Expected seconds of reloading of each victim fit chose.
    costs: dict[str, float]
    fits: bool


def victim_key(
    chosen: Sequence[int], names: Sequence[str], context: Placement, cost: Mapping[str, float]
) -> _Key:
    """The rank of evicting ``names[i]`` for each i in ``chosen`` (lower wins)."""
    pinned = sum(1 for i in chosen if names[i] in context.pinned)
    busy = sum(1 for i in chosen if names[i] in context.busy)
    total = sum(0.0 if names[i] in context.stopping else cost[names[i]] for i in chosen)
    return (pinned, busy, round(total, 9), len(chosen), tuple(chosen))


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
        self._latest[target] = cached
        return cached

    def _plan(self, target: str, running: Sequence[str], context: Placement) -> FitPlan:
        ledger = self.ledger
        running = [m for m in dict.fromkeys(running) if m != target]
        inner = self.inner.evictions(target, running, context) if self.inner else ()
        kept = [m for m in running if m not in inner]
        capacity = ledger.resources
        needs = {m: ledger.need(m) for m in kept}
        need = self._target_need(target, kept, needs, context)
        over = {
            name: sum(n.get(name, 0) for n in needs.values()) + need.get(name, 0) - size
            for name, size in capacity.items()
        }
        over = {name: excess for name, excess in over.items() if excess > 0}
        chosen: tuple[str, ...] = ()
        # A target already running needs no room: an overcommit a new measurement
        # found is settled at the next load, never by cutting a ready model.
        if over and not context.resident:
            cost = {m: ledger.eviction_cost(m) for m in kept}
            picked = _cheapest(kept, needs, over, context, cost)
            chosen = tuple(kept[i] for i in picked)
        evict = tuple(m for m in running if m in inner or m in chosen)
        staying = [m for m in kept if m not in chosen]
        used_after = {
            name: sum(needs[m].get(name, 0) for m in staying) + need.get(name, 0)
            for name in capacity
        }
        return FitPlan(
            evict=evict,
            inner=tuple(inner),
            fit=chosen,
            capacity=dict(capacity),
            need=need,
            free_before={
                name: size - sum(n.get(name, 0) for n in needs.values())
                for name, size in capacity.items()
            },
            used_after=used_after,
            costs={m: ledger.eviction_cost(m) for m in chosen},
            fits=all(used_after[name] <= size for name, size in capacity.items()),
        )

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
        if plan is None or victim not in plan.evict:
            return f"evicted for {target}"
        return self.explain_victim(target, plan, victim)

    def explain_victim(self, target: str, plan: FitPlan, victim: str) -> str:
        """Why ``victim`` goes, in one sentence (the timeline and the log show it)."""
        if victim in plan.inner:
            return f"the swap policy evicts it for {target}"
        cost = plan.costs.get(victim, 0.0)
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


def _cheapest(
    names: Sequence[str],
    needs: Mapping[str, Mapping[str, int]],
    over: Mapping[str, int],
    context: Placement,
    cost: Mapping[str, float],
) -> tuple[int, ...]:
    """Indices of the best-ranked subset of ``names`` freeing at least ``over`` of each."""
    frees = [[needs[m].get(name, 0) for name in over] for m in names]
    goal = list(over.values())
    everything = tuple(range(len(names)))
    if not _enough(everything, frees, goal):
        return everything  # even evicting all cannot make room: the target runs alone
    if len(names) > EXACT_LIMIT:
        return _greedy(names, frees, goal, context, cost)
    best: list[tuple[_Key, tuple[int, ...]]] = []

    def search(start: int, chosen: tuple[int, ...]) -> None:
        if _enough(chosen, frees, goal):
            key = victim_key(chosen, names, context, cost)
            if not best or key < best[0][0]:
                best[:] = [(key, chosen)]
            return  # a superset only ranks worse (more of everything counted)
        if best and victim_key(chosen, names, context, cost)[:3] > best[0][0][:3]:
            return  # already worse on pinned, busy or cost: adding only adds
        for index in range(start, len(names)):
            search(index + 1, (*chosen, index))

    search(0, ())
    return best[0][1]


def _enough(chosen: Sequence[int], frees: Sequence[Sequence[int]], goal: Sequence[int]) -> bool:
    return all(sum(frees[i][r] for i in chosen) >= need for r, need in enumerate(goal))


def _greedy(
    names: Sequence[str],
    frees: Sequence[Sequence[int]],
    goal: Sequence[int],
    context: Placement,
    cost: Mapping[str, float],
) -> tuple[int, ...]:
    """Many candidates: take the best rank per byte freed until enough, then drop extras."""
    total_goal = sum(goal) or 1

    def rank(i: int) -> tuple[int, int, float]:
        useful = sum(min(f, g) for f, g in zip(frees[i], goal, strict=True)) / total_goal
        price = 0.0 if names[i] in context.stopping else cost[names[i]]
        return (names[i] in context.pinned, names[i] in context.busy, price / max(useful, 1e-12))

    chosen: list[int] = []
    for index in sorted(range(len(names)), key=rank):
        if _enough(chosen, frees, goal):
            break
        chosen.append(index)
    for index in sorted(chosen, key=rank, reverse=True):  # most expensive first
        trial = [i for i in chosen if i != index]
        if _enough(trial, frees, goal):
            chosen = trial
    return tuple(sorted(chosen))
