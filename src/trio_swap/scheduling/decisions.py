"""What the scheduler tells the router to do. Frozen, named as imperatives."""

from __future__ import annotations

import msgspec

from trio_swap.errors import SwapError
from trio_swap.reasons import StopReason

__all__ = [
    "Decision",
    "Grant",
    "Joined",
    "Queued",
    "Reject",
    "Retire",
    "StartSwap",
    "StopModels",
]


class Grant(msgspec.Struct, frozen=True, kw_only=True):
    """Let request ``request_id`` go to ``model``'s server now; it is counted in flight."""

    request_id: int
    model: str


class Reject(msgspec.Struct, frozen=True, kw_only=True):
    """Answer request ``request_id`` with ``error``; its slot is already released."""

    request_id: int
    error: SwapError


class StartSwap(msgspec.Struct, frozen=True, kw_only=True):
    """Stop ``victims`` (in parallel), then make ``target`` ready; report ``SwapDone``."""

    swap_id: int
    target: str
    victims: tuple[str, ...]


class StopModels(msgspec.Struct, frozen=True, kw_only=True):
    """Stop ``models`` (TTL expiry or an unload); report ``StopsDone(stop_id)``."""

    stop_id: int
    models: tuple[str, ...]
    reason: StopReason


class Queued(msgspec.Struct, frozen=True, kw_only=True):
    """Request ``request_id`` waits in the queue at ``position`` (1-based); log only."""

    request_id: int
    model: str
    position: int


class Joined(msgspec.Struct, frozen=True, kw_only=True):
    """Request ``request_id`` waits for swap ``swap_id``, already loading its model; log only."""

    request_id: int
    model: str
    swap_id: int


class Retire(msgspec.Struct, frozen=True, kw_only=True):
    """``model`` left the config (a reload) and its process is stopped: end its supervisor."""

    model: str


Decision = Grant | Reject | StartSwap | StopModels | Queued | Joined | Retire
