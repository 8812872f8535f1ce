"""What ``trio-swap check --format json`` and ``trio-swap plan`` print.

Both are contracts: tests and people read them. ``describe`` shows the policy
the config sets up (groups, or the matrix's sets expanded into sorted
combinations); ``plan`` answers "with these models running, what would a
request for X stop, and why".
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec

from trio_swap.config.model import Config
from trio_swap.policy import GroupsPolicy, build_policy

__all__ = ["PlanResult", "describe", "plan"]


class PlanResult(msgspec.Struct, frozen=True):
    """The JSON answer of ``trio-swap plan``; ``set`` and ``cost`` are null for groups."""

    evict: list[str]
    set: str | None
    cost: int | None


def describe(config: Config) -> dict[str, object]:
    """The ``check --format json`` document, in definition order."""
    policy = build_policy(config)
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
    else:
        from trio_swap.policy.matrix import MatrixPolicy

        assert isinstance(policy, MatrixPolicy)
        result["sets"] = {
            name: [sorted(combination) for combination in policy.expand_set(name)]
            for name in policy.set_names
        }
    return result


def plan(config: Config, running: Sequence[str], request: str) -> tuple[PlanResult, str]:
    """What the policy does for ``request`` with ``running`` loaded: (JSON answer, sentence).

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
    policy = build_policy(config)
    if isinstance(policy, GroupsPolicy):
        evicted = policy.evictions(target, resolved)
        return PlanResult(list(evicted), None, None), policy.explain(target, resolved)
    from trio_swap.policy.matrix import MatrixPolicy

    assert isinstance(policy, MatrixPolicy)
    chosen = policy.plan(target, resolved)
    return (
        PlanResult(list(chosen.evict), chosen.set_name, chosen.cost),
        policy.explain(target, resolved),
    )
