"""Tests for `trio_swap.upstream.pagecache`: residency, dropping, and the stoppable read.

Real files on the test's own disk, real page cache: a file written and
fsynced is clean, so ``POSIX_FADV_DONTNEED`` drops it; reads go through an fd
with ``POSIX_FADV_RANDOM`` so the kernel's own read-ahead adds nothing.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from trio_swap.upstream import pagecache
from trio_swap.upstream.pagecache import drop, file_size, resident_bytes, warm

MIB = 1 << 20


def write_file(path: Path, size: int) -> Path:
    """``size`` bytes that are not all zeros, on disk (fsynced: clean, so droppable)."""
    chunk = os.urandom(MIB)
    with path.open("wb") as file:
        for offset in range(0, size, MIB):
            file.write(chunk[: min(MIB, size - offset)])
        file.flush()
        os.fsync(file.fileno())
    return path


def dropped(path: Path) -> Path:
    """``path`` with its pages dropped; skips the test where the page cache cannot be dropped."""
    drop(str(path))
    if resident_bytes(str(path)) != 0:
        pytest.skip("the page cache of this file system cannot be dropped (tmpfs?)")
    return path


def read_without_readahead(path: Path, offset: int, length: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        os.pread(fd, length, offset)
    finally:
        os.close(fd)


@pytest.fixture
def weights(tmp_path: Path) -> Path:
    """An 8 MiB file whose last page is partly used (so ``size`` is not page-aligned)."""
    return dropped(write_file(tmp_path / "w.gguf", 8 * MIB + 100))


def test_resident_bytes_follows_reads_and_drops(weights: Path) -> None:
    path = str(weights)
    size = 8 * MIB + 100
    assert resident_bytes(path) == 0
    read_without_readahead(weights, 2 * MIB, MIB)
    assert resident_bytes(path) == MIB
    read_without_readahead(weights, 0, size)
    assert resident_bytes(path) == size  # the last page counts only the file's bytes
    drop(path)
    assert resident_bytes(path) == 0


def test_mincore_and_cachestat_agree(weights: Path) -> None:
    read_without_readahead(weights, 3 * MIB, 2 * MIB)
    size = 8 * MIB + 100
    fd = os.open(weights, os.O_RDONLY)
    try:
        by_mincore = pagecache._mincore(fd, 0, size, size)
        by_cachestat = pagecache._cachestat(fd, 0, size)
    finally:
        os.close(fd)
    assert by_mincore == 2 * MIB
    if by_cachestat is None:
        pytest.skip("this kernel has no cachestat (before Linux 6.5)")
    assert by_cachestat == 2 * MIB


def test_odd_paths_are_not_errors(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    for path in (str(tmp_path / "missing"), str(tmp_path), str(empty), "nul\0byte", ""):
        assert resident_bytes(path) == 0
        drop(path)  # never raises
        assert warm(path, stop=lambda: False, limit=MIB).read == 0
    assert file_size(str(tmp_path)) is None
    assert file_size(str(tmp_path / "missing")) is None
    assert file_size(str(empty)) == 0


def within_a_thread(call: Callable[[], object]) -> object:
    """``call()`` in a daemon thread; fails (instead of hanging the run) if it blocks."""
    results: list[object] = []
    errors: list[BaseException] = []

    def target() -> None:
        try:
            results.append(call())
        except BaseException as exc:  # re-raised in the test's thread
            errors.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout=30)  # a hang guard: each call returns at once
    assert not thread.is_alive(), "blocked"
    if errors:
        raise errors[0]
    return results[0]


def test_a_fifo_or_a_device_is_never_opened_in_a_blocking_way(tmp_path: Path) -> None:
    """A plain ``open(O_RDONLY)`` of a FIFO waits for a writer forever."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        assert file_size(path) is None
        assert within_a_thread(partial(resident_bytes, path)) == 0
        within_a_thread(partial(drop, path))
        result = within_a_thread(partial(warm, path, stop=lambda: False, limit=MIB))
        assert isinstance(result, pagecache.WarmResult)
        assert result.read == 0
        assert result.reason == "error: [Errno 22] not a regular file: " + repr(path)
        with pytest.raises(OSError, match="not a regular file"):
            within_a_thread(partial(pagecache.open_regular, path))
    # Nothing holds the FIFO open for reading now (a writer's non-blocking open says so).
    with pytest.raises(OSError) as excinfo:
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    assert excinfo.value.errno == errno.ENXIO


@pytest.fixture(params=["cachestat", "mincore"])
def snapshot_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Runs a test with each way of finding the cached blocks (cachestat where it exists)."""
    if request.param == "cachestat":
        if not pagecache._cachestat_works():
            pytest.skip("this kernel has no cachestat (before Linux 6.5)")
    else:
        monkeypatch.setattr(pagecache, "_cachestat_works", lambda: False)
    yield request.param


def test_warm_reads_the_whole_file_and_skips_what_is_cached(
    weights: Path, snapshot_by: str
) -> None:
    path = str(weights)
    size = 8 * MIB + 100
    read_without_readahead(weights, 0, 2 * MIB)  # the first two blocks are cached
    result = warm(path, stop=lambda: False, limit=size, block=MIB)
    assert result.reason == "done"
    assert result.size == size
    assert result.read == size - 2 * MIB  # blocks cached before it began are not read again
    assert resident_bytes(path) == size
    again = warm(path, stop=lambda: False, limit=size, block=MIB)
    assert (again.reason, again.read) == ("done", 0)


def test_warm_stops_between_blocks(weights: Path) -> None:
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 2

    result = warm(str(weights), stop=stop, limit=1 << 40, block=MIB, skip_resident=False)
    assert (result.reason, result.read) == ("stopped", 2 * MIB)


def test_the_first_look_at_the_cache_stops_between_windows(
    tmp_path: Path, snapshot_by: str
) -> None:
    """A huge sparse file: the snapshot before the read is stoppable (one window at most)."""
    path = tmp_path / "sparse.gguf"
    with path.open("wb") as file:
        file.truncate(3 * pagecache.WINDOW + 5)
    asked: list[int] = []

    def stop() -> bool:
        asked.append(1)
        return len(asked) > 1  # after the first window

    result = warm(str(path), stop=stop, limit=1 << 40)
    assert (result.reason, result.read, len(asked)) == ("stopped", 0, 2)


def test_warm_never_reads_past_its_limit(weights: Path) -> None:
    result = warm(
        str(weights), stop=lambda: False, limit=3 * MIB + 5, block=MIB, skip_resident=False
    )
    assert (result.reason, result.read) == ("limit", 3 * MIB)
    assert resident_bytes(str(weights)) >= 3 * MIB
