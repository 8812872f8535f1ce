"""The saved KV cache files of every ``keepCache`` model, kept within ``cacheDiskBudget``.

llama-server writes a slot's file where its ``--slot-save-path`` says, when
:class:`~trio_swap.upstream.kvcache.ModelCache` asks; this module decides
which files stay. A sweep lists the files trio-swap had saved (their names
start with :data:`FILE_PREFIX`) in every watched directory and deletes the
least recently used, by modification time (a save writes a file, a restore
touches it), until the rest fit in the budget: the conversations used last
are kept, whichever model they belong to. One budget for all models, because
they share the disk and what matters is which caches were used last.
"""

from __future__ import annotations

import enum
import logging
import os
from typing import Final, final

import trio

from trio_swap.config.sizes import format_size

__all__ = ["FILE_PREFIX", "FILE_SUFFIX", "CacheDisk", "CacheHooks", "Outcome"]

log = logging.getLogger("trio_swap.upstream")

#: Every file trio-swap asks a server to save starts with this (the budget counts only these).
FILE_PREFIX: Final = "trio-swap-kv."
FILE_SUFFIX: Final = ".bin"


class Outcome(enum.StrEnum):
    """How one slot's save or restore ended: the ``outcome`` label of the metrics."""

    OK = "ok"
    FAILED = "failed"  # the server refused, or the connection failed
    TIMEOUT = "timeout"  # cut at the time limit


class CacheHooks:
    """What the KV cache keepers report (no-op defaults; the metrics override them).

    Plain calls on the caller's task: quick, never blocking.
    """

    def slot_saved(self, model: str, outcome: Outcome, nbytes: int) -> None:
        """A slot's save ended; ``nbytes`` written (0 unless ``OK``)."""

    def slot_restored(self, model: str, outcome: Outcome, nbytes: int) -> None:
        """A slot's restore ended; ``nbytes`` read (0 unless ``OK``)."""

    def tokens_reused(self, model: str, tokens: int) -> None:
        """The first response after a restore reused ``tokens`` prompt tokens."""

    def cache_off(self, model: str, off: bool) -> None:
        """Restores for ``model`` were given up (``off``), or tried again after a reload."""

    def disk_swept(self, total_bytes: int, deleted: int) -> None:
        """The saved files take ``total_bytes`` after a sweep that deleted ``deleted`` files."""


@final
class CacheDisk:
    """Every model's saved slot files, kept within ``cacheDiskBudget``.

    One per trio-swap instance: :meth:`run` is the only task that deletes for
    the budget. A sweep lists the files named :data:`FILE_PREFIX` ``*`` in every
    watched directory and deletes the least recently used (oldest
    modification time: a save writes it, a restore touches it) until the rest
    fit in the budget.
    """

    def __init__(self, budget: int, *, hooks: CacheHooks | None = None) -> None:
        self._budget = budget
        #: Told of saves, restores and sweeps (the metrics); the keepers report to it too.
        self.hooks = hooks if hooks is not None else CacheHooks()
        self._directories: set[str] = set()
        self._wanted = trio.Event()
        #: Bytes of saved files after the last sweep (None before the first).
        self.total_bytes: int | None = None

    def __repr__(self) -> str:
        return f"<CacheDisk {format_size(self._budget)}: {sorted(self._directories)}>"

    @property
    def budget(self) -> int:
        return self._budget

    @budget.setter
    def budget(self, value: int) -> None:
        """A reload's ``cacheDiskBudget``: a smaller one is applied at once."""
        if value != self._budget:
            self._budget = value
            self.request_sweep()

    def watch(self, directory: str) -> None:
        """Count the saved files in ``directory`` (a keepCache model's save path)."""
        if directory not in self._directories:
            self._directories.add(directory)
            self.request_sweep()

    def request_sweep(self) -> None:
        """Ask :meth:`run` for a sweep soon. Never blocks."""
        self._wanted.set()

    async def run(self) -> None:
        """Sweep whenever asked, until cancelled (a sweep runs in a worker thread)."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            await self.sweep()

    async def sweep(self) -> list[str]:
        """One sweep now: returns the paths deleted, oldest first."""
        budget = self._budget
        total, deleted = await trio.to_thread.run_sync(_sweep, sorted(self._directories), budget)
        self.total_bytes = total
        self.hooks.disk_swept(total, len(deleted))
        for path, size in deleted:
            log.info(
                "KV cache: deleted %s (%s), the least recently used, to keep saved slots "
                "within cacheDiskBudget (%s)",
                path,
                format_size(size),
                format_size(budget),
            )
        return [path for path, _ in deleted]


def _sweep(directories: list[str], budget: int) -> tuple[int, list[tuple[str, int]]]:
    """Delete the oldest saved files until the rest fit ``budget``: (bytes left, deleted)."""
    files: list[tuple[float, str, int]] = []
    for directory in directories:
        try:
            entries = list(os.scandir(directory))
        except OSError:
            continue  # not created yet (llama-server creates it), or gone
        for entry in entries:
            if not (entry.name.startswith(FILE_PREFIX) and entry.name.endswith(FILE_SUFFIX)):
                continue
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            files.append((info.st_mtime, entry.path, info.st_size))
    files.sort()
    total = sum(size for _, _, size in files)
    deleted: list[tuple[str, int]] = []
    for _, path, size in files:
        if total <= budget:
            break
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("KV cache: cannot delete %s: %s", path, exc)
            continue
        total -= size
        deleted.append((path, size))
    return total, deleted
