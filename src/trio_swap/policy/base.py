"""The seam between *which* models must stop (a policy) and *when* (the scheduler)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final, Protocol, final

import msgspec

__all__ = ["NO_CONTEXT", "Placement", "SwapPolicy"]


@final
class Placement(msgspec.Struct, frozen=True, kw_only=True):
    """What the scheduler knows about the running models, for policies that weigh them.

    Groups and the matrix ignore it; fit by memory uses it to prefer idle
    victims, avoid pinned ones, count models already stopping as free, and
    leave a target that already runs alone.
    """

    #: Running models with requests in flight (evicting one means waiting for them).
    busy: frozenset[str] = frozenset()
    #: Models that only an explicit unload stops (``swappable: false``).
    pinned: frozenset[str] = frozenset()
    #: Models already being stopped (a TTL, an unload, another swap).
    stopping: frozenset[str] = frozenset()
    #: The target is already running (ready): it needs no room.
    resident: bool = False


#: The placement a caller without scheduler state passes (``trio-swap plan``, tests).
NO_CONTEXT: Final = Placement()


class SwapPolicy(Protocol):
    """Decides which running models must stop before ``target`` may run.

    Pure: no I/O, no clock, no logging. The scheduler calls it on every
    placement attempt, so it must be cheap.
    """

    def evictions(
        self, target: str, running: Sequence[str], context: Placement = NO_CONTEXT
    ) -> tuple[str, ...]:
        """The models in ``running`` (never ``target``) to stop, in ``running``'s order.

        ``running`` holds every model that is starting, ready or stopping, and
        the targets of swaps already committed.
        """
        ...
