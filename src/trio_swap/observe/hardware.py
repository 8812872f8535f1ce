"""One reading of the machine: host CPU and memory from /proc, each GPU through NVML.

:class:`HardwareProbe` takes a :class:`Sample`; the performance monitor
(:mod:`.performance`) calls it every ``performance.every`` seconds, in a
worker thread, because NVML calls may block (a busy driver, a GPU falling off
the bus) and /proc reads are file I/O.

**CPU** utilisation is the share of non-idle time between two readings of
``/proc/stat``'s ``cpu`` line (all cores together), so the first sample has
none. Idle is ``idle`` + ``iowait``; ``guest`` time is already in ``user``.

**Memory** is ``/proc/meminfo``'s ``MemTotal`` and ``MemAvailable`` (read by
:func:`~trio_swap.upstream.footprint.system_memory`); used is total minus
available: what the kernel could not hand out now, page cache it would drop
not counted.

**GPUs** come from NVML, loaded by
:func:`~trio_swap.upstream.footprint.load_nvml` like the footprints' reader
(the ``gpu`` extra, PyPI's ``nvidia-ml-py``). Each figure is read on its own:
a GPU that cannot report its temperature or power (many consumer cards and
vGPUs cannot) still reports the rest, and the missing figure is None. The
devices, names and UUIDs are read once, when the first sample loads NVML.
:class:`GpuStatsReader` is the seam: tests give a fake ``pynvml``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Final, Protocol, final

import msgspec

from trio_swap.upstream.footprint import load_nvml, system_memory

__all__ = [
    "CpuMeter",
    "GpuSample",
    "GpuStatsReader",
    "HardwareProbe",
    "NvmlStats",
    "Sample",
    "detect_gpu_stats",
]

log = logging.getLogger("trio_swap.observe")

#: ``nvmlDeviceGetTemperature``'s sensor argument for the GPU die.
NVML_TEMPERATURE_GPU: Final = 0


class GpuSample(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """One GPU at one moment; a figure the device would not give is None."""

    #: NVML's device index (what ``vramN`` in ``resources:`` names).
    index: int
    name: str
    uuid: str
    #: Share of the last sample period a kernel ran on the GPU, 0 to 1.
    utilization: float | None
    memory_used_bytes: int | None
    memory_total_bytes: int | None
    temperature_celsius: float | None
    power_watts: float | None


class Sample(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """The machine at one moment (``GET /api/performance`` lists these)."""

    #: Unix seconds.
    time: float
    #: Non-idle share of all cores since the previous sample, 0 to 1; None in the first.
    cpu_utilization: float | None
    memory_total_bytes: int | None
    memory_used_bytes: int | None
    memory_available_bytes: int | None
    gpus: tuple[GpuSample, ...] = ()


# --- CPU -------------------------------------------------------------------------------


@final
class CpuMeter:
    """Utilisation between consecutive calls, from ``/proc/stat``'s aggregate ``cpu`` line."""

    __slots__ = ("_last", "_path")

    def __init__(self, path: str = "/proc/stat") -> None:
        self._path = path
        self._last: tuple[int, int] | None = None

    def read(self) -> float | None:
        """The non-idle share since the previous call; None the first time, or when
        /proc/stat cannot be read or did not move."""
        now = self._times()
        if now is None:
            return None
        last, self._last = self._last, now
        if last is None:
            return None
        busy, total = now[0] - last[0], now[1] - last[1]
        if total <= 0:
            return None
        return min(1.0, max(0.0, busy / total))

    def _times(self) -> tuple[int, int] | None:
        """(busy, total) jiffies so far, or None."""
        try:
            with open(self._path) as file:
                fields = file.readline().split()
        except OSError:
            return None
        if not fields or fields[0] != "cpu":
            return None
        try:
            # user nice system idle iowait irq softirq steal (guest is counted in user)
            times = [int(value) for value in fields[1:9]]
        except ValueError:
            return None
        idle = sum(times[3:5])
        total = sum(times)
        return total - idle, total


# --- GPUs ------------------------------------------------------------------------------


class GpuStatsReader(Protocol):
    """Every GPU's figures now. Called from a worker thread; must not raise."""

    def read(self) -> tuple[GpuSample, ...]: ...


