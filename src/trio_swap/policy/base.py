"""The seam between *which* models must stop (a policy) and *when* (the scheduler)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

__all__ = ["SwapPolicy"]


class SwapPolicy(Protocol):
    """Decides which running models must stop before ``target`` may run.

    Pure: no I/O, no clock, no logging. The scheduler calls it on every
    placement attempt, so it must be cheap.
    """

    def evictions(self, target: str, running: Sequence[str]) -> tuple[str, ...]:
        """The models in ``running`` (never ``target``) to stop, in ``running``'s order.

        ``running`` holds every model that is starting, ready or stopping, and
        the targets of swaps already committed.
        """
        ...
