"""What the admin routes share: :class:`AppState` and the model rows they list.

The app factory (:mod:`trio_swap.http.app`) and the route modules it registers
(:mod:`~trio_swap.http.observe`, :mod:`~trio_swap.http.ui`) all read this
state, so it lives below them, free of Quart: a route module imports it,
never the app that registers the route module.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import final

import httpx

from trio_swap.config.files import weight_files
from trio_swap.config.model import Config
from trio_swap.http.capabilities import capability_row
from trio_swap.http.fit_view import fit_fields
from trio_swap.http.selection import Selection
from trio_swap.http.upstream_client import UpstreamClient
from trio_swap.observe.record import Observer
from trio_swap.observe.timeline import Timeline
from trio_swap.router import Router
from trio_swap.upstream.process import ModelProcess
from trio_swap.upstream.residency import FileResidency

__all__ = ["AppState", "model_rows"]


@final
class AppState:
    """What the handlers need, built once by :func:`trio_swap.server.serve`.

    A reload replaces ``config`` and changes ``processes`` (the router's live
    table): read them per request, never keep them across an ``await``.
    """

    def __init__(
        self,
        *,
        config: Config,
        router: Router,
        processes: Mapping[str, ModelProcess],
        upstream_client: UpstreamClient,
        observer: Observer | None = None,
        timeline: Timeline | None = None,
        residency: FileResidency | None = None,
    ) -> None:
        self.config = config
        self.router = router
        self.processes = processes
        self.upstream_client = upstream_client
        #: Metrics and the activity log (``/metrics``, ``/api/activity``).
        self.observer = observer
        #: Each model's loading / ready / stopping bands (``/api/timeline``).
        self.timeline = timeline
        #: Size and page-cache residency of the model files (the rows' ``files``).
        self.residency = residency
        #: Profiles and selectors at run time (the server sets it; None: neither applies).
        self.selection: Selection | None = None
        self.started_at = int(time.time())


def model_rows(state: AppState) -> list[dict[str, object]]:
    """One row per model: ``GET /api/models`` lists them, the UI feed sends them."""
    scheduler = state.router.scheduler
    rows: list[dict[str, object]] = []
    for model_id, process in state.processes.items():
        model = process.model
        rows.append(
            {
                "id": model_id,
                "name": model.name,
                "description": model.description,
                "aliases": list(model.aliases),
                "unlisted": model.unlisted,
                "state": process.state.value,
                "pid": process.pid,
                "proxy": model.proxy,
                "port": httpx.URL(model.proxy).port,
                "start_count": process.start_count,
                "last_ready_seconds": process.last_ready_seconds,
                "in_flight": scheduler.in_flight(model_id),
                "queued": scheduler.queued(model_id),
                "ttl": model.ttl,
                "capabilities": capability_row(model.capabilities),
                **fit_fields(state.router.ledger, model_id),
                "files": _files(state.residency, weight_files(model)),
            }
        )
    return rows


def _files(residency: FileResidency | None, paths: tuple[str, ...]) -> list[dict[str, object]]:
    """``{path, bytes, resident_bytes}`` per weight file, as last measured (null: not yet,
    or the file is missing); measuring happens off the event loop (upstream/residency.py)."""
    files: list[dict[str, object]] = []
    for path in paths:
        measured = residency.get(path) if residency is not None else None
        size = measured.size if measured is not None else None
        resident = measured.resident if measured is not None and size is not None else None
        files.append({"path": path, "bytes": size, "resident_bytes": resident})
    return files
