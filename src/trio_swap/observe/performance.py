"""``performance:``: the hardware sampler, its bounded history, and its Prometheus gauges.

:class:`PerformanceMonitor` is a task of the server's supervisors nursery. It
takes a :class:`~trio_swap.observe.hardware.Sample` at once, a second one a
second later (CPU utilisation needs two readings, so the first has none),
then one every ``performance.every`` seconds, each in a worker thread (NVML
may block), never two at a time. ``GET /api/performance`` lists the history;
``/metrics`` shows the latest sample through :class:`HardwareCollector`.

**Memory is bounded**: the history keeps the last hour, as llama-swap does:
``ceil(3600 / every)`` samples, so at most 720 (``every`` is at least 5 s).
A sample is about 200 bytes plus 200 per GPU (names and UUIDs are shared), so
720 samples of an 8-GPU machine take about 1 MiB.

**Reloads** apply in place (:meth:`PerformanceMonitor.reconfigure`): a new
``every`` takes effect at once (a sample is taken, then the new interval
runs) and the history is re-bounded, its newest samples kept; ``disabled:
true`` stops sampling and forgets the history; re-enabling starts afresh.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from collections.abc import Iterator
from typing import Final, Protocol, final

import trio
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trio_swap.config.model import PerformanceConfig
from trio_swap.observe.hardware import HardwareProbe, Sample

__all__ = [
    "HISTORY_SECONDS",
    "HardwareCollector",
    "PerformanceMonitor",
    "SampleSource",
    "history_size",
]

log = logging.getLogger("trio_swap.observe")

#: How far back the history reaches (llama-swap keeps an hour too).
HISTORY_SECONDS: Final = 3600.0
#: Seconds from the first sample to the second: the first CPU figure comes soon.
SECOND_SAMPLE_AFTER: Final = 1.0


class SampleSource(Protocol):
    """What the monitor samples: :class:`~trio_swap.observe.hardware.HardwareProbe`, or a
    test's fake. ``sample`` runs in a worker thread, one call at a time."""

    @property
    def has_gpus(self) -> bool | None: ...

    def sample(self) -> Sample: ...


def history_size(every: float) -> int:
    """Samples the history keeps at this interval: one hour's worth, at least one."""
    return max(1, math.ceil(HISTORY_SECONDS / every))


