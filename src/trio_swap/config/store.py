"""``metricsMaxInMemory`` and ``store``: where the activity log lives and how much it keeps.

As in llama-swap: ``metricsMaxInMemory`` <= 0 means the default (1000), and
a ``store:`` block needs a ``path``, which must not be a directory. Whether
the file can be opened is only known when trio-swap starts (``serve``).
"""

from __future__ import annotations

import os

from trio_swap.config.model import DEFAULT_METRICS_MAX_IN_MEMORY
from trio_swap.config.schema import RawConfig
from trio_swap.config.yamlsource import Document

__all__ = ["check_store"]


def check_store(raw: RawConfig, doc: Document) -> tuple[int, str | None, int]:
    """(rows kept in memory, the SQLite file or None, rows kept in the file; 0 = all)."""
    in_memory = raw.metrics_max_in_memory
    if in_memory <= 0:
        in_memory = DEFAULT_METRICS_MAX_IN_MEMORY
    store = raw.store
    if store is None:
        return in_memory, None, 0
    if not store.path.strip():
        raise doc.error(("store", "path"), "must name the activity database file")
    if os.path.isdir(store.path):
        raise doc.error(("store", "path"), f"{store.path!r} is a directory, not a database file")
    if store.max_rows < 0:
        raise doc.error(("store", "maxRows"), f"must be >= 0 (got {store.max_rows})")
    return in_memory, store.path, store.max_rows