@final
class NvmlStats:
    """:class:`GpuStatsReader` over the ``pynvml`` module (after ``nvmlInit``).

    A device whose handle cannot be had is left out; any other NVML error
    leaves that one figure None.
    """

    __slots__ = ("_devices", "_error", "_nvml")

    def __init__(self, nvml: object) -> None:
        self._nvml = nvml
        self._error: type[Exception] = getattr(nvml, "NVMLError", Exception)
        self._devices: list[tuple[int, object, str, str]] = []
        for index in range(_integer(self._call("nvmlDeviceGetCount")) or 0):
            handle = self._call("nvmlDeviceGetHandleByIndex", index)
            if handle is None:
                log.debug("NVML device %d has no handle: left out", index)
                continue
            name = _text(self._call("nvmlDeviceGetName", handle))
            uuid = _text(self._call("nvmlDeviceGetUUID", handle))
            self._devices.append((index, handle, name, uuid))

    def __repr__(self) -> str:
        return f"<NvmlStats devices={len(self._devices)}>"

    def read(self) -> tuple[GpuSample, ...]:
        return tuple(
            self._device(index, handle, name, uuid) for index, handle, name, uuid in self._devices
        )

    def _device(self, index: int, handle: object, name: str, uuid: str) -> GpuSample:
        rates = self._call("nvmlDeviceGetUtilizationRates", handle)
        memory = self._call("nvmlDeviceGetMemoryInfo", handle)
        temperature = self._call("nvmlDeviceGetTemperature", handle, NVML_TEMPERATURE_GPU)
        milliwatts = self._call("nvmlDeviceGetPowerUsage", handle)
        gpu_percent = _number(getattr(rates, "gpu", None))
        return GpuSample(
            index=index,
            name=name,
            uuid=uuid,
            utilization=None if gpu_percent is None else gpu_percent / 100,
            memory_used_bytes=_integer(getattr(memory, "used", None)),
            memory_total_bytes=_integer(getattr(memory, "total", None)),
            temperature_celsius=_number(temperature),
            power_watts=None if (mw := _number(milliwatts)) is None else mw / 1000,
        )

    def _call(self, function: str, *args: object) -> object | None:
        """``pynvml.<function>(*args)``, or None when NVML refuses (not supported, lost GPU)."""
        call = getattr(self._nvml, function, None)
        if call is None:  # an old pynvml without it
            return None
        try:
            result: object = call(*args)
        except self._error as error:
            log.debug("NVML %s%r failed: %s", function, args[1:], error)
            return None
        return result


def detect_gpu_stats() -> GpuStatsReader | None:
    """:class:`NvmlStats` when NVML loads (:func:`load_nvml`), else None (no GPU figures)."""
    nvml = load_nvml()
    return None if nvml is None else NvmlStats(nvml)


def _text(value: object) -> str:
    """NVML strings: ``str`` in nvidia-ml-py >= 11.515, ``bytes`` before; None: ``""``."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else ""


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _integer(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# --- a whole sample --------------------------------------------------------------------


@final
class HardwareProbe:
    """Takes :class:`Sample` s; one at a time (it keeps the CPU meter's last reading).

    ``gpus`` is called once, by the first sample, in its worker thread (loading
    NVML can take the driver a while): the default loads NVML, a test passes a
    fake. ``clock`` gives the samples' Unix time.
    """

    __slots__ = ("_clock", "_cpu", "_gpu_loader", "_gpus", "_loaded")

    def __init__(
        self,
        *,
        gpus: Callable[[], GpuStatsReader | None] = detect_gpu_stats,
        cpu: CpuMeter | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._gpu_loader = gpus
        self._gpus: GpuStatsReader | None = None
        self._loaded = False
        self._cpu = cpu if cpu is not None else CpuMeter()
        self._clock = clock

    @property
    def has_gpus(self) -> bool | None:
        """Whether a GPU reader was found; None before the first sample looked."""
        return self._gpus is not None if self._loaded else None

    def sample(self) -> Sample:
        """Blocks on /proc and NVML: run it in a worker thread."""
        if not self._loaded:
            self._gpus = self._gpu_loader()
            self._loaded = True
        memory = system_memory()
        total = memory.get("ram_total")
        available = memory.get("ram_available")
        used = total - available if total is not None and available is not None else None
        return Sample(
            time=self._clock(),
            cpu_utilization=self._cpu.read(),
            memory_total_bytes=total,
            memory_used_bytes=used,
            memory_available_bytes=available,
            gpus=self._gpus.read() if self._gpus is not None else (),
        )