@final
class PerformanceMonitor:
    """Samples the hardware and keeps the last hour of samples.

    Only its :meth:`run` task writes the history; handlers read it between
    checkpoints. ``probe`` is the seam: tests give one with a fake NVML.
    """

    def __init__(self, config: PerformanceConfig, probe: SampleSource | None = None) -> None:
        self._config = config
        self._probe: SampleSource = probe if probe is not None else HardwareProbe()
        self._history: deque[Sample] = deque(maxlen=history_size(config.every))
        self._wake = trio.Event()
        #: One sample at a time, even when a cancelled one's thread still runs.
        self._limiter = trio.CapacityLimiter(1)
        self._failures = 0

    @property
    def config(self) -> PerformanceConfig:
        return self._config

    @property
    def max_samples(self) -> int:
        maxlen = self._history.maxlen
        assert maxlen is not None
        return maxlen

    def reconfigure(self, config: PerformanceConfig) -> None:
        """A reload's new ``performance:``; takes effect at once (see the module doc)."""
        if config == self._config:
            return
        self._config = config
        if not config.enabled:
            self._history.clear()
        if history_size(config.every) != self._history.maxlen:
            self._history = deque(self._history, maxlen=history_size(config.every))
        self._wake.set()

    def record(self, sample: Sample) -> None:
        """Add a sample, dropping the oldest past the bound."""
        self._history.append(sample)

    def latest(self) -> Sample | None:
        return self._history[-1] if self._history else None

    def samples(self, since: float | None = None) -> list[Sample]:
        """The history, oldest first; with ``since``, only samples taken after it."""
        if since is None:
            return list(self._history)
        return [sample for sample in self._history if sample.time > since]

    def snapshot(self, since: float | None = None) -> dict[str, object]:
        """The body of ``GET /api/performance`` (docs/api.md)."""
        return {
            "enabled": self._config.enabled,
            "every": self._config.every,
            "max_samples": self.max_samples,
            "gpus_found": self._probe.has_gpus,
            "samples": self.samples(since),  # Structs: msgspec encodes them as objects
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Sample until cancelled; waits without sampling while ``disabled``."""
        task_status.started()
        taken = 0
        while True:
            config = self._config
            wake = self._wake
            delay = math.inf
            if config.enabled:
                sample = await self._take()
                if sample is not None and self._config.enabled:  # not disabled meanwhile
                    self.record(sample)
                taken += 1
                delay = SECOND_SAMPLE_AFTER if taken == 1 else config.every
            else:
                taken = 0  # re-enabled: the first sample again has no CPU figure
            with trio.move_on_after(delay):
                await wake.wait()
            if wake.is_set():
                self._wake = trio.Event()

    async def _take(self) -> Sample | None:
        """One sample in a worker thread; None (logged) if it failed."""
        try:
            sample = await trio.to_thread.run_sync(
                self._probe.sample, limiter=self._limiter, abandon_on_cancel=True
            )
        except Exception:  # a bug or a driver gone wrong must not stop the server
            self._failures += 1
            if self._failures == 1:
                log.warning("a hardware sample failed; sampling goes on", exc_info=True)
            return None
        return sample


@final
class HardwareCollector(Collector):
    """``trio_swap_host_*`` and ``trio_swap_gpu_*`` gauges from the latest sample.

    Registered on the server's own registry (:class:`~trio_swap.observe.metrics.Metrics`).
    No sample (sampling disabled, or not yet): no series. A figure a GPU would
    not give (None) has no series for that GPU.
    """

    def __init__(self, monitor: PerformanceMonitor) -> None:
        self._monitor = monitor

    def collect(self) -> Iterator[Metric]:
        sample = self._monitor.latest()
        if sample is None:
            return
        if sample.cpu_utilization is not None:
            yield GaugeMetricFamily(
                "trio_swap_host_cpu_utilization_ratio",
                "Non-idle share of all CPU cores between the last two samples (0 to 1).",
                value=sample.cpu_utilization,
            )
        for name, text, value in (
            ("total", "Host memory (MemTotal).", sample.memory_total_bytes),
            ("used", "Host memory in use: MemTotal minus MemAvailable.", sample.memory_used_bytes),
            ("available", "Host memory available (MemAvailable).", sample.memory_available_bytes),
        ):
            if value is not None:
                yield GaugeMetricFamily(f"trio_swap_host_memory_{name}_bytes", text, value=value)
        if not sample.gpus:
            return
        families = {
            field: GaugeMetricFamily(metric, text, labels=["device", "name", "uuid"])
            for field, metric, text in _GPU_GAUGES
        }
        for gpu in sample.gpus:
            labels = [str(gpu.index), gpu.name, gpu.uuid]
            for field, family in families.items():
                value = getattr(gpu, field)
                if value is not None:
                    family.add_metric(labels, value)
        yield from families.values()


#: GpuSample field -> (metric, help).
_GPU_GAUGES: Final = (
    (
        "utilization",
        "trio_swap_gpu_utilization_ratio",
        "Share of the last NVML sample period a kernel ran on the GPU (0 to 1).",
    ),
    ("memory_used_bytes", "trio_swap_gpu_memory_used_bytes", "GPU memory in use (NVML)."),
    ("memory_total_bytes", "trio_swap_gpu_memory_total_bytes", "GPU memory in all (NVML)."),
    ("temperature_celsius", "trio_swap_gpu_temperature_celsius", "GPU die temperature."),
    ("power_watts", "trio_swap_gpu_power_watts", "GPU power draw."),
)
