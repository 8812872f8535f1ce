"""How much of a file is in Linux's page cache, dropping it, and reading it in.

A model server's start is mostly reading its weights (docs/faster-swaps.md).
Once a file's pages are in the page cache, the read costs a memory copy
instead of a disk read, so trio-swap reads model files ahead of the server
(:mod:`~trio_swap.upstream.readahead`) and while the box is idle
(:mod:`~trio_swap.upstream.prefetch`). Everything here is synchronous and
meant for a worker thread; nothing raises for a missing or unreadable file.

**Only regular files are opened**, and never in a way that can block: a path
in ``files:`` may name a FIFO (whose plain ``open`` for reading waits for a
writer, forever) or a device. Every open here is ``O_NONBLOCK`` and checks
``S_ISREG`` on the open descriptor (:func:`open_regular`) before reading.

**resident_bytes** asks the kernel how many of the file's pages are in the
page cache. On Linux 6.5 and later that is one ``cachestat(2)`` system call
(number 451, through ``ctypes``: about 4 ms per GB of file on the development
box); before, ``mincore(2)``: the file is mapped read-only (``mmap`` with
``PROT_READ``, ``MAP_SHARED``, one window of at most :data:`WINDOW` bytes at a
time) and the kernel reports, one byte per page, whether that page is cached
(about 20 ms per GB). Neither reads the file or faults a page in, so measuring
does not change the answer. Pages count whole, but never more than the file's
size, so a fully cached file has ``resident_bytes == size`` (a partly cached
one is exact to within its last page). ``cachestat`` also counts pages whose
read from disk is still under way; ``mincore`` only those whose data is there.
The answer is the page cache's, shared by every process, not one process's RSS.

**Reading in** (:func:`warm`) reads the file with ``pread`` in blocks of
:data:`BLOCK` bytes, skipping the blocks already resident when it began, and
checks a stop flag between blocks, so a caller can stop it within one block's
read. The first look at what is resident is stoppable too: ``cachestat`` per
block where the kernel has it, else ``mincore`` one :data:`WINDOW` at a time,
the flag checked between windows. It never reads more new bytes than it is
allowed (``limit``): a read of a file larger than the page cache can hold
would only evict its own beginning.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import mmap
import os
import stat
from collections.abc import Callable
from typing import Final, final

__all__ = [
    "BLOCK",
    "WINDOW",
    "WarmResult",
    "drop",
    "file_size",
    "open_regular",
    "resident_bytes",
    "warm",
]

#: Bytes read per ``pread`` (and the granularity of a stop): big enough for the
#: disk's full sequential speed, small enough to stop within a few milliseconds.
BLOCK: Final = 16 << 20
#: Bytes mapped at once by :func:`resident_bytes` (the page vector is 1/4096 of it).
WINDOW: Final = 1 << 30

_PAGE: Final = mmap.PAGESIZE
# mincore's vector: bit 0 of each byte says "resident"; the other bits are reserved.
_LOW_BIT: Final = bytes(i & 1 for i in range(256))
_MAP_FAILED: Final = ctypes.c_void_p(-1).value


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.c_long,
    ]
    libc.munmap.restype = ctypes.c_int
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.restype = ctypes.c_int
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
    return libc


def file_size(path: str) -> int | None:
    """The size of the regular file ``path``, or None (missing, unreadable, not a file)."""
    try:
        info = os.stat(path)
    except (OSError, ValueError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def open_regular(path: str) -> int:
    """A read-only descriptor of the regular file ``path``; raises OSError for anything else.

    Opened ``O_NONBLOCK`` so that a FIFO (whose blocking open waits for a writer)
    or a device never blocks the caller, then checked with ``fstat`` on the open
    descriptor (no race with a rename); blocking mode is restored for the reads.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except ValueError as exc:  # a NUL in the path
        raise OSError(errno.EINVAL, str(exc), path) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise OSError(errno.EINVAL, "not a regular file", path)
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def resident_bytes(path: str) -> int:
    """Bytes of ``path`` in the page cache now (``cachestat``, or ``mincore``).

    0 for a missing, unreadable or empty file, one that is not a regular file,
    and where neither system call is available.
    """
    try:
        fd = open_regular(path)
    except OSError:
        return 0
    try:
        size = os.fstat(fd).st_size
        return sum(
            _resident_in(fd, start, min(WINDOW, size - start), size)
            for start in range(0, size, WINDOW)
        )
    except OSError:
        return 0
    finally:
        os.close(fd)


def _resident_in(fd: int, start: int, length: int, size: int) -> int:
    """Resident bytes of ``[start, start + length)``; ``start`` is page-aligned."""
    if _cachestat_works():
        cached = _cachestat(fd, start, length)
        if cached is not None:
            return min(cached, length)
    return _mincore(fd, start, length, size)


class _CacheStatRange(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _CacheStat(ctypes.Structure):
    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in ("nr_cache", "nr_dirty", "nr_writeback", "nr_evicted", "nr_recently_evicted")
    )


_SYS_CACHESTAT: Final = 451  # the same number on every architecture since Linux 6.5


def _cachestat(fd: int, start: int, length: int) -> int | None:
    """Cached bytes of the range by ``cachestat(2)``; None where the kernel lacks it."""
    where = _CacheStatRange(start, length)
    stat_ = _CacheStat()
    if _libc().syscall(_SYS_CACHESTAT, fd, ctypes.byref(where), ctypes.byref(stat_), 0) != 0:
        return None
    return int(stat_.nr_cache) * _PAGE


