"""llama-swap's default policy: one model at a time (every model in one exclusive group)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import final

from trio_swap.policy.base import NO_CONTEXT, Placement

__all__ = ["OneAtATime"]


@final
class OneAtATime:
    """Every running model other than the target is evicted."""

    def evictions(
        self, target: str, running: Sequence[str], context: Placement = NO_CONTEXT
    ) -> tuple[str, ...]:
        return tuple(model for model in running if model != target)
