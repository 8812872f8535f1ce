"""llama-swap's groups: swap, exclusive and persistent flags decide the evictions.

For a target T in group G, each running model M != T is evicted when

1. M is in G and G swaps (members run one at a time), or
2. M is in another group H, G is exclusive, and H is not persistent.

Only the target's group decides: a non-exclusive target never evicts models
outside its group, and an exclusive group does not protect its own members
from a non-exclusive group's model (llama-swap's documented one-way rule,
kept for compatibility; see docs/swap-policies.md). Models listed in no group
form the implicit ``(default)`` group, which swaps and is exclusive, so a
config without groups runs one model at a time.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import final

from trio_swap.config.model import DEFAULT_GROUP, GroupConfig
from trio_swap.policy.base import NO_CONTEXT, Placement

__all__ = ["GroupsPolicy"]


@final
class GroupsPolicy:
    """A pure function of (target, running) built from the configured groups."""

    def __init__(self, groups: Iterable[GroupConfig], models: Iterable[str]) -> None:
        listed = list(groups)
        grouped = {member for group in listed for member in group.members}
        default = GroupConfig(
            name=DEFAULT_GROUP,
            members=tuple(sorted(m for m in models if m not in grouped)),
        )
        #: Every group, the implicit one last, in definition order.
        self.groups: tuple[GroupConfig, ...] = (*listed, default)
        self._group_of = {member: group for group in self.groups for member in group.members}

    def group_of(self, model: str) -> GroupConfig:
        return self._group_of[model]

    def evictions(
        self, target: str, running: Sequence[str], context: Placement = NO_CONTEXT
    ) -> tuple[str, ...]:
        group = self._group_of[target]
        return tuple(model for model in running if model != target and self._evicts(group, model))

    def _evicts(self, group: GroupConfig, model: str) -> bool:
        other = self._group_of[model]
        if other is group:
            return group.swap  # (1)
        return group.exclusive and not other.persistent  # (2)

    def explain(self, target: str, running: Sequence[str]) -> str:
        """One or two sentences on why these models go (for ``trio-swap plan``)."""
        group = self._group_of[target]
        evicted = self.evictions(target, running)
        flags = f"swap: {str(group.swap).lower()}, exclusive: {str(group.exclusive).lower()}"
        head = f"{target} is in group {group.name!r} ({flags})."
        if not evicted:
            return head + " Nothing has to stop."
        reasons = []
        for model in evicted:
            other = self._group_of[model]
            if other is group:
                reasons.append(f"{model} (same group, which swaps)")
            else:
                reasons.append(f"{model} (group {other.name!r} is not persistent)")
        return head + " It evicts " + ", ".join(reasons) + "."
