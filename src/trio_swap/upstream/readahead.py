"""Read a starting model's weight files into the page cache, beside the server's own load.

A server loading its weights (llama-server maps the file and faults it in)
reads as fast as its own access pattern lets the disk go; a plain sequential
read in large blocks, started at the same moment, keeps the disk busy at its
full sequential speed and turns the server's later reads into memory copies
(docs/faster-swaps.md has the numbers). :class:`ReadAhead` is a
:class:`~trio_swap.observe.hooks.ProcessHooks`: on ``starting`` it reads the
model's files (:func:`~trio_swap.config.files.weight_files`) in a worker
thread, and it stops as soon as the model is ready, fails, or is stopped
(within one :data:`~trio_swap.upstream.pagecache.BLOCK`: the hook sets a
flag the thread checks between blocks). It never blocks the router: the
hooks only start and flag tasks.

**Memory bound.** It reads at most :data:`MEMORY_SHARE` of the room
(:func:`room_beside`): ``MemAvailable`` at the start minus the size of the
other running models' files, the same room idle prefetching uses.
MemAvailable counts cached file pages as available, a running model's
mmapped weights among them; a read filling all of it would evict those
(models run together in groups or when they fit by memory), and more than
the room would only evict what it read first.

**Odd paths.** Only regular files are read (a FIFO or a device in ``files:``
is skipped; :func:`~trio_swap.upstream.pagecache.open_regular` never blocks).
Shutdown does not wait for a worker thread stuck in a read (a network file
system that stopped answering): the thread is abandoned, its flag is set so
it ends at its next block, and it touches nothing but its own job.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Final, final

import trio

from trio_swap.config.files import files_bytes
from trio_swap.config.sizes import format_size
from trio_swap.observe.hooks import ProcessHooks
from trio_swap.reasons import StopReason
from trio_swap.upstream.footprint import system_memory
from trio_swap.upstream.pagecache import WarmResult, file_size, warm
from trio_swap.upstream.residency import FileResidency, Measured, measure

__all__ = ["MEMORY_SHARE", "ReadAhead", "ReadAheadResult", "Warmer", "room_beside"]

log = logging.getLogger("trio_swap.upstream")

#: The most a read-ahead reads from disk, as a share of the room when it starts
#: (:func:`room_beside`: MemAvailable minus the other running models' files).
MEMORY_SHARE: Final = 0.9

#: :func:`~trio_swap.upstream.pagecache.warm`'s signature: the seam tests replace.
Warmer = Callable[..., WarmResult]


def _mem_available() -> int | None:
    return system_memory().get("ram_available")


def room_beside(available: int | None, running: Iterable[str]) -> int:
    """Bytes new page cache may take without evicting the running models' files.

    ``MemAvailable`` minus the size of the ``running`` files (each counted once);
    0 when MemAvailable is unknown. Read-ahead and idle prefetching both start
    from it.
    """
    if available is None:
        return 0
    return max(0, available - files_bytes(running))


@final
class ReadAheadResult:
    """What one start's read-ahead did (kept per model for logs and tests)."""

    __slots__ = ("model", "read", "seconds", "size", "why")

    def __init__(self, model: str, size: int, read: int, seconds: float, why: str) -> None:
        self.model = model
        #: Total bytes of the files that could be opened.
        self.size = size
        #: Bytes read from disk (blocks already resident are skipped).
        self.read = read
        self.seconds = seconds
        #: ``read`` (every file read to its end), ``ready``, ``stopped``, ``limit``, ...
        self.why = why

    def __repr__(self) -> str:
        return (
            f"ReadAheadResult({self.model!r}, size={self.size}, read={self.read}, "
            f"seconds={self.seconds:.3f}, why={self.why!r})"
        )


@final
class _Job:
    """One start's read: the flag its thread checks, and why it was raised."""

    def __init__(self, model: str, files: Sequence[str]) -> None:
        self.model = model
        self.files = tuple(files)
        self.flag = threading.Event()
        self.why = ""

    def stop(self, why: str) -> None:
        if not self.flag.is_set():
            self.why = why
            self.flag.set()


