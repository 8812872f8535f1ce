"""How one upstream server process lives and dies: spawn, readiness, logs, stop."""

from trio_swap.upstream.launcher import Child, OrphanGuard, spawn
from trio_swap.upstream.logs import LogRing
from trio_swap.upstream.process import ModelProcess, ProcessState

__all__ = ["Child", "LogRing", "ModelProcess", "OrphanGuard", "ProcessState", "spawn"]
