"""What a running model's process tree really holds in memory, read from Linux's /proc.

Fit by memory (issue 10) decides from measured footprints, not estimates, so
this module answers one question: how much RAM and GPU memory would be freed
if this model's process tree went away?

**The tree.** A server may fork workers (vLLM's engine core, a wrapper script
that execs nothing and waits), so the footprint is that of the pid and every
descendant: :func:`process_tree` follows ``/proc/<pid>/task/<tid>/children``
(every thread's, since a child belongs to the thread that forked it) and falls
back to matching parent pids in ``/proc/*/stat`` on kernels built without
``CONFIG_PROC_CHILDREN``. A process that exits while we look is skipped.

**RAM is the sum of PSS** (``Pss:`` in ``/proc/<pid>/smaps_rollup``), not of
RSS. RSS counts a page once per process that maps it, so a forked worker
sharing its parent's pages (or two processes mapping one model file) would be
counted twice and the model would look bigger than it is. PSS divides each
page among the processes that map it, so the tree's sum counts its shared
pages once; a page also mapped outside the tree (a shared library, a model
file another server maps too) counts only for the tree's share, which is what
the box gets back when the tree exits. PSS includes file-backed pages, so an
mmap-ed GGUF counts as far as it has been read in: those pages are resident
and the model needs them to run at speed. When ``smaps_rollup`` cannot be read
(another user's process, or a kernel before 4.14) that process counts its RSS
(``/proc/<pid>/statm`` resident pages times the page size) instead: an over-
rather than an under-count.

**GPU memory** comes from NVML (the ``gpu`` extra, PyPI's ``nvidia-ml-py``):
per device, the memory used by the tree's pids, reported as resources
``vram0``, ``vram1``, ... (``vramN`` is NVML device N). :class:`GpuMemoryReader`
is the seam tests fake. NVML reports host pids, so a server in a container
with its own pid namespace is not matched (its vram reads as 0).

Everything here is synchronous file reading; :func:`footprint_probe` wraps
:func:`measure_footprint` for the event loop, in a worker thread, because
``smaps_rollup`` of a process mapping tens of GiB takes the kernel a while.
"""

from __future__ import annotations

import functools
import importlib
import logging
import os
from collections.abc import Collection, Iterator, Sequence
from types import ModuleType
from typing import Final, Protocol, cast, final

import trio

__all__ = [
    "FootprintProbe",
    "GpuMemoryReader",
    "NvmlReader",
    "detect_gpu_reader",
    "footprint_probe",
    "load_nvml",
    "measure_footprint",
    "process_tree",
    "system_memory",
]

log = logging.getLogger("trio_swap.upstream")

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
_KIB: Final = 1024


# --- the process tree ----------------------------------------------------------------


class _ChildrenOf(Protocol):
    def __call__(self, pid: int, /) -> list[int]: ...


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants, parents before children; ``[]`` if ``pid`` is gone.

    Processes that exit while the tree is read are skipped; this never raises
    for a vanished process.
    """
    if not os.path.exists(f"/proc/{pid}"):
        return []
    children: _ChildrenOf = _children_by_task if _proc_children_supported() else _children_by_stat()
    tree = [pid]
    seen = {pid}
    index = 0
    while index < len(tree):
        for child in children(tree[index]):
            if child not in seen:  # a reused pid cannot make a cycle, but be sure
                seen.add(child)
                tree.append(child)
        index += 1
    return tree


@functools.cache
def _proc_children_supported() -> bool:
    """Whether this kernel has ``/proc/<pid>/task/<tid>/children`` (CONFIG_PROC_CHILDREN)."""
    return os.path.exists(f"/proc/self/task/{os.getpid()}/children")


def _children_by_task(pid: int) -> list[int]:
    """The children of every thread of ``pid``; ``[]`` if it is gone."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return []
    children: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as file:
                children.extend(int(child) for child in file.read().split())
        except OSError:  # the thread exited meanwhile
            continue
    return children


def _children_by_stat() -> _ChildrenOf:
    """A children lookup built from one scan of every process's parent pid."""
    by_parent: dict[int, list[int]] = {}
    for pid, ppid in _parent_pids():
        by_parent.setdefault(ppid, []).append(pid)
    return lambda pid: by_parent.get(pid, [])


def _parent_pids() -> Iterator[tuple[int, int]]:
    """``(pid, ppid)`` for every process in /proc that is still there when read."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as file:
                stat = file.read()
        except OSError:
            continue
        # The command name may hold spaces and ")": the fields start after the last ") ".
        fields = stat.rpartition(") ")[2].split()
        if len(fields) > 1:
            yield int(entry), int(fields[1])


# --- RAM -----------------------------------------------------------------------------


def _ram_of(pid: int) -> int:
    """PSS of ``pid`` in bytes, else its RSS, else 0 (gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as file:
            for line in file:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * _KIB
        return 0  # no Pss line: a zombie or kernel thread, which maps no memory
    except (OSError, ValueError, IndexError):
        pass
    try:
        with open(f"/proc/{pid}/statm") as file:
            return int(file.read().split()[1]) * _PAGE_SIZE
    except (OSError, ValueError, IndexError):
        return 0


def system_memory() -> dict[str, int]:
    """``{"ram_total": MemTotal, "ram_available": MemAvailable}`` in bytes, for display.

    A key is missing if the kernel does not report it; ``{}`` if /proc/meminfo
    cannot be read.
    """
    wanted = {"MemTotal:": "ram_total", "MemAvailable:": "ram_available"}
    result: dict[str, int] = {}
    try:
        with open("/proc/meminfo") as file:
            for line in file:
                name, _, rest = line.partition(" ")
                if name in wanted:
                    result[wanted[name]] = int(rest.split()[0]) * _KIB
    except (OSError, ValueError, IndexError):
        return {}
    return result


# --- GPU memory ----------------------------------------------------------------------


class GpuMemoryReader(Protocol):
    """GPU memory used by processes, per device.

    Called from a worker thread. Must not raise for pids that are gone or never
    used a GPU; a device it cannot read is left out of the answer.
    """

    def used_by(self, pids: Collection[int]) -> dict[int, int]:
        """NVML device index -> bytes used by ``pids`` on it (devices they do not use may
        be missing or 0)."""
        ...


class _NvmlProcess(Protocol):
    @property
    def pid(self) -> int: ...
    @property
    def usedGpuMemory(self) -> int | None: ...  # NVML's names


class _Nvml(Protocol):
    """The part of the ``pynvml`` module this file uses (it ships no type hints)."""

    NVMLError: type[Exception]

    def nvmlInit(self) -> None: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> object: ...
    def nvmlDeviceGetComputeRunningProcesses(self, handle: object) -> Sequence[_NvmlProcess]: ...
    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: object) -> Sequence[_NvmlProcess]: ...