@final
class ReadAhead(ProcessHooks):
    """Process hooks that read a model's files ahead while it starts.

    ``files_of(model)`` gives the files to read for a model about to start
    (empty: none, e.g. ``prefetch: false``). ``running_files()`` gives the
    files of every model not stopped (its own included: they are left out),
    which the read must not evict. :meth:`run` must be running (in
    the supervisors nursery) for reads to happen; a start before that is not
    read ahead. ``residency``, when given, is told the files' residency after
    each read, so the model rows show it without waiting for their refresh.
    """

    def __init__(
        self,
        files_of: Callable[[str], Sequence[str]],
        *,
        running_files: Callable[[], Iterable[str]] = tuple,
        memory: Callable[[], int | None] = _mem_available,
        warmer: Warmer = warm,
        residency: FileResidency | None = None,
    ) -> None:
        self._files_of = files_of
        self._residency = residency
        self._running_files = running_files
        self._memory = memory
        self._warm = warmer
        self._nursery: trio.Nursery | None = None
        self._jobs: dict[str, _Job] = {}
        #: The last finished read-ahead of each model.
        self.results: dict[str, ReadAheadResult] = {}
        #: Set whenever a read-ahead finishes (tests wait on it); replaced after.
        self.finished = trio.Event()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Host the reads until cancelled; cancelling stops every read within one block."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:  # before the nursery waits for the reads: they end within a block
                self._nursery = None
                for job in self._jobs.values():
                    job.stop("shutdown")

    # -- hooks (the supervisor's task: quick, never blocking) --------------------------

    def starting(self, model: str) -> None:
        self._stop(model, "restarted")
        if self._nursery is None:
            return
        files = self._files_of(model)
        if not files:
            return
        job = self._jobs[model] = _Job(model, files)
        self._nursery.start_soon(self._read, job)

    def ready(self, model: str, seconds: float) -> None:
        self._stop(model, "ready")

    def start_failed(self, model: str) -> None:
        self._stop(model, "start failed")

    def stopping(self, model: str, reason: StopReason) -> None:
        self._stop(model, "stopped")

    def crashed(self, model: str) -> None:
        self._stop(model, "crashed")

    def stopped(self, model: str) -> None:
        self._stop(model, "stopped")

    def _stop(self, model: str, why: str) -> None:
        job = self._jobs.get(model)
        if job is not None:
            job.stop(why)

    # -- the read ---------------------------------------------------------------------

    async def _read(self, job: _Job) -> None:
        started = time.monotonic()
        own = set(job.files)
        others = [path for path in dict.fromkeys(self._running_files()) if path not in own]
        try:
            # Abandoned on cancel (shutdown), so a read stuck in the kernel cannot hold
            # it up; run() has set the flag, so the thread ends at its next block, and
            # it changes nothing outside its job (its result is dropped).
            size, read, why, measured = await trio.to_thread.run_sync(
                self._read_files, job, others, abandon_on_cancel=True
            )
        except trio.Cancelled:
            # This task may be cancelled before run() sets the flags (trio runs the
            # cancelled tasks in any order): the abandoned thread must stop anyway.
            job.stop("shutdown")
            raise
        finally:
            if self._jobs.get(job.model) is job:
                del self._jobs[job.model]
        if self._residency is not None:
            self._residency.update(measured)
        result = ReadAheadResult(job.model, size, read, time.monotonic() - started, why)
        self.results[job.model] = result
        log.info(
            "model %s: read ahead %s of %s in %.2fs (%s)",
            job.model,
            format_size(read),
            format_size(size),
            result.seconds,
            why,
        )
        finished, self.finished = self.finished, trio.Event()
        finished.set()

    def _read_files(
        self, job: _Job, others: Sequence[str]
    ) -> tuple[int, int, str, dict[str, Measured]]:
        """In a worker thread: each regular file in turn, within the memory bound."""
        allowed = int(room_beside(self._memory(), others) * MEMORY_SHARE)
        sizes = {path: file_size(path) for path in job.files}
        size = sum(known or 0 for known in sizes.values())
        read = 0
        why = "read"
        for path in job.files:
            if sizes[path] is None:  # missing, a directory, a FIFO, a device: never opened
                continue
            result = self._warm(path, stop=job.flag.is_set, limit=allowed - read)
            read += result.read
            if result.reason == "stopped":
                why = job.why or "stopped"
                break
            if result.reason == "limit":
                why = (
                    f"limit: {MEMORY_SHARE:.0%} of MemAvailable beside the running models "
                    f"({format_size(allowed)})"
                )
                break
            if result.reason.startswith("error"):
                log.debug("model %s: read-ahead of %s: %s", job.model, path, result.reason)
        return size, read, why, measure(job.files)
