"""What fit by memory shows: per-model needs and footprints, per-resource use.

``GET /api/fit`` and the fit fields of the model rows (``/api/models``,
``/running``, the UI feed) come from here, read from the router's ledger
(the numbers the policy decides with, never a second estimate).
"""

from __future__ import annotations

from collections.abc import Mapping

from trio_swap.fit.ledger import FORMULA, FitLedger
from trio_swap.upstream.process import ModelProcess, ProcessState

__all__ = ["FORMULA", "fit_document", "fit_fields", "resource_use"]


def fit_fields(ledger: FitLedger | None, model_id: str) -> dict[str, object]:
    """``needs``, ``footprint`` and ``load_seconds`` for one model row."""
    if ledger is None:
        return {"needs": {}, "footprint": {}, "load_seconds": None}
    return {
        "needs": ledger.need(model_id),
        "footprint": ledger.footprint(model_id),
        "load_seconds": ledger.load_seconds(model_id),
    }


def resource_use(
    ledger: FitLedger, processes: Mapping[str, ModelProcess]
) -> dict[str, dict[str, int]]:
    """Per resource: capacity, reserved (effective needs of running models, asleep needs
    of sleeping ones), used (measured)."""
    return ledger.use(m for m, p in processes.items() if p.state is not ProcessState.STOPPED)


def fit_document(
    ledger: FitLedger | None, processes: Mapping[str, ModelProcess]
) -> dict[str, object]:
    """``GET /api/fit``: whether fit is on, each resource's use, each model's numbers."""
    if ledger is None:
        return {"enabled": False, "resources": {}, "models": [], "formula": FORMULA}
    models = []
    for model_id, process in processes.items():
        models.append(
            {
                "id": model_id,
                "state": process.state.value,
                **fit_fields(ledger, model_id),
                "basis": ledger.basis(model_id),
                "peak": ledger.peak(model_id),
                "demand": round(ledger.demand(model_id), 6),
                "eviction_cost": round(ledger.eviction_cost(model_id), 6),
                # ``sleep:`` models: what they hold asleep, and what a wake costs.
                "can_sleep": ledger.can_sleep(model_id),
                "asleep_need": ledger.asleep_need(model_id) if ledger.can_sleep(model_id) else {},
                "wake_seconds": ledger.wake_seconds(model_id),
                "sleep_cost": (
                    round(ledger.sleep_cost(model_id), 6) if ledger.can_sleep(model_id) else None
                ),
            }
        )
    return {
        "enabled": bool(ledger.resources),
        "resources": resource_use(ledger, processes),
        "models": models,
        "formula": FORMULA,
    }
