"""Why a model's process is stopped: one enum shared by the scheduler, the router,
the process supervisors and the metrics.

The values are the ``reason`` labels of ``trio_swap_model_evictions_total``, so a
reworded log line can never turn a metric into "other": code matches members,
people read :attr:`StopReason.description`.
"""

from __future__ import annotations

import enum

__all__ = ["StopReason"]


class StopReason(enum.StrEnum):
    SWAP = "swap"  # evicted to make room for another model
    TTL = "ttl"  # idle longer than its ttl
    UNLOAD = "unload"  # /unload, /api/models/unload, or a test asking for it
    ABANDONED = "abandoned"  # a load nobody waits for any more (llama-swap #727)
    RELOAD = "reload"  # removed or changed by a config reload
    LEFT_CONFIG = "left the config"  # its supervisor ends (after a reload removed it)
    SHUTDOWN = "shutdown"  # trio-swap is stopping

    @property
    def description(self) -> str:
        """The words logs and error messages use."""
        return _DESCRIPTIONS[self]

    @property
    def is_eviction(self) -> bool:
        """Counted in ``trio_swap_model_evictions_total`` (shutdown is no eviction)."""
        return self not in (StopReason.SHUTDOWN, StopReason.LEFT_CONFIG)


_DESCRIPTIONS = {
    StopReason.SWAP: "evicted by a swap",
    StopReason.TTL: "ttl expired",
    StopReason.UNLOAD: "unload",
    StopReason.ABANDONED: "no request waits for it any more",
    StopReason.RELOAD: "changed or removed by a config reload",
    StopReason.LEFT_CONFIG: "left the config",
    StopReason.SHUTDOWN: "trio-swap is shutting down",
}