@functools.cache
def _cachestat_works() -> bool:
    """Whether this kernel has ``cachestat`` (asked once, on this module's own file)."""
    try:
        fd = os.open(__file__, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        return _cachestat(fd, 0, _PAGE) is not None
    finally:
        os.close(fd)


def _present(fd: int, start: int, length: int) -> bytes:
    """One byte per page of the range, 1 where ``mincore(2)`` finds its data in the cache."""
    pages = (length + _PAGE - 1) // _PAGE
    libc = _libc()
    address = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, start)
    if address is None or address == _MAP_FAILED:
        raise OSError(ctypes.get_errno(), "mmap failed")
    try:
        vector = ctypes.create_string_buffer(pages)
        if libc.mincore(address, length, vector) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return vector.raw.translate(_LOW_BIT)
    finally:
        libc.munmap(address, length)


def _cached_blocks(fd: int, size: int, block: int, stop: Callable[[], bool]) -> set[int] | None:
    """Offsets of the ``block``-sized pieces of the file whose every page is cached now.

    ``block`` is a multiple of the page size. One window (whole blocks, about
    :data:`WINDOW` bytes) at a time, with ``stop()`` asked before each: None
    when it said stop. By ``cachestat`` per block where the kernel has it (a
    range of pages nobody cached costs next to nothing), else one ``mincore``
    per window.
    """
    cached: set[int] = set()
    span = max(block, WINDOW // block * block)
    per_block = block // _PAGE
    for start in range(0, size, span):
        if stop():
            return None
        end = min(start + span, size)
        if _cachestat_works():
            for offset in range(start, end, block):
                length = min(block, end - offset)
                got = _cachestat(fd, offset, length)
                if got is not None and got >= _pages(length) * _PAGE:
                    cached.add(offset)
            continue
        flags = _present(fd, start, end - start)
        for first in range(0, len(flags), per_block):
            if flags.count(1, first, first + per_block) == len(flags[first : first + per_block]):
                cached.add(start + first * _PAGE)
    return cached


def _pages(length: int) -> int:
    return (length + _PAGE - 1) // _PAGE


def _mincore(fd: int, start: int, length: int, size: int) -> int:
    """Resident bytes of the range by ``mincore(2)`` over a read-only mapping of it."""
    flags = _present(fd, start, length)
    pages = len(flags)
    resident = flags.count(1) * _PAGE
    end = start + pages * _PAGE
    if end > size and flags[-1]:  # the last page holds only the file's tail
        resident -= end - size
    return resident


def drop(path: str) -> None:
    """Ask the kernel to drop ``path``'s clean, unmapped pages (``POSIX_FADV_DONTNEED``).

    Pages a running process maps, or that are dirty, stay. Never raises.
    """
    try:
        fd = open_regular(path)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    except OSError:
        pass
    finally:
        os.close(fd)


@final
class WarmResult:
    """What one :func:`warm` did: bytes read from disk, and why it ended."""

    __slots__ = ("read", "reason", "size")

    def __init__(self, size: int, read: int, reason: str) -> None:
        #: The file's size (0 when it could not be opened).
        self.size = size
        #: Bytes read (blocks found resident are not read and not counted).
        self.read = read
        #: ``done`` (end of file), ``stopped`` (the flag), ``limit``, or ``error: ...``.
        self.reason = reason

    def __repr__(self) -> str:
        return f"WarmResult(size={self.size}, read={self.read}, reason={self.reason!r})"


def warm(
    path: str,
    *,
    stop: Callable[[], bool],
    limit: int,
    skip_resident: bool = True,
    block: int = BLOCK,
) -> WarmResult:
    """Read ``path`` sequentially into the page cache, until done, ``stop()`` or ``limit``.

    ``stop`` is called before each block, and before each window of the first
    look at what is cached (from this thread). ``limit`` bounds the bytes
    read from disk (a block needing more is not read). Anything but a regular
    file is an ``error: ...`` at once (never a blocking open). With
    ``skip_resident`` the blocks found fully cached *before the read begins*
    are not read again (a copy per byte saved, for a check of one
    byte per page); a block the kernel's own read-ahead brings in during the
    read is still read: skipping those left a later llama-server load a third
    slower (0.24 s instead of 0.18 s, ten alternating runs each), whatever
    the kernel does differently with pages it read ahead but nobody read.
    """
    try:
        fd = open_regular(path)
    except OSError as exc:
        return WarmResult(0, 0, f"error: {exc}")
    read = 0
    try:
        size = os.fstat(fd).st_size
        cached: set[int] | None = set()
        if skip_resident and block % _PAGE == 0:
            cached = _cached_blocks(fd, size, block, stop)
        if cached is None:
            return WarmResult(size, 0, "stopped")
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)  # a larger kernel read-ahead
        buffer = bytearray(block)
        view = memoryview(buffer)
        for offset in range(0, size, block):
            if stop():
                return WarmResult(size, read, "stopped")
            length = min(block, size - offset)
            if offset in cached:
                continue
            if read + length > limit:
                return WarmResult(size, read, "limit")
            done = 0
            while done < length:
                got = os.preadv(fd, [view[done:length]], offset + done)
                if got == 0:  # the file shrank under us
                    return WarmResult(size, read + done, "done")
                done += got
            read += length
        return WarmResult(size, read, "done")
    except OSError as exc:
        return WarmResult(0, read, f"error: {exc}")
    finally:
        os.close(fd)
