"""When queued requests run: a pure state machine driven by the router."""

from trio_swap.scheduling.decisions import (
    Decision,
    Grant,
    Joined,
    Queued,
    Reject,
    Retire,
    StartSwap,
    StopModels,
)
from trio_swap.scheduling.fifo import FifoScheduler, ModelLimits, Phase

__all__ = [
    "Decision",
    "FifoScheduler",
    "Grant",
    "Joined",
    "ModelLimits",
    "Phase",
    "Queued",
    "Reject",
    "Retire",
    "StartSwap",
    "StopModels",
]
