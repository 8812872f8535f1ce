"""``performance:``: the config key, the hardware readers, the sampler, and what a real
``trio-swap serve`` shows on ``/api/performance`` and ``/metrics``.

NVML is faked by ``tests/fake_nvml/pynvml.py`` (two GPUs, the second without a
temperature sensor): loaded as ``pynvml`` in-process, or first on the child's
``PYTHONPATH``, so trio-swap's own loading path (``load_nvml``) is what runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import types
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port, wait_for
from trio_swap.config import ConfigError
from trio_swap.config.diff import diff_configs
from trio_swap.config.load import load_config_text
from trio_swap.config.model import PerformanceConfig
from trio_swap.config.performance import parse_duration
from trio_swap.observe.hardware import (
    CpuMeter,
    GpuSample,
    HardwareProbe,
    NvmlStats,
    Sample,
    detect_gpu_stats,
)
from trio_swap.observe.performance import (
    HardwareCollector,
    PerformanceMonitor,
    history_size,
)
from trio_swap.upstream.footprint import detect_gpu_reader

FAKE_NVML_DIR = Path(__file__).parent / "fake_nvml"
HARDWARE_DASHBOARD = Path(__file__).parent.parent / "docs" / "grafana-hardware.json"
GiB = 1 << 30
MODELS = "models:\n  m:\n    cmd: server --port ${PORT}\n"


# -- the fake NVML ----------------------------------------------------------------------


def fake_pynvml() -> types.ModuleType:
    """A fresh copy of ``tests/fake_nvml/pynvml.py`` as a module."""
    spec = importlib.util.spec_from_file_location("pynvml", FAKE_NVML_DIR / "pynvml.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    """The fake as ``pynvml`` in this process; footprints' cached detection is reset."""
    module = fake_pynvml()
    monkeypatch.setitem(sys.modules, "pynvml", module)
    detect_gpu_reader.cache_clear()
    yield module
    detect_gpu_reader.cache_clear()


# -- config -----------------------------------------------------------------------------


def load(text: str) -> PerformanceConfig:
    return load_config_text(textwrap.dedent(text) + MODELS, "c.yaml", environ={}).performance


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("5s", 5.0),
        ("1m30s", 90.0),
        ("1.5m", 90.0),
        ("2h", 7200.0),
        ("+10s", 10.0),
        ("4s1000ms", 5.0),
        ("5000000us", 5.0),
        ("5000000\u00b5s", 5.0),
        (".5h", 1800.0),
        ("0", 0.0),
        ("-5s", -5.0),
    ],
)
def test_parse_duration_reads_go_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["", "5", "s", "5 s", "5S", "1d", "five", ".s", "1e3s", "5s-"])
def test_parse_duration_refuses_what_go_refuses(text: str) -> None:
    assert parse_duration(text) is None


def test_parse_duration_refuses_more_than_go_can_hold() -> None:
    assert parse_duration("2562047h") is not None  # about 292 years: Go's longest
    assert parse_duration("2562048h") is None


def test_performance_defaults_to_sampling_every_five_seconds() -> None:
    assert load("") == PerformanceConfig(enabled=True, every=5.0)
    assert load("performance:\n") == PerformanceConfig(enabled=True, every=5.0)
    assert load("performance:\n  every:\n") == PerformanceConfig(enabled=True, every=5.0)


def test_performance_keys_as_llama_swap_writes_them() -> None:
    assert load("performance:\n  every: 1m30s\n") == PerformanceConfig(every=90.0)
    assert load("performance:\n  disabled: true\n") == PerformanceConfig(enabled=False)
    assert load("performance:\n  every: 10\n").every == 10.0  # trio-swap's own: seconds
    assert load("performance:\n  every: 7.5\n").every == 7.5


def test_performance_macros_apply() -> None:
    text = "macros:\n  interval: 30s\nperformance:\n  every: ${interval}\n"
    assert load(text).every == 30.0


