"""What ``trio-swap check --format json`` and ``trio-swap plan`` print.

Both are contracts: tests and people read them. ``describe`` shows the policy
the config sets up (groups, or the matrix's sets expanded into sorted
combinations); ``plan`` answers "with these models running, what would a
request for X stop, and why".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import msgspec

from trio_swap.config.model import Config
from trio_swap.fit.ledger import FORMULA, FitLedger, Learned
from trio_swap.policy import FitPolicy, GroupsPolicy, build_policy
from trio_swap.policy.base import Placement, SwapPolicy
from trio_swap.policy.fit import FitPlan, amount, shortage
from trio_swap.policy.matrix import MatrixPolicy

__all__ = ["PlanResult", "describe", "plan"]


class PlanResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """The JSON answer of ``trio-swap plan``; ``set`` and ``cost`` are null for groups;
    ``fit`` (with ``resources:``) holds the numbers fit by memory decided with."""

    evict: list[str]
    set: str | None
    cost: int | None
    fit: dict[str, object] | None = None


def describe(config: Config) -> dict[str, object]:
    """The ``check --format json`` document, in definition order."""
    policy = build_policy(config)
    if isinstance(policy, FitPolicy):
        result_fit: dict[str, object] = {
            "resources": dict(config.resources),
            "needs": {m.id: dict(m.needs) for m in config.models.values() if m.needs},
        }
        policy = policy.inner or policy
    result: dict[str, object] = {
        "router": config.routing.router,
        "models": list(config.models),
    }
    if isinstance(policy, GroupsPolicy):
        result["groups"] = {
            group.name: {
                "swap": group.swap,
                "exclusive": group.exclusive,
                "persistent": group.persistent,
                "members": list(group.members),
            }
            for group in policy.groups
        }
    elif isinstance(policy, MatrixPolicy):
        result["sets"] = {
            name: [sorted(combination) for combination in policy.expand_set(name)]
            for name in policy.set_names
        }
    if config.resources:
        result["fit"] = result_fit
    return result


def plan(
    config: Config,
    running: Sequence[str],
    request: str,
    *,
    learned: Mapping[str, Learned] | None = None,
    estimates: Mapping[str, int] | None = None,
    asleep: Sequence[str] = (),
) -> tuple[PlanResult, str]:
    """What the policy does for ``request`` with ``running`` loaded and ``asleep`` asleep
    (``sleep:`` models: fit counts their host memory): (JSON answer, sentence).

    Raises:
        ValueError: an unknown model name (the message says which).
    """
    target = config.resolve(request)
    if target is None:
        raise ValueError(f"unknown model {request!r} (not a model id or alias)")
    resolved: list[str] = []
    for name in running:
        model = config.resolve(name)
        if model is None:
            raise ValueError(f"unknown running model {name!r} (not a model id or alias)")
        if model not in resolved:
            resolved.append(model)
    sleepers: list[str] = []
    for name in asleep:
        model = config.resolve(name)
        if model is None or config.models[model].sleep is None:
            raise ValueError(f"asleep model {name!r} is not a model with sleep:")
        if model in resolved:
            raise ValueError(f"model {name!r} cannot be both running and asleep")
        sleepers.append(model)
    ledger = FitLedger(
        config.resources, config.models, ports=config.ports, estimates=estimates, learned=learned
    )
    ledger.set_asleep(sleepers)
    policy = build_policy(config, ledger)
    if isinstance(policy, FitPolicy):
        return _fit_plan(policy, target, resolved)
    return _inner_plan(policy, target, resolved)


def _inner_plan(policy: SwapPolicy, target: str, resolved: list[str]) -> tuple[PlanResult, str]:
    if isinstance(policy, GroupsPolicy):
        evicted = policy.evictions(target, resolved)
        return PlanResult(list(evicted), None, None), policy.explain(target, resolved)
    assert isinstance(policy, MatrixPolicy)
    chosen = policy.plan(target, resolved)
    return (
        PlanResult(list(chosen.evict), chosen.set_name, chosen.cost),
        policy.explain(target, resolved),
    )


def _fit_plan(policy: FitPolicy, target: str, resolved: list[str]) -> tuple[PlanResult, str]:
    """The inner policy's answer, then what fit adds, with every number it used."""
    ledger = policy.ledger
    # As serve decides: a target already running needs no room.
    chosen = policy.plan(target, resolved, Placement(resident=target in resolved))
    if policy.inner is not None:
        inner, sentence = _inner_plan(policy.inner, target, resolved)
        head = sentence + " "
        # The inner policy's victims with sleep: sleep, unless they would not fit asleep.
        ways = [
            f"{m} sleeps" if m in chosen.sleep else f"{m} stops (it would not fit asleep)"
            for m in chosen.inner
            if ledger.can_sleep(m)
        ]
        if ways:
            head += f"By memory, {', '.join(ways)}. "
    else:
        inner, head = PlanResult([], None, None), ""
    models = {
        model: {
            "need": ledger.need(model),
            "basis": ledger.basis(model),
            "load_seconds": ledger.load_seconds(model),
            "eviction_cost": round(ledger.eviction_cost(model), 6),
        }
        for model in dict.fromkeys([target, *resolved])
    }
    fit: dict[str, object] = {
        "resources": chosen.capacity,
        "need": chosen.need,
        "free_before": chosen.free_before,
        "used_after": chosen.used_after,
        "evicts": list(chosen.fit),
        "sleeps": list(chosen.sleep),
        "stops_asleep": list(chosen.stop_asleep),
        "fits": chosen.fits,
        "models": models,
        "formula": FORMULA,
    }
    if chosen.fit or chosen.stop_asleep:
        going = [*chosen.fit, *chosen.stop_asleep]
        costs = ", ".join(f"{m} {chosen.costs[m]:.2f}s" for m in going)
        ways = [f"{m} ({_way(m, chosen)})" for m in going]
        sentence = (
            f"{head}Fit by memory evicts {', '.join(ways)}: {target} needs "
            f"{shortage(chosen)}, and this is the cheapest set (expected {costs} of "
            "reloading or waking)."
        )
    elif not chosen.fits and target in resolved:
        sentence = f"{head}{target} is already running: it needs no room."
    else:
        needs = ", ".join(f"{n} {amount(n, s)}" for n, s in chosen.need.items())
        sentence = f"{head}{target} needs {needs or 'nothing declared'} and fits beside the rest."
    return PlanResult(list(chosen.evict), inner.set, inner.cost, fit), sentence


def _way(model: str, chosen: FitPlan) -> str:
    """How ``model`` makes room in ``chosen``."""
    if model in chosen.stop_asleep:
        return "stops asleep"
    return "sleeps" if model in chosen.sleep else "stops"
