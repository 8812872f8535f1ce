"""Tests for `trio_swap.upstream.footprint`: real processes, real /proc, a fake NVML.

Memory is held by real processes (the responder's --hold-memory, or a small
Python child that writes one byte per page), and each test waits for the
process to say it holds it before measuring. Bounds are generous: the
interpreter itself adds tens of MiB, and the assertions are about whether the
held block is counted (once), not about the interpreter's size.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import types
from collections.abc import AsyncIterator, Collection, Iterator
from contextlib import asynccontextmanager, suppress
from typing import Final, final

import pytest
import trio

from tests.conftest import alive
from tests.test_responder import run_responder
from trio_swap.upstream import footprint
from trio_swap.upstream.footprint import (
    GpuMemoryReader,
    NvmlReader,
    detect_gpu_reader,
    footprint_probe,
    measure_footprint,
    process_tree,
    system_memory,
)

TIMEOUT: Final = 10.0
MIB: Final = 1 << 20
#: What a Python interpreter (with trio and hypercorn, for the responder) may add on top.
INTERPRETER_SLACK: Final = 192 * MIB

# Writes one byte per page of an anonymous private mapping of argv[1] MiB, so it
# is resident; with argv[2] == "fork" it then forks, and the child (which never
# writes the block) shares those pages. Each holder prints "holding <pid>", then
# waits to be killed.
_HOLDER: Final = """
import mmap, os, signal, sys
size = int(sys.argv[1]) << 20
block = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
for offset in range(0, size, mmap.PAGESIZE):
    block[offset] = 1
if sys.argv[2] == "fork":
    os.fork()
os.write(1, b"holding %d\\n" % os.getpid())  # one write: the two lines never interleave
signal.pause()
"""


@final
class Tree:
    """A process started in its own session, and the pids that reported holding memory."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.holders: list[int] = []


@asynccontextmanager
async def holding(command: list[str], holders: int) -> AsyncIterator[Tree]:
    """Run `command` in a new session until `holders` "holding <pid>" lines are printed.

    Always SIGKILLs the whole process group and reaps the leader.
    """
    process = await trio.lowlevel.open_process(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True
    )
    tree = Tree(process)
    try:
        assert process.stdout is not None
        buffer = b""
        while len(tree.holders) < holders:
            chunk = await process.stdout.receive_some()
            assert chunk, f"exited before {holders} holders reported: {buffer!r}"
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            tree.holders += [int(line.split()[1]) for line in lines if line.startswith(b"holding")]
        yield tree
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(5):
            with suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            await process.wait()
            if process.stdout is not None:
                await process.stdout.aclose()


def _holder(mib: int, *, fork: bool = False) -> list[str]:
    return [sys.executable, "-c", _HOLDER, str(mib), "fork" if fork else "alone"]


@final
class FakeGpu:
    """A GpuMemoryReader with fixed answers that records the pids it was asked about."""

    def __init__(self, used: dict[int, int]) -> None:
        self.used = used
        self.asked: list[set[int]] = []

    def used_by(self, pids: Collection[int]) -> dict[int, int]:
        self.asked.append(set(pids))
        return dict(self.used)


# --- RAM of real processes ---------------------------------------------------------


async def test_responder_holding_64mib_measures_at_least_that() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--hold-memory", "64MiB") as responder:
            measured = measure_footprint(responder.process.pid, None)
    assert set(measured) == {"ram"}
    assert 64 * MIB <= measured["ram"] < 64 * MIB + INTERPRETER_SLACK


async def test_tree_counts_a_child_that_holds_memory() -> None:
    """`sh -c '<holder> & wait'`: the memory is in the shell's child, not the shell."""
    command = ["sh", "-c", f'"{sys.executable}" -c "$0" 48 alone & wait', _HOLDER]
    with trio.fail_after(TIMEOUT):
        async with holding(command, holders=1) as tree:
            shell, [child] = tree.process.pid, tree.holders
            assert process_tree(shell) == [shell, child]
            assert process_tree(child) == [child]
            whole = measure_footprint(shell, None)["ram"]
            alone = measure_footprint(child, None)["ram"]
    assert 48 * MIB <= alone <= whole < 48 * MIB + INTERPRETER_SLACK