def test_unknown_performance_keys_are_warnings_not_errors() -> None:
    text = "performance:\n  every: 15s\n  maxAge: 1h\n" + MODELS
    config = load_config_text(text, "c.yaml", environ={})
    assert config.performance.every == 15.0
    assert config.warnings == ("c.yaml:3: performance.maxAge: unknown key; ignored",)
    assert not any("not supported" in warning for warning in config.warnings)


@pytest.mark.parametrize(
    ("text", "key_path", "line", "fragment"),
    [
        ("performance:\n  every: 500ms\n", "performance.every", 2, "at least 5s (got '500ms')"),
        ("performance:\n  every: 4\n", "performance.every", 2, "at least 5s (got 4)"),
        ("performance:\n  every: -1m\n", "performance.every", 2, "at least 5s"),
        ("performance:\n  every: soon\n", "performance.every", 2, "a duration such as '15s'"),
        ("performance:\n  every: .inf\n", "performance.every", 2, "a duration such as"),
        ("performance:\n  every: true\n", "performance.every", 2, "got bool"),
        ("performance:\n  disabled: maybe\n", "performance.disabled", 2, "expected bool"),
        ("\nperformance: [5s]\n", "performance", 2, "expected mapping"),
    ],
)
def test_bad_performance_values_are_located_errors(
    text: str, key_path: str, line: int, fragment: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load(text)
    error = caught.value
    assert (error.source, error.key_path, error.line) == ("c.yaml", key_path, line), str(error)
    assert fragment in error.message, str(error)


def test_check_exits_2_for_a_bad_every(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("performance:\n  every: 1s\n" + MODELS)
    result = subprocess.run(
        [sys.executable, "-m", "trio_swap", "check", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "bad.yaml:2: performance.every: must be at least 5s" in result.stderr + result.stdout


def test_a_reload_reports_a_changed_performance_key() -> None:
    old = load_config_text(MODELS, "c.yaml", environ={})
    new = load_config_text("performance:\n  every: 1m\n" + MODELS, "c.yaml", environ={})
    assert diff_configs(old, new).settings == ("performance",)


# -- CPU --------------------------------------------------------------------------------


def write_stat(path: Path, user: int, idle: int, iowait: int = 0, guest: int = 0) -> None:
    # user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {user} 0 0 {idle} {iowait} 0 0 0 {guest} 0\ncpu0 1 2 3 4\n")


def test_cpu_meter_is_the_busy_share_between_two_readings(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    meter = CpuMeter(str(stat))
    write_stat(stat, user=100, idle=900)
    assert meter.read() is None  # one reading says nothing about now
    write_stat(stat, user=130, idle=960, iowait=10, guest=25)  # guest is inside user
    assert meter.read() == pytest.approx(30 / 100)
    write_stat(stat, user=130, idle=960, iowait=10)
    assert meter.read() is None  # no time passed
    write_stat(stat, user=230, idle=960, iowait=10)
    assert meter.read() == 1.0


def test_cpu_meter_without_a_readable_stat_has_no_figure(tmp_path: Path) -> None:
    meter = CpuMeter(str(tmp_path / "missing"))
    assert meter.read() is None
    garbled = tmp_path / "garbled"
    garbled.write_text("intr 1 2 3\n")
    assert CpuMeter(str(garbled)).read() is None


def test_cpu_meter_reads_the_real_proc_stat() -> None:
    meter = CpuMeter()
    assert meter.read() is None
    second = meter.read()
    assert second is None or 0.0 <= second <= 1.0


# -- GPUs -------------------------------------------------------------------------------


EXPECTED_GPUS = (
    GpuSample(
        index=0,
        name="NVIDIA Fake A100 80GB",
        uuid="GPU-0f0f0f0f-aaaa-4bbb-8ccc-000000000000",
        utilization=0.37,
        memory_used_bytes=20 * GiB,
        memory_total_bytes=80 * GiB,
        temperature_celsius=61.0,
        power_watts=251.5,
    ),
    GpuSample(
        index=1,
        name="NVIDIA Fake RTX 4090",
        uuid="GPU-1e1e1e1e-dddd-4eee-8fff-111111111111",
        utilization=0.0,
        memory_used_bytes=512 << 20,
        memory_total_bytes=24 * GiB,
        temperature_celsius=None,  # NVMLError_NotSupported: only that figure is missing
        power_watts=35.25,
    ),
)


def test_nvml_stats_reads_every_gpu_and_keeps_what_one_cannot_tell() -> None:
    stats = NvmlStats(fake_pynvml())
    assert stats.read() == EXPECTED_GPUS
    assert repr(stats) == "<NvmlStats devices=2>"


def test_nvml_stats_leaves_out_a_device_without_a_handle_and_survives_old_bindings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    module = fake_pynvml()
    real_handle = module.nvmlDeviceGetHandleByIndex

    def handle(index: int) -> object:
        if index == 0:
            raise module.NVMLError("GPU is lost")
        return real_handle(index)

    monkeypatch.setattr(module, "nvmlDeviceGetHandleByIndex", handle)
    # nvidia-ml-py before 11.515 answers bytes; bindings older than a call lack it
    monkeypatch.setattr(module, "nvmlDeviceGetName", lambda handle: handle.name.encode())
    monkeypatch.delattr(module, "nvmlDeviceGetPowerUsage")
    (gpu,) = NvmlStats(module).read()
    assert (gpu.index, gpu.name, gpu.power_watts) == (1, "NVIDIA Fake RTX 4090", None)
    assert gpu.memory_total_bytes == 24 * GiB


def test_detect_gpu_stats_loads_nvml_like_the_footprints(nvml: types.ModuleType) -> None:
    stats = detect_gpu_stats()
    assert isinstance(stats, NvmlStats)
    assert stats.read() == EXPECTED_GPUS
    assert nvml.init_calls == 1
    assert detect_gpu_reader() is not None  # the same loader serves the footprints
    assert nvml.init_calls == 2


def test_detect_gpu_stats_without_pynvml_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if not installed
    assert detect_gpu_stats() is None


def test_detect_gpu_stats_when_nvml_cannot_start_is_none(
    nvml: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken() -> None:
        raise nvml.NVMLError("Driver Not Loaded")

    monkeypatch.setattr(nvml, "nvmlInit", broken)
    assert detect_gpu_stats() is None


# -- a whole sample ---------------------------------------------------------------------


def test_a_probe_samples_memory_cpu_and_gpus_and_loads_nvml_once(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    write_stat(stat, user=10, idle=90)
    loads: list[int] = []

    def gpus() -> NvmlStats:
        loads.append(1)
        return NvmlStats(fake_pynvml())

    probe = HardwareProbe(gpus=gpus, cpu=CpuMeter(str(stat)), clock=lambda: 1000.0)
    assert probe.has_gpus is None
    first = probe.sample()
    assert probe.has_gpus is True
    write_stat(stat, user=60, idle=140)
    second = probe.sample()
    assert loads == [1]
    assert (first.time, first.cpu_utilization, second.cpu_utilization) == (1000.0, None, 0.5)
    assert second.gpus == EXPECTED_GPUS
    assert first.memory_total_bytes is not None and first.memory_total_bytes > 0
    assert first.memory_available_bytes is not None
    assert first.memory_used_bytes == first.memory_total_bytes - first.memory_available_bytes


def test_a_probe_without_gpus_samples_the_host() -> None:
    probe = HardwareProbe(gpus=lambda: None)
    sample = probe.sample()
    assert (sample.gpus, probe.has_gpus) == ((), False)
    assert sample.memory_total_bytes is not None


# -- the monitor: history, reloads, the sampling task ------------------------------------


def sample_at(time: float, *gpus: GpuSample, cpu: float | None = 0.25) -> Sample:
    return Sample(
        time=time,
        cpu_utilization=cpu,
        memory_total_bytes=64 * GiB,
        memory_used_bytes=16 * GiB,
        memory_available_bytes=48 * GiB,
        gpus=gpus,
    )


def test_history_size_is_an_hour_of_samples() -> None:
    assert history_size(5.0) == 720  # the most: every is at least 5 s
    assert history_size(7.0) == 515
    assert history_size(3600.0) == 1
    assert history_size(86400.0) == 1


def test_the_history_keeps_an_hour_and_drops_the_oldest() -> None:
    monitor = PerformanceMonitor(PerformanceConfig(every=60.0))
    assert monitor.max_samples == 60
    for second in range(1000):
        monitor.record(sample_at(float(second)))
    samples = monitor.samples()
    assert len(samples) == 60
    assert [s.time for s in samples] == [float(t) for t in range(940, 1000)]
    assert monitor.latest() == samples[-1]
    assert [s.time for s in monitor.samples(since=997.0)] == [998.0, 999.0]
    assert monitor.samples(since=5000.0) == []


def test_a_reload_rebounds_the_history_and_disabling_forgets_it() -> None:
    monitor = PerformanceMonitor(PerformanceConfig(every=5.0))
    for second in range(100):
        monitor.record(sample_at(float(second)))
    monitor.reconfigure(PerformanceConfig(every=600.0))  # an hour is 6 samples now
    assert [s.time for s in monitor.samples()] == [94.0, 95.0, 96.0, 97.0, 98.0, 99.0]
    monitor.reconfigure(PerformanceConfig(every=5.0))
    assert monitor.max_samples == 720
    assert len(monitor.samples()) == 6
    monitor.reconfigure(PerformanceConfig(enabled=False, every=5.0))
    assert monitor.samples() == [] and monitor.latest() is None
    assert monitor.snapshot()["enabled"] is False


def test_the_snapshot_is_what_the_api_returns() -> None:
    monitor = PerformanceMonitor(PerformanceConfig(every=5.0), HardwareProbe(gpus=lambda: None))
    monitor.record(sample_at(1.0))
    monitor.record(sample_at(2.0, EXPECTED_GPUS[1]))
    assert monitor.snapshot(since=1.0) == {
        "enabled": True,
        "every": 5.0,
        "max_samples": 720,
        "gpus_found": None,  # no sample was taken by the probe yet
        "samples": [sample_at(2.0, EXPECTED_GPUS[1])],
    }


class CountingProbe:
    """A probe whose samples are numbered (``time`` 1, 2, 3...)."""

    def __init__(self) -> None:
        self.taken = 0
        self.has_gpus: bool | None = False

    def sample(self) -> Sample:
        self.taken += 1
        return sample_at(float(self.taken), cpu=None if self.taken == 1 else 0.5)


async def test_the_sampler_task_samples_at_once_then_follows_reloads() -> None:
    probe = CountingProbe()
    # every 10 minutes: the history holds 6, the test never waits that long
    monitor = PerformanceMonitor(PerformanceConfig(every=600.0), probe)
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            # the first sample at once, the second a second later (the first CPU figure)
            await wait_for(lambda: len(monitor.samples()) == 2, what="two samples")
            assert [s.cpu_utilization for s in monitor.samples()] == [None, 0.5]
            # a reload's new interval applies now, not after the hour already waited
            monitor.reconfigure(PerformanceConfig(every=5.0))
            await wait_for(lambda: len(monitor.samples()) == 3, what="a sample after the reload")
            monitor.reconfigure(PerformanceConfig(enabled=False, every=5.0))
            assert monitor.samples() == []
            taken = probe.taken
            monitor.reconfigure(PerformanceConfig(enabled=True, every=5.0))
            await wait_for(lambda: monitor.samples(), what="sampling to start again")
            assert probe.taken > taken
            nursery.cancel_scope.cancel()


async def test_a_failing_sample_is_logged_and_sampling_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class FailingOnce(CountingProbe):
        def sample(self) -> Sample:
            if self.taken == 0:
                self.taken += 1
                raise RuntimeError("driver fell over")
            return super().sample()

    monitor = PerformanceMonitor(PerformanceConfig(every=5.0), FailingOnce())
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(monitor.run)
            await wait_for(lambda: monitor.samples(), what="a sample after the failure")
            nursery.cancel_scope.cancel()
    assert "a hardware sample failed" in caplog.text


# -- Prometheus gauges ------------------------------------------------------------------


def scrape(monitor: PerformanceMonitor) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    registry = CollectorRegistry()
    registry.register(HardwareCollector(monitor))
    text = generate_latest(registry).decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def gpu_labels(index: int) -> frozenset[tuple[str, str]]:
    gpu = EXPECTED_GPUS[index]
    return frozenset({"device": str(index), "name": gpu.name, "uuid": gpu.uuid}.items())


def test_gauges_show_the_latest_sample_per_gpu() -> None:
    monitor = PerformanceMonitor(PerformanceConfig())
    assert scrape(monitor) == {}  # nothing sampled yet: no series
    monitor.record(sample_at(1.0, *EXPECTED_GPUS, cpu=None))
    assert ("trio_swap_host_cpu_utilization_ratio", frozenset()) not in scrape(monitor)
    monitor.record(sample_at(2.0, *EXPECTED_GPUS))
    samples = scrape(monitor)
    assert samples[("trio_swap_host_cpu_utilization_ratio", frozenset())] == 0.25
    assert samples[("trio_swap_host_memory_total_bytes", frozenset())] == 64 * GiB
    assert samples[("trio_swap_host_memory_used_bytes", frozenset())] == 16 * GiB
    assert samples[("trio_swap_host_memory_available_bytes", frozenset())] == 48 * GiB
    first, second = gpu_labels(0), gpu_labels(1)
    assert samples[("trio_swap_gpu_utilization_ratio", first)] == 0.37
    assert samples[("trio_swap_gpu_memory_used_bytes", first)] == 20 * GiB
    assert samples[("trio_swap_gpu_memory_total_bytes", second)] == 24 * GiB
    assert samples[("trio_swap_gpu_temperature_celsius", first)] == 61.0
    assert ("trio_swap_gpu_temperature_celsius", second) not in samples  # it cannot tell
    assert samples[("trio_swap_gpu_power_watts", second)] == 35.25


# -- a real `trio-swap serve` with the fake NVML ----------------------------------------


@asynccontextmanager
async def serve_with_fake_nvml(config: Path) -> AsyncIterator[httpx.AsyncClient]:
    """``trio-swap serve --config CONFIG`` with ``tests/fake_nvml`` first on PYTHONPATH."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    path = os.pathsep.join(filter(None, [str(FAKE_NVML_DIR), os.environ.get("PYTHONPATH")]))
    process = await trio.lowlevel.open_process(
        [sys.executable, "-m", "trio_swap", "serve", "--config", str(config), "--listen", listen],
        env={**os.environ, "PYTHONPATH": path},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:

            async def healthy() -> bool:
                try:
                    return (await client.get("/health")).status_code == 200
                except httpx.TransportError:
                    return False

            await wait_for(healthy, what="trio-swap to listen", timeout=30)
            yield client
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()


async def metric_samples(
    client: httpx.AsyncClient,
) -> dict[str, list[tuple[dict[str, str], float]]]:
    response = await client.get("/metrics")
    assert response.status_code == 200
    found: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            found.setdefault(sample.name, []).append((sample.labels, sample.value))
    return found


async def test_serve_samples_the_fake_gpus_for_the_api_and_metrics(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("performance:\n  every: 5s\nmodels: {}\n")
    with trio.fail_after(60):
        async with serve_with_fake_nvml(config) as client:

            async def two_samples() -> dict[str, object] | None:
                body: dict[str, object] = (await client.get("/api/performance")).json()
                samples = body["samples"]
                return body if isinstance(samples, list) and len(samples) >= 2 else None

            body = await wait_for(two_samples, what="two samples", timeout=30)
            assert (body["enabled"], body["every"], body["max_samples"]) == (True, 5.0, 720)
            assert body["gpus_found"] is True
            first, second = body["samples"][:2]  # type: ignore[index]
            assert first["cpu_utilization"] is None
            assert 0.0 <= second["cpu_utilization"] <= 1.0
            assert second["time"] > first["time"]
            assert second["memory_total_bytes"] > second["memory_used_bytes"] > 0
            gpus = {gpu["index"]: gpu for gpu in second["gpus"]}
            assert gpus[0]["name"] == "NVIDIA Fake A100 80GB"
            assert gpus[0]["temperature_celsius"] == 61.0
            assert gpus[1]["temperature_celsius"] is None
            assert gpus[1]["power_watts"] == 35.25

            newer = await client.get("/api/performance", params={"since": first["time"]})
            assert first["time"] not in [s["time"] for s in newer.json()["samples"]]
            assert newer.json()["samples"][0]["time"] == second["time"]
            later = await client.get("/api/performance", params={"after": "2999-01-01T00:00:00Z"})
            assert later.json()["samples"] == []
            bad = await client.get("/api/performance", params={"since": "yesterday"})
            assert bad.status_code == 400
            assert "since must be a number" in bad.json()["error"]["message"]

            metrics = await metric_samples(client)
            power = {
                labels["device"]: (labels, v) for labels, v in metrics["trio_swap_gpu_power_watts"]
            }
            assert power["0"] == (
                {"device": "0", "name": gpus[0]["name"], "uuid": gpus[0]["uuid"]},
                251.5,
            )
            assert [
                labels["device"] for labels, _ in metrics["trio_swap_gpu_temperature_celsius"]
            ] == ["0"]
            for name in (
                "trio_swap_gpu_utilization_ratio",
                "trio_swap_gpu_memory_used_bytes",
                "trio_swap_gpu_memory_total_bytes",
            ):
                assert sorted(labels["device"] for labels, _ in metrics[name]) == ["0", "1"], name
            for name in (
                "trio_swap_host_cpu_utilization_ratio",
                "trio_swap_host_memory_total_bytes",
                "trio_swap_host_memory_used_bytes",
                "trio_swap_host_memory_available_bytes",
            ):
                assert len(metrics[name]) == 1, name


async def test_serve_with_performance_disabled_and_a_reload_turning_it_on(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("performance:\n  disabled: true\nmodels: {}\n")
    with trio.fail_after(60):
        async with serve_with_fake_nvml(config) as client:
            response = await client.get("/api/performance")
            assert (response.status_code, response.json()) == (503, {"enabled": False})
            metrics = await metric_samples(client)
            assert not [
                name for name in metrics if name.startswith(("trio_swap_gpu", "trio_swap_host"))
            ]
            assert "trio_swap_build_info" in metrics  # /metrics itself stays on (llama-swap: 503)

            config.write_text("performance:\n  every: 1m\nmodels: {}\n")
            report = (await client.post("/api/config/reload")).json()
            assert report["settings"] == ["performance"]

            async def sampled() -> dict[str, object] | None:
                response = await client.get("/api/performance")
                body: dict[str, object] = response.json()
                return body if response.status_code == 200 and body["samples"] else None

            body = await wait_for(sampled, what="sampling after the reload", timeout=30)
            assert (body["every"], body["max_samples"]) == (60.0, 60)
            assert len(body["samples"][0]["gpus"]) == 2  # type: ignore[index]

            config.write_text("performance:\n  disabled: true\nmodels: {}\n")
            assert (await client.post("/api/config/reload")).status_code == 200
            assert (await client.get("/api/performance")).status_code == 503
            metrics = await metric_samples(client)
            assert "trio_swap_gpu_power_watts" not in metrics


async def test_the_hardware_dashboard_uses_only_exported_metrics(tmp_path: Path) -> None:
    dashboard = json.loads(HARDWARE_DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]
    used = {name for expr in exprs for name in re.findall(r"\btrio_swap_[a-z_]+", expr)}
    assert {name.split("_")[2] for name in used} == {"host", "gpu"}
    config = tmp_path / "c.yaml"
    config.write_text("models: {}\n")
    with trio.fail_after(60):
        async with serve_with_fake_nvml(config) as client:

            async def exported() -> set[str] | None:
                names = set(await metric_samples(client))
                return names if "trio_swap_host_cpu_utilization_ratio" in names else None

            names = await wait_for(exported, what="a sample with a CPU figure", timeout=30)
    assert used <= names, f"not exported: {sorted(used - names)}"
