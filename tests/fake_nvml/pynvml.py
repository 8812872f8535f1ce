"""A stand-in for nvidia-ml-py's ``pynvml``: two GPUs, the second without a temperature.

Tests put this directory first on ``PYTHONPATH`` for a ``trio-swap serve``
child (or load this file as ``pynvml`` in-process), so trio-swap's own NVML
loading (:func:`trio_swap.upstream.footprint.load_nvml`) finds it: the code
under test is the production path, only the driver is fake.

Only the calls trio-swap makes exist, with nvidia-ml-py's names and units
(bytes, percent, degrees Celsius, milliwatts). Device 1 answers
``nvmlDeviceGetTemperature`` with ``NVMLError_NotSupported``, as many
consumer cards and vGPUs do for some sensors.
"""

from __future__ import annotations

from typing import Final, NamedTuple

GiB: Final = 1 << 30
NVML_TEMPERATURE_GPU: Final = 0


class NVMLError(Exception):
    pass


class NVMLError_NotSupported(NVMLError):  # pynvml's name
    pass


class Device(NamedTuple):
    name: str
    uuid: str
    gpu_percent: int
    memory_percent: int
    used: int
    total: int
    temperature: int | None
    milliwatts: int


DEVICES: Final = (
    Device(
        name="NVIDIA Fake A100 80GB",
        uuid="GPU-0f0f0f0f-aaaa-4bbb-8ccc-000000000000",
        gpu_percent=37,
        memory_percent=12,
        used=20 * GiB,
        total=80 * GiB,
        temperature=61,
        milliwatts=251_500,
    ),
    Device(
        name="NVIDIA Fake RTX 4090",
        uuid="GPU-1e1e1e1e-dddd-4eee-8fff-111111111111",
        gpu_percent=0,
        memory_percent=0,
        used=512 << 20,
        total=24 * GiB,
        temperature=None,
        milliwatts=35_250,
    ),
)


class Utilization(NamedTuple):
    gpu: int
    memory: int


class Memory(NamedTuple):
    total: int
    free: int
    used: int


#: nvmlInit calls so far (NVML counts them too).
init_calls = 0


def nvmlInit() -> None:  # pynvml's names from here on
    global init_calls
    init_calls += 1


def nvmlShutdown() -> None:
    pass


def nvmlDeviceGetCount() -> int:
    return len(DEVICES)


def nvmlDeviceGetHandleByIndex(index: int) -> Device:
    if not 0 <= index < len(DEVICES):
        raise NVMLError("Invalid Argument")
    return DEVICES[index]


def nvmlDeviceGetName(handle: Device) -> str:
    return handle.name


def nvmlDeviceGetUUID(handle: Device) -> str:
    return handle.uuid


def nvmlDeviceGetUtilizationRates(handle: Device) -> Utilization:
    return Utilization(gpu=handle.gpu_percent, memory=handle.memory_percent)


def nvmlDeviceGetMemoryInfo(handle: Device) -> Memory:
    return Memory(total=handle.total, free=handle.total - handle.used, used=handle.used)


def nvmlDeviceGetTemperature(handle: Device, sensor: int) -> int:
    if sensor != NVML_TEMPERATURE_GPU or handle.temperature is None:
        raise NVMLError_NotSupported("Not Supported")
    return handle.temperature


def nvmlDeviceGetPowerUsage(handle: Device) -> int:
    return handle.milliwatts


def nvmlDeviceGetComputeRunningProcesses(handle: Device) -> list[object]:
    return []


def nvmlDeviceGetGraphicsRunningProcesses(handle: Device) -> list[object]:
    return []