async def test_tree_without_proc_children_scans_parent_pids(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Kernels without CONFIG_PROC_CHILDREN: the same tree from /proc/*/stat."""
    with trio.fail_after(TIMEOUT):
        async with holding(_holder(8, fork=True), holders=2) as tree:
            parent = tree.process.pid
            with_children = process_tree(parent)
            monkeypatch.setattr(footprint, "_proc_children_supported", lambda: False)
            from_stat = process_tree(parent)
    assert with_children == from_stat
    assert sorted(with_children) == sorted(tree.holders)
    assert with_children[0] == parent


async def test_pages_shared_after_fork_count_once() -> None:
    """PSS, not RSS: a forked child sharing its parent's 64 MiB does not double it."""
    with trio.fail_after(TIMEOUT):
        async with holding(_holder(64, fork=True), holders=2) as tree:
            ram = measure_footprint(tree.process.pid, None)["ram"]
            rss = sum(_rss(pid) for pid in tree.holders)
    assert rss >= 128 * MIB  # each process's RSS has the whole block
    assert 64 * MIB <= ram < 64 * MIB + INTERPRETER_SLACK


async def test_unreadable_smaps_rollup_falls_back_to_rss(monkeypatch: pytest.MonkeyPatch) -> None:
    real_open = open

    def no_smaps(path: str, *args: object, **kwargs: object) -> object:
        if path.endswith("/smaps_rollup"):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, *args, **kwargs)  # type: ignore[call-overload]  # open's overloads

    with trio.fail_after(TIMEOUT):
        async with holding(_holder(32), holders=1) as tree:
            monkeypatch.setattr(footprint, "open", no_smaps, raising=False)
            ram = measure_footprint(tree.process.pid, None)["ram"]
            monkeypatch.undo()
            rss = _rss(tree.process.pid)
    assert ram == rss or abs(ram - rss) < 4 * MIB  # the same RSS, read a moment apart
    assert ram >= 32 * MIB


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_vanished_pid_measures_zero_without_raising() -> None:
    with trio.fail_after(TIMEOUT):
        process = await trio.lowlevel.open_process([sys.executable, "-c", "pass"])
        await process.wait()  # reaped: the pid is gone from /proc
    assert not alive(process.pid)
    gpu = FakeGpu({0: 1 << 30})
    assert process_tree(process.pid) == []
    assert measure_footprint(process.pid, gpu) == {"ram": 0}
    assert gpu.asked == []  # no pids, nothing to ask the GPU about


def test_process_tree_of_this_process_starts_with_it() -> None:
    assert process_tree(os.getpid())[0] == os.getpid()
    assert process_tree(0) == []


# --- GPU memory --------------------------------------------------------------------


async def test_fake_gpu_reader_adds_vram_per_device() -> None:
    gpu = FakeGpu({0: 3 * MIB, 1: 5 * MIB, 2: 0})
    with trio.fail_after(TIMEOUT):
        async with holding(_holder(1, fork=True), holders=2) as tree:
            measured = measure_footprint(tree.process.pid, gpu)
    assert set(measured) == {"ram", "vram0", "vram1", "vram2"}  # device 2: a measured 0
    assert (measured["vram0"], measured["vram1"], measured["vram2"]) == (3 * MIB, 5 * MIB, 0)
    assert gpu.asked == [set(tree.holders)]


async def test_footprint_probe_measures_in_a_thread() -> None:
    gpu = FakeGpu({1: 7})
    probe = footprint_probe(gpu)
    with trio.fail_after(TIMEOUT):
        measured = await probe(os.getpid())
        ram_only = await footprint_probe()(os.getpid())
    assert measured["vram1"] == 7
    assert measured["ram"] > 0
    assert set(ram_only) == {"ram"}


class _NvmlError(Exception):
    pass


def _nvml_process(pid: int, used: int | None) -> types.SimpleNamespace:
    return types.SimpleNamespace(pid=pid, usedGpuMemory=used)


def _fake_pynvml(*, init_fails: bool = False) -> types.ModuleType:
    """A stand-in for `pynvml` with three devices: compute, graphics, and a broken one."""
    compute = {
        0: [_nvml_process(10, 100), _nvml_process(11, None), _nvml_process(99, 1000)],
        1: [_nvml_process(10, 300)],
    }
    graphics = {0: [_nvml_process(10, 100)], 1: [_nvml_process(11, 40)]}

    def init() -> None:
        if init_fails:
            raise _NvmlError("Driver Not Loaded")

    def listing(table: dict[int, list[types.SimpleNamespace]]) -> object:
        def processes(handle: int) -> list[types.SimpleNamespace]:
            if handle == 2:
                raise _NvmlError("GPU is lost")
            return table.get(handle, [])

        return processes

    module = types.ModuleType("pynvml")
    module.NVMLError = _NvmlError  # type: ignore[attr-defined]  # a fake module's attributes
    module.nvmlInit = init  # type: ignore[attr-defined]
    module.nvmlDeviceGetCount = lambda: 3  # type: ignore[attr-defined]
    module.nvmlDeviceGetHandleByIndex = lambda index: index  # type: ignore[attr-defined]
    module.nvmlDeviceGetComputeRunningProcesses = listing(compute)  # type: ignore[attr-defined]
    module.nvmlDeviceGetGraphicsRunningProcesses = listing(graphics)  # type: ignore[attr-defined]
    return module


def test_nvml_reader_sums_the_pids_per_device() -> None:
    reader = NvmlReader(_fake_pynvml())
    # Device 0: pid 10 is listed as compute and graphics with its one total (100),
    # pid 11's use is unknown (None: 0), pid 99 is not ours. Device 2 is unreadable.
    assert reader.used_by([10, 11]) == {0: 100, 1: 340}
    assert reader.used_by([]) == {0: 0, 1: 0}
    assert repr(reader) == "<NvmlReader devices=3>"


@pytest.fixture
def fresh_detection() -> Iterator[None]:
    detect_gpu_reader.cache_clear()
    yield
    detect_gpu_reader.cache_clear()


@pytest.mark.usefixtures("fresh_detection")
def test_detect_gpu_reader_without_pynvml_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # as if not installed: import fails
    assert detect_gpu_reader() is None
    assert detect_gpu_reader() is None  # cached: asked once per process


@pytest.mark.usefixtures("fresh_detection")
def test_detect_gpu_reader_when_nvml_init_fails_is_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml(init_fails=True))
    assert detect_gpu_reader() is None


@pytest.mark.usefixtures("fresh_detection")
def test_detect_gpu_reader_with_nvml(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", _fake_pynvml())
    reader: GpuMemoryReader | None = detect_gpu_reader()
    assert isinstance(reader, NvmlReader)
    assert reader.used_by([10]) == {0: 100, 1: 300}


# --- the box -----------------------------------------------------------------------


def test_system_memory_reports_total_and_available() -> None:
    memory = system_memory()
    assert set(memory) == {"ram_total", "ram_available"}
    assert 0 < memory["ram_available"] <= memory["ram_total"]
