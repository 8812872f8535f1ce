"""``models.<id>.compat``, validated as llama-swap reads it::

    compat:
      ignoreWebsockets: true   # websocket upgrades never load the model (docs/api.md)

``ignoreWebsockets`` must be a boolean (default ``false``); anything else is a
located :class:`~trio_swap.config.errors.ConfigError`. An unknown key inside the
block is a warning, as unknown keys are elsewhere (llama-swap ignores it).

The special model id ``comfyui_auto`` gets llama-swap's treatment
(:func:`apply_comfyui`): ``ignoreWebsockets`` on whatever the file says, and
``concurrencyLimit`` at least 50. trio-swap has no ``/comfyui/`` endpoint
(docs/configuration.md): reach that model through ``/upstream/comfyui_auto/``.

Only the websocket proxy (:mod:`trio_swap.http.websocket`) reads the result,
per connection, so a reload applies a change without restarting the model.
"""

from __future__ import annotations

from typing import Final

import msgspec

from trio_swap.config.model import Compat, ModelConfig
from trio_swap.config.yamlsource import Document, KeyPath, type_name

__all__ = ["COMFYUI_MIN_CONCURRENCY", "COMFYUI_MODEL", "KEYS", "apply_comfyui", "check_compat"]

KEYS: Final = ("ignoreWebsockets",)
#: llama-swap's special model id behind its ``/comfyui/`` endpoint.
COMFYUI_MODEL: Final = "comfyui_auto"
#: The least ``concurrencyLimit`` llama-swap gives ``comfyui_auto``.
COMFYUI_MIN_CONCURRENCY: Final = 50


def check_compat(
    model_id: str, value: dict[str, object], doc: Document
) -> tuple[Compat, list[tuple[int, str]]]:
    """The validated block of ``model_id``, and warnings for keys it does not know.

    Raises:
        ConfigError: at ``models.<id>.compat.ignoreWebsockets`` when it is not a boolean.
    """
    path: KeyPath = ("models", model_id, "compat")
    warnings: list[tuple[int, str]] = []
    for key in value:
        if key not in KEYS:
            known = ", ".join(KEYS)
            warnings.append(doc.warning((*path, key), f"unknown key (known: {known}); ignored"))
    ignore = value.get("ignoreWebsockets")
    if ignore is None:
        ignore = False
    elif not isinstance(ignore, bool):
        shown = f" {ignore!r}" if isinstance(ignore, str | int | float) else ""
        raise doc.error(
            (*path, "ignoreWebsockets"), f"must be true or false (got {type_name(ignore)}{shown})"
        )
    return Compat(ignore_websockets=ignore), warnings


def apply_comfyui(model: ModelConfig) -> ModelConfig:
    """``comfyui_auto`` as llama-swap runs it; any other model unchanged."""
    if model.id != COMFYUI_MODEL:
        return model
    return msgspec.structs.replace(
        model,
        compat=Compat(ignore_websockets=True),
        concurrency_limit=max(model.concurrency_limit, COMFYUI_MIN_CONCURRENCY),
    )
