"""What the process supervisors report, with no-op defaults.

Plain method calls on the supervisor's own task, so a hook must be quick and
must not block; :class:`~trio_swap.observe.metrics.Metrics` only increments
counters. The no-op base class keeps the callers free of ``if``s.
"""

from __future__ import annotations

from trio_swap.reasons import StopReason

__all__ = ["HookFanout", "ProcessHooks"]


class ProcessHooks:
    """What a :class:`~trio_swap.upstream.process.ModelProcess` reports about its process."""

    def starting(self, model: str) -> None:
        """A process was spawned for ``model``; its readiness check begins."""

    def ready(self, model: str, seconds: float) -> None:
        """A start succeeded: ``seconds`` from spawn to the first passing health check."""

    def start_failed(self, model: str) -> None:
        """A start failed: no spawn, exit before ready, or the health check gave up."""

    def stopping(self, model: str, reason: StopReason) -> None:
        """A starting or ready process is being stopped, for the router's ``reason``.

        Called once per stop, at the transition: a second stop order for a model
        already stopping (a swap choosing a model that TTL is unloading) is not.
        """

    def crashed(self, model: str) -> None:
        """A ready process exited without being asked to."""

    def stopped(self, model: str) -> None:
        """The process spawned after :meth:`starting` is gone (every life ends with this)."""

    def slept(self, model: str, reason: StopReason) -> None:
        """A ready server was put to sleep (``sleep:``) instead of being stopped for
        ``reason`` (a swap or a TTL)."""

    def sleep_failed(self, model: str) -> None:
        """Its sleep call failed: it is stopped instead."""

    def woke(self, model: str, seconds: float) -> None:
        """A sleeping server woke and passed its test request in ``seconds``."""

    def wake_failed(self, model: str) -> None:
        """A wake (or its test request) failed: it is stopped and started cold."""


class HookFanout(ProcessHooks):
    """Tells several observers (the metrics, the timeline) the same facts, in order."""

    def __init__(self, *hooks: ProcessHooks) -> None:
        self._hooks = hooks

    def starting(self, model: str) -> None:
        for hook in self._hooks:
            hook.starting(model)

    def ready(self, model: str, seconds: float) -> None:
        for hook in self._hooks:
            hook.ready(model, seconds)

    def start_failed(self, model: str) -> None:
        for hook in self._hooks:
            hook.start_failed(model)

    def stopping(self, model: str, reason: StopReason) -> None:
        for hook in self._hooks:
            hook.stopping(model, reason)

    def crashed(self, model: str) -> None:
        for hook in self._hooks:
            hook.crashed(model)

    def stopped(self, model: str) -> None:
        for hook in self._hooks:
            hook.stopped(model)

    def slept(self, model: str, reason: StopReason) -> None:
        for hook in self._hooks:
            hook.slept(model, reason)

    def sleep_failed(self, model: str) -> None:
        for hook in self._hooks:
            hook.sleep_failed(model)

    def woke(self, model: str, seconds: float) -> None:
        for hook in self._hooks:
            hook.woke(model, seconds)

    def wake_failed(self, model: str) -> None:
        for hook in self._hooks:
            hook.wake_failed(model)
