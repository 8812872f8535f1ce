"""Every Prometheus collector of one trio-swap instance, in its own registry.

A registry per :class:`Metrics` (never ``prometheus_client``'s global one), so
several servers in one process (the tests) each count only their own.

Counters and histograms are updated where things happen: the process
supervisors call the :mod:`.hooks` methods, and
:class:`~trio_swap.observe.record.Observer` reports each finished request.
What is a *state* (a model's process state, requests in flight or queued,
swaps so far, memory) is read when Prometheus scrapes, by
:class:`_LiveCollector`, so the hot path never updates a gauge.

docs/metrics.md lists every metric.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Final, final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from trio_swap import __version__
from trio_swap.observe.hooks import ProcessHooks
from trio_swap.reasons import StopReason
from trio_swap.upstream.cache_disk import CacheHooks, Outcome

if TYPE_CHECKING:
    from trio_swap.router import Router
    from trio_swap.upstream.process import ModelProcess

__all__ = ["CONTENT_TYPE", "EVICTION_REASONS", "PROCESS_STATES", "Metrics"]

# A ``*_created`` timestamp series beside every counter and histogram doubles the
# output for no dashboard's benefit (process-wide, which is fine for an application).
disable_created_metrics()  # type: ignore[no-untyped-call]

CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

#: ``reason`` label values of ``trio_swap_model_evictions_total``: the stop reasons
#: that are evictions (:class:`~trio_swap.reasons.StopReason`), and crashes.
EVICTION_REASONS: Final = (*(r.value for r in StopReason if r.is_eviction), "crash")
#: ``state`` label values of ``trio_swap_model_state`` (:class:`ProcessState` values).
PROCESS_STATES: Final = ("stopped", "starting", "ready", "stopping", "sleeping")

#: Loading a model takes from a tenth of a second (a tiny model, warm page cache)
#: to minutes (a big one from a network disk).
READY_BUCKETS: Final = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600)
_SUBSECOND: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5)
_SECONDS: Final = (1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
#: Waiting for a lease: ~0 for a ready model, a whole load (or several) for a cold one.
WAIT_BUCKETS: Final = _SUBSECOND + _SECONDS
#: Time to the upstream's response head: a stream starts in milliseconds, a whole
#: non-streamed completion can take minutes.
LATENCY_BUCKETS: Final = _SUBSECOND + _SECONDS
SPEED_BUCKETS: Final = (1, 2, 5, 10, 20, 30, 50, 75, 100, 150, 200, 300, 500, 1000, 2000, 5000)


@final
class Metrics(ProcessHooks, CacheHooks):
    """The collectors, the hooks that update them, and :meth:`render` for ``/metrics``."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        model = ["model"]
        self.loads = Counter(
            "trio_swap_model_loads",
            "Starts of a model's server that passed the health check.",
            model,
            registry=registry,
        )
        self.load_failures = Counter(
            "trio_swap_model_load_failures",
            "Starts that failed: could not spawn, exited before ready, or health check timeout.",
            model,
            registry=registry,
        )
        self.time_to_ready = Histogram(
            "trio_swap_model_time_to_ready_seconds",
            "Seconds from spawning a model's server to its first passing health check.",
            model,
            buckets=READY_BUCKETS,
            registry=registry,
        )
        self.evictions = Counter(
            "trio_swap_model_evictions",
            "Times a running model was stopped, by reason.",
            ["model", "reason"],
            registry=registry,
        )
        self.requests = Counter(
            "trio_swap_requests",
            "Model-routed requests answered, by model, endpoint and HTTP status.",
            ["model", "endpoint", "status"],
            registry=registry,
        )
        self.upstream_latency = Histogram(
            "trio_swap_upstream_response_seconds",
            "Seconds from forwarding a request to the upstream's response head.",
            model,
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_wait = Histogram(
            "trio_swap_queue_wait_seconds",
            "Seconds from a request's arrival to its lease (queueing and loading included).",
            buckets=WAIT_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "trio_swap_prompt_tokens",
            "Prompt (input) tokens the upstreams reported.",
            model,
            registry=registry,
        )
        self.completion_tokens = Counter(
            "trio_swap_completion_tokens",
            "Completion (output) tokens the upstreams reported.",
            model,
            registry=registry,
        )
        self.tokens_per_second = Histogram(
            "trio_swap_generation_tokens_per_second",
            "Generation speed of each request that reported completion tokens.",
            model,
            buckets=SPEED_BUCKETS,
            registry=registry,
        )
        self._kv = _KvCacheMetrics(registry)
        self.sleeps = Counter(
            "trio_swap_model_sleeps",
            "Times a model was put to sleep instead of stopped (sleep:), by outcome.",
            ["model", "outcome"],
            registry=registry,
        )
        self.wakes = Counter(
            "trio_swap_model_wakes",
            "Wakes of a sleeping model, by outcome (failed: stopped and started cold).",
            ["model", "outcome"],
            registry=registry,
        )
        self.wake_seconds = Histogram(
            "trio_swap_model_wake_seconds",
            "Seconds from a wake's first call to its passing test request.",
            model,
            buckets=READY_BUCKETS,
            registry=registry,
        )
        self._live = _LiveCollector()
        registry.register(self._live)
        ProcessCollector(registry=registry)  # process_* (Linux /proc; empty elsewhere)
        # labels() validates and locks on every call: keep the children per request shape.
        self._request_children: dict[tuple[str, str, int], Counter] = {}
        self._model_series: dict[str, _ModelSeries] = {}
        #: Models asleep: stopping one later is not a second eviction (its sleep was).
        self._asleep: set[str] = set()

    def watch(self, processes: Mapping[str, ModelProcess], router: Router) -> None:
        """Read live state from these at scrape time; show every model's series from zero."""
        self._live.processes = processes
        self._live.router = router
        for model in processes:
            self.loads.labels(model)
            self.load_failures.labels(model)
            self.time_to_ready.labels(model)
            for reason in EVICTION_REASONS:
                self.evictions.labels(model, reason)

    def render(self) -> bytes:
        """The exposition text for ``GET /metrics``."""
        return generate_latest(self.registry)

    # -- hooks (called on the supervisors' tasks) ------------------------------------

    def ready(self, model: str, seconds: float) -> None:
        self.loads.labels(model).inc()
        self.time_to_ready.labels(model).observe(seconds)

    def start_failed(self, model: str) -> None:
        self.load_failures.labels(model).inc()

    def stopping(self, model: str, reason: StopReason) -> None:
        if model in self._asleep:  # its sleep was the eviction; this frees host memory
            self._asleep.discard(model)
        elif reason.is_eviction:
            self.evictions.labels(model, reason.value).inc()

    def crashed(self, model: str) -> None:
        self._asleep.discard(model)
        self.evictions.labels(model, "crash").inc()

    def slept(self, model: str, reason: StopReason) -> None:
        self.sleeps.labels(model, "ok").inc()
        if reason.is_eviction:  # it left the GPU for a swap or a TTL: an eviction
            self.evictions.labels(model, reason.value).inc()
            self._asleep.add(model)

    def sleep_failed(self, model: str) -> None:
        self.sleeps.labels(model, "failed").inc()

    def woke(self, model: str, seconds: float) -> None:
        self._asleep.discard(model)
        self.wakes.labels(model, "ok").inc()
        self.wake_seconds.labels(model).observe(seconds)

    def wake_failed(self, model: str) -> None:
        self._asleep.discard(model)  # stopped and started cold: not an eviction
        self.wakes.labels(model, "failed").inc()

    # -- keepCache (called by the supervisors' KV cache keepers and the cache disk) ----

    def slot_saved(self, model: str, outcome: Outcome, nbytes: int) -> None:
        self._kv.saves.labels(model, outcome.value).inc()
        if nbytes:
            self._kv.saved_bytes.labels(model).inc(nbytes)

    def slot_restored(self, model: str, outcome: Outcome, nbytes: int) -> None:
        self._kv.restores.labels(model, outcome.value).inc()
        if nbytes:
            self._kv.restored_bytes.labels(model).inc(nbytes)

    def tokens_reused(self, model: str, tokens: int) -> None:
        self._kv.reused_tokens.labels(model).inc(tokens)

    def cache_off(self, model: str, off: bool) -> None:
        self._kv.off.labels(model).set(1.0 if off else 0.0)

    def disk_swept(self, total_bytes: int, deleted: int) -> None:
        self._kv.disk_bytes.set(total_bytes)
        if deleted:
            self._kv.deleted_files.inc(deleted)

    # -- per request (called by the Observer when a request is over) -------------------

    def request_done(
        self, model: str, endpoint: str, status: int, wait: float | None, latency: float | None
    ) -> None:
        key = (model, endpoint, status)
        counter = self._request_children.get(key)
        if counter is None:
            counter = self._request_children[key] = self.requests.labels(model, endpoint, status)
        counter.inc()
        if wait is not None:
            self.queue_wait.observe(wait)
        if latency is not None:
            self._series(model).latency.observe(latency)

    def tokens(
        self, model: str, prompt: int | None, completion: int | None, speed: float | None
    ) -> None:
        series = self._series(model)
        if prompt:
            series.prompt.inc(prompt)
        if completion:
            series.completion.inc(completion)
        if speed is not None and speed > 0:
            series.speed.observe(speed)

    def _series(self, model: str) -> _ModelSeries:
        series = self._model_series.get(model)
        if series is None:
            series = self._model_series[model] = _ModelSeries(self, model)
        return series


@final
class _ModelSeries:
    """One model's per-request children: ``labels()`` validates and locks on every call."""

    __slots__ = ("completion", "latency", "prompt", "speed")

    def __init__(self, metrics: Metrics, model: str) -> None:
        self.latency = metrics.upstream_latency.labels(model)
        self.prompt = metrics.prompt_tokens.labels(model)
        self.completion = metrics.completion_tokens.labels(model)
        self.speed = metrics.tokens_per_second.labels(model)


@final
class _KvCacheMetrics:
    """``keepCache``'s collectors (docs/faster-swaps.md): saves, restores, bytes, tokens reused."""

    __slots__ = (
        "deleted_files",
        "disk_bytes",
        "off",
        "restored_bytes",
        "restores",
        "reused_tokens",
        "saved_bytes",
        "saves",
    )

    def __init__(self, registry: CollectorRegistry) -> None:
        self.saves = Counter(
            "trio_swap_kv_cache_saves",
            "Slot saves before a stop (keepCache), by outcome: ok, failed, timeout.",
            ["model", "outcome"],
            registry=registry,
        )
        self.restores = Counter(
            "trio_swap_kv_cache_restores",
            "Slot restores after a start (keepCache), by outcome: ok, failed, timeout.",
            ["model", "outcome"],
            registry=registry,
        )
        self.saved_bytes = Counter(
            "trio_swap_kv_cache_saved_bytes",
            "Bytes of KV cache the servers wrote to their --slot-save-path.",
            ["model"],
            registry=registry,
        )
        self.restored_bytes = Counter(
            "trio_swap_kv_cache_restored_bytes",
            "Bytes of KV cache the servers read back.",
            ["model"],
            registry=registry,
        )
        self.reused_tokens = Counter(
            "trio_swap_kv_cache_reused_tokens",
            "Prompt tokens the first request after a restore reused (llama.cpp's cache_n).",
            ["model"],
            registry=registry,
        )
        self.off = Gauge(
            "trio_swap_kv_cache_given_up",
            "1 once keepCache was given up for a model (restores in a row reused nothing).",
            ["model"],
            registry=registry,
        )
        self.disk_bytes = Gauge(
            "trio_swap_kv_cache_disk_bytes",
            "Bytes of saved slot files on disk after the last sweep (within cacheDiskBudget).",
            registry=registry,
        )
        self.deleted_files = Counter(
            "trio_swap_kv_cache_deleted_files",
            "Saved slot files deleted, least recently used first, to stay within cacheDiskBudget.",
            registry=registry,
        )


@final
class _LiveCollector(Collector):
    """Gauges read at scrape time from the processes and the router."""

    def __init__(self) -> None:
        self.processes: Mapping[str, ModelProcess] = {}
        self.router: Router | None = None

    def collect(self) -> Iterator[Metric]:
        yield _info()
        state = GaugeMetricFamily(
            "trio_swap_model_state",
            "1 for the state a model's server process is in, 0 for the others.",
            labels=["model", "state"],
        )
        for model, process in self.processes.items():
            current = process.state.value
            for name in PROCESS_STATES:
                state.add_metric([model, name], 1.0 if name == current else 0.0)
        yield state
        router = self.router
        if router is not None:
            scheduler = router.scheduler
            in_flight = GaugeMetricFamily(
                "trio_swap_model_in_flight_requests",
                "Requests forwarded to a model and not finished yet.",
                labels=["model"],
            )
            queued = GaugeMetricFamily(
                "trio_swap_model_queued_requests",
                "Requests waiting in the router's queue for a model.",
                labels=["model"],
            )
            for model in self.processes:
                in_flight.add_metric([model], scheduler.in_flight(model))
                queued.add_metric([model], scheduler.queued(model))
            yield in_flight
            yield queued
            yield CounterMetricFamily(
                "trio_swap_swaps",
                "Loads the router completed (a cold start with nothing to evict included).",
                value=router.swap_count,
            )
            yield from _fit_gauges(router, self.processes)
        rss = _resident_bytes()
        if rss is not None:
            yield GaugeMetricFamily(
                "trio_swap_resident_memory_bytes",
                "Resident memory of the trio-swap process (not its models).",
                value=rss,
            )


def _fit_gauges(router: Router, processes: Mapping[str, ModelProcess]) -> Iterator[Metric]:
    """Per resource of ``resources:``: capacity, reserved and measured use; per model, needs."""
    ledger = router.ledger
    if ledger is None or not ledger.resources:
        return
    families = {
        key: GaugeMetricFamily(f"trio_swap_resource_{key}_bytes", text, labels=["resource"])
        for key, text in (
            ("capacity", "What the box has for models (resources:)."),
            ("reserved", "Effective needs of the models running now (what fit decides with)."),
            ("used", "Memory the running models' process trees were last measured to hold."),
        )
    }
    running = [m for m, p in processes.items() if p.state.value != "stopped"]
    for name, use in ledger.use(running).items():  # the same numbers as /api/fit
        for key, family in families.items():
            family.add_metric([name], use[key])
    yield from families.values()
    need = GaugeMetricFamily(
        "trio_swap_model_need_bytes",
        "A model's effective need per resource (declared, measured or estimated).",
        labels=["model", "resource"],
    )
    for model in processes:
        for name, size in ledger.need(model).items():
            need.add_metric([model, name], size)
    yield need


def _info() -> Metric:
    info = GaugeMetricFamily("trio_swap_build_info", "Always 1.", labels=["version"])
    info.add_metric([__version__], 1.0)
    return info


_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _resident_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None
