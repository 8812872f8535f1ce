"""Test helper: a scheduler view that hides the log-only decisions (Queued, Joined)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trio_swap.scheduling import Decision, FifoScheduler, Joined, Queued


class Quiet:
    """Wraps a FifoScheduler; ``on_*`` results keep only decisions that act."""

    def __init__(self, scheduler: FifoScheduler) -> None:
        self.inner = scheduler

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if not name.startswith("on_"):
            return attribute
        method: Callable[..., list[Decision]] = attribute

        def acting(*args: Any, **kwargs: Any) -> list[Decision]:
            return [d for d in method(*args, **kwargs) if not isinstance(d, Queued | Joined)]

        return acting
