"""Keep the files of the stopped models most likely to be wanted next in the page cache.

A swap to a model whose weights are already cached starts as fast as a warm
restart. While no model is loading, :class:`Prefetcher` picks stopped models
(``prefetch`` not false, with weight files) in order of :func:`rank`, as many
as fit in the budget (:func:`room` and :func:`choose`), and reads their files
into the page cache in a worker thread (only the blocks the cache lacks).
Every :data:`RECHECK_SECONDS` it does it again, so what the kernel dropped
meanwhile (other work evicts page cache) is read back, and a model that became
more likely takes the place of one that became less.

**Budget.** ``prefetch.budget`` bytes, or by default :data:`DEFAULT_BUDGET_SHARE`
of the room: ``MemAvailable`` minus the size of the running models' files
(MemAvailable counts cached file pages as available, the running models'
weights included; those must stay). A configured budget is capped by the same
room. Reads are new page cache taken from free memory or from other cached
files, never beyond the budget, so running models keep theirs.

**Pausing.** It is a :class:`~trio_swap.observe.hooks.ProcessHooks`: when a
process starts, a flag stops the current read within one block and nothing is
read until no model is starting (a load needs the disk to itself, and its own
read-ahead reads what it needs). At shutdown the worker thread is abandoned
(a read stuck on a network file system cannot hold it up); the flag ends it
at its next block and it changes nothing (its report is dropped).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Final, NamedTuple, final

import trio

from trio_swap.config.files import files_bytes, weight_files
from trio_swap.config.model import PrefetchConfig
from trio_swap.config.sizes import format_size
from trio_swap.fit.ledger import DEFAULT_LOAD_SECONDS, FitLedger
from trio_swap.observe.hooks import ProcessHooks
from trio_swap.upstream.footprint import system_memory
from trio_swap.upstream.pagecache import file_size, warm
from trio_swap.upstream.process import ModelProcess, ProcessState
from trio_swap.upstream.readahead import Warmer
from trio_swap.upstream.residency import FileResidency, Measured, measure

__all__ = [
    "DEFAULT_BUDGET_SHARE",
    "RECHECK_SECONDS",
    "Candidate",
    "Prefetcher",
    "RoundReport",
    "choose",
    "rank",
    "room",
    "running_files",
]

log = logging.getLogger("trio_swap.upstream")

#: Without ``prefetch.budget``: this share of the room (MemAvailable minus the
#: running models' files) may hold prefetched files.
DEFAULT_BUDGET_SHARE: Final = 0.5
#: Seconds between two rounds while idle (each re-reads what the kernel dropped).
RECHECK_SECONDS: Final = 5.0


class Candidate(NamedTuple):
    """A stopped model whose files could be prefetched."""

    model: str
    files: tuple[str, ...]


def running_files(processes: Mapping[str, ModelProcess]) -> list[str]:
    """The files of every model whose process is not stopped (once each, in table order).

    What neither prefetching nor a read-ahead may evict (and what they leave out
    of their room).
    """
    running: dict[str, None] = {}
    for process in processes.values():
        if process.state is not ProcessState.STOPPED:
            running.update(dict.fromkeys(weight_files(process.model)))
    return list(running)


def rank(candidates: Iterable[Candidate], ledger: FitLedger | None) -> list[Candidate]:
    """Most worth prefetching first: the expected load seconds a request would cost.

    That is ``demand * load_seconds`` (demand: its requests, each counting
    less the more requests came after it, so recency and frequency;
    load_seconds: learned, or
    :data:`~trio_swap.fit.ledger.DEFAULT_LOAD_SECONDS`), then demand, then load
    time, then config order. Without a ledger: config order.
    """
    listed = list(candidates)
    if ledger is None:
        return listed

    def key(item: tuple[int, Candidate]) -> tuple[float, float, float, int]:
        index, candidate = item
        demand = ledger.demand(candidate.model)
        seconds = ledger.load_seconds(candidate.model) or DEFAULT_LOAD_SECONDS
        return (-demand * seconds, -demand, -seconds, index)

    return [candidate for _, candidate in sorted(enumerate(listed), key=key)]


def room(available: int | None, running_bytes: int, budget: int | None) -> int:
    """Bytes prefetched files may fill: ``budget`` (or the default share), within the room.

    The room is MemAvailable minus the running models' files, as for the
    read-ahead (:func:`~trio_swap.upstream.readahead.room_beside`).
    """
    if available is None:
        return 0
    free = max(0, available - running_bytes)
    if budget is None:
        return int(free * DEFAULT_BUDGET_SHARE)
    return min(budget, free)


def choose(
    ranked: Sequence[Candidate], sizes: Mapping[str, int | None], budget: int
) -> list[Candidate]:
    """The first candidates, in rank order, whose files fit in ``budget`` together.

    A candidate too big for what is left is skipped (a smaller one after it may
    fit); a file two candidates share counts once; missing files count 0 and
    a candidate with no existing file is left out.
    """
    chosen: list[Candidate] = []
    counted: set[str] = set()
    used = 0
    for candidate in ranked:
        new = [path for path in candidate.files if path not in counted and sizes.get(path)]
        if not any(sizes.get(path) for path in candidate.files):
            continue
        size = sum(sizes[path] or 0 for path in new)
        if used + size > budget:
            continue
        chosen.append(candidate)
        counted.update(new)
        used += size
    return chosen


@final
class RoundReport:
    """What one round decided and did (logged when it read anything; kept for tests)."""

    def __init__(
        self,
        *,
        budget: int,
        chosen: list[str],
        read: int,
        measured: dict[str, Measured],
        stopped: bool,
    ) -> None:
        self.budget = budget
        #: Model ids warmed this round, in rank order.
        self.chosen = chosen
        #: Bytes read from disk.
        self.read = read
        #: The chosen models' files after the round.
        self.measured = measured
        #: The round was cut short (a model started, or shutdown).
        self.stopped = stopped


@final
class Prefetcher(ProcessHooks):
    """Idle prefetching, as a task (:meth:`run`) and the hooks that pause it.

    ``processes()`` is the live table of supervisors (state and config of every
    model); ``settings()`` the current ``prefetch:`` (a reload changes it);
    ``ledger()`` the router's learned demand and load times (None: config
    order). ``residency``, when given, is told what each round measured.
    """

    def __init__(
        self,
        processes: Callable[[], Mapping[str, ModelProcess]],
        settings: Callable[[], PrefetchConfig],
        *,
        ledger: Callable[[], FitLedger | None] = lambda: None,
        residency: FileResidency | None = None,
        memory: Callable[[], int | None] | None = None,
        warmer: Warmer = warm,
        recheck: float = RECHECK_SECONDS,
    ) -> None:
        self._processes = processes
        self._settings = settings
        self._ledger = ledger
        self._residency = residency
        self._memory = memory if memory is not None else _mem_available
        self._warm = warmer
        self._recheck = recheck
        self._loading: set[str] = set()
        #: Set while a model is starting, and at shutdown: the worker stops between blocks.
        self._pause = threading.Event()
        self._closing = threading.Event()
        self._wake = trio.Event()
        self._idle = trio.Event()
        self._idle.set()
        #: The last round's report (None before the first).
        self.last: RoundReport | None = None
        #: Set after every round (tests wait on it); replaced after.
        self.rounds = trio.Event()

    # -- hooks -------------------------------------------------------------------------

    def starting(self, model: str) -> None:
        self._loading.add(model)
        self._pause.set()
        self._idle = trio.Event() if self._idle.is_set() else self._idle

    def ready(self, model: str, seconds: float) -> None:
        self._done_loading(model)

    def start_failed(self, model: str) -> None:
        self._done_loading(model)

    def stopped(self, model: str) -> None:
        self._done_loading(model)  # its files are candidates now

    def _done_loading(self, model: str) -> None:
        self._loading.discard(model)
        if not self._loading:
            self._pause.clear()
            self._idle.set()
        self._wake.set()

    # -- the task ------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Prefetch while idle, a round every ``recheck`` seconds, until cancelled.

        Cancelling returns at once; the flag stops the (abandoned) worker thread's
        read within one block.
        """
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._rounds)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._closing.set()

    async def _rounds(self) -> None:
        while True:
            await self._idle.wait()
            self._wake = trio.Event()
            settings = self._settings()
            if settings.enabled:
                await self._round(settings)
            rounds, self.rounds = self.rounds, trio.Event()
            rounds.set()
            with trio.move_on_after(self._recheck):
                await self._wake.wait()

    def candidates(self) -> tuple[list[Candidate], list[str]]:
        """(the stopped models' candidates in rank order, the running models' files)."""
        stopped: list[Candidate] = []
        processes = self._processes()
        for model_id, process in processes.items():
            files = weight_files(process.model)
            if process.state is ProcessState.STOPPED and process.model.prefetch and files:
                stopped.append(Candidate(model_id, files))
        return rank(stopped, self._ledger()), running_files(processes)

    async def _round(self, settings: PrefetchConfig) -> None:
        ranked, running = self.candidates()
        ranked = [Candidate(c.model, tuple(p for p in c.files if p not in running)) for c in ranked]
        # Abandoned on cancel: _closing is set first (run()), and _warm_round only reads.
        report = await trio.to_thread.run_sync(
            self._warm_round, ranked, running, settings.budget, abandon_on_cancel=True
        )
        self.last = report
        if self._residency is not None:
            self._residency.update(report.measured)
        if report.read:
            log.info(
                "prefetch: read %s into the page cache for %s (budget %s)%s",
                format_size(report.read),
                ", ".join(report.chosen),
                format_size(report.budget),
                "; paused: a model is starting" if report.stopped else "",
            )

    def _warm_round(
        self, ranked: list[Candidate], running: list[str], budget: int | None
    ) -> RoundReport:
        """In a worker thread: measure, choose, read; stop at once when flagged."""
        running_bytes = files_bytes(running)
        allowed = room(self._memory(), running_bytes, budget)
        sizes = {path: file_size(path) for c in ranked for path in c.files}
        chosen = choose(ranked, sizes, allowed)
        paths = list(dict.fromkeys(path for c in chosen for path in c.files if sizes.get(path)))
        read = 0
        stopped = False
        measured: dict[str, Measured] = {}
        for path in paths:
            before = measure([path])[path]
            if before.size is not None and before.resident >= before.size:
                measured[path] = before  # still warm: one cachestat call, no read
                continue
            if stopped or self._stop_now():
                stopped = True
                measured[path] = before
                continue
            result = self._warm(path, stop=self._stop_now, limit=allowed - read)
            read += result.read
            stopped = result.reason == "stopped"
            measured[path] = measure([path])[path]
        return RoundReport(
            budget=allowed,
            chosen=[c.model for c in chosen],
            read=read,
            measured=measured,
            stopped=stopped,
        )

    def _stop_now(self) -> bool:
        return self._pause.is_set() or self._closing.is_set()


def _mem_available() -> int | None:
    return system_memory().get("ram_available")