@final
class NvmlReader:
    """:class:`GpuMemoryReader` over NVML: the compute and graphics processes of each device.

    A process listed by both lists of one device (a CUDA app that also draws)
    reports its one total in each, so per device a pid counts the larger of its
    entries, not their sum. ``usedGpuMemory`` is None where the driver does not
    tell (Windows WDDM, some vGPU setups); that counts 0. Built by
    :func:`detect_gpu_reader`, after ``nvmlInit`` succeeded.
    """

    __slots__ = ("_handles", "_nvml")

    def __init__(self, nvml: _Nvml) -> None:
        self._nvml = nvml
        self._handles = [
            nvml.nvmlDeviceGetHandleByIndex(index) for index in range(nvml.nvmlDeviceGetCount())
        ]

    def __repr__(self) -> str:
        return f"<NvmlReader devices={len(self._handles)}>"

    def used_by(self, pids: Collection[int]) -> dict[int, int]:
        wanted = set(pids)
        used: dict[int, int] = {}
        for index, handle in enumerate(self._handles):
            by_pid: dict[int, int] = {}
            try:
                for listing in (
                    self._nvml.nvmlDeviceGetComputeRunningProcesses,
                    self._nvml.nvmlDeviceGetGraphicsRunningProcesses,
                ):
                    for process in listing(handle):
                        if process.pid in wanted:
                            size = process.usedGpuMemory or 0
                            by_pid[process.pid] = max(by_pid.get(process.pid, 0), size)
            except self._nvml.NVMLError as error:  # a lost GPU, a listing not supported
                log.debug("NVML device %d unreadable: %s", index, error)
                continue
            used[index] = sum(by_pid.values())
        return used


def load_nvml() -> ModuleType | None:
    """The ``pynvml`` module once ``nvmlInit`` succeeded, or None (not installed, no driver).

    The one place NVML is loaded: footprints (:func:`detect_gpu_reader`) and the
    hardware sampler (:mod:`trio_swap.observe.hardware`) both start here, so a
    fake ``pynvml`` (``sys.modules``, or first on ``PYTHONPATH`` for a child
    ``trio-swap serve``) stands in for both. Blocks while the driver starts.
    """
    try:
        nvml = importlib.import_module("pynvml")
    except ImportError:
        log.debug("no GPU readings: pynvml is not installed (the 'gpu' extra)")
        return None
    try:
        nvml.nvmlInit()  # reference-counted by NVML: a second init is cheap and harmless
    except (nvml.NVMLError, OSError) as error:
        log.debug("no GPU readings: NVML unavailable: %s", error)
        return None
    return nvml


@functools.cache
def detect_gpu_reader() -> GpuMemoryReader | None:
    """An :class:`NvmlReader`, or None when ``pynvml`` is missing or ``nvmlInit`` fails.

    No GPU is the common case, so this is cheap and quiet: it tries once per
    process (the answer is cached) and says why at debug level.
    """
    nvml = load_nvml()
    if nvml is None:
        return None
    try:
        return NvmlReader(cast(_Nvml, nvml))
    except (nvml.NVMLError, OSError) as error:
        log.debug("no GPU memory readings: NVML unavailable: %s", error)
        return None


# --- the footprint -------------------------------------------------------------------


def measure_footprint(pid: int, gpu: GpuMemoryReader | None) -> dict[str, int]:
    """The memory ``pid``'s process tree holds: ``{"ram": bytes, "vram<i>": bytes, ...}``.

    ``ram`` is always present (0 if the process is gone); ``vram<i>`` for every
    device the reader could read, 0 included: a measured 0 is knowledge (a CPU
    model needs no GPU memory), a missing device is not. Blocks on /proc and
    NVML: call it from a thread (:func:`footprint_probe`) when on the event loop.
    """
    tree = process_tree(pid)
    footprint = {"ram": sum(_ram_of(member) for member in tree)}
    if gpu is not None and tree:
        for device, used in sorted(gpu.used_by(tree).items()):
            footprint[f"vram{device}"] = used
    return footprint


class FootprintProbe(Protocol):
    """The memory a model's process tree holds now, by resource name (see
    :func:`measure_footprint`). The router's seam: tests may pass a fake."""

    async def __call__(self, pid: int) -> dict[str, int]: ...


def footprint_probe(gpu: GpuMemoryReader | None = None) -> FootprintProbe:
    """A :class:`FootprintProbe` that runs :func:`measure_footprint` in a worker thread.

    ``gpu`` None means RAM only; pass :func:`detect_gpu_reader`'s answer to
    include GPU memory.
    """

    async def probe(pid: int) -> dict[str, int]:
        return await trio.to_thread.run_sync(measure_footprint, pid, gpu)

    return probe
