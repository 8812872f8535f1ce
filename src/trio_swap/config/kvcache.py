"""``keepCache`` (per model) and ``cacheDiskBudget`` (top level), validated.

A model with ``keepCache: true`` has its llama-server slots saved before a
stop and restored after its next start (docs/faster-swaps.md). llama-server
saves slots only into the directory its ``--slot-save-path`` names and only
while its ``/slots`` endpoint is on, so both are checked here, against the
expanded ``cmd``, with the health check the restore waits for, as located
errors: ``trio-swap check`` reports them before anything runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from trio_swap.config.model import ModelConfig
from trio_swap.config.sizes import SizeError, parse_size
from trio_swap.config.yamlsource import Document, KeyPath

__all__ = [
    "SLOT_SAVE_FLAG",
    "check_cache_budget",
    "check_keep_cache",
    "flag_value",
    "slot_save_path",
]

#: The llama-server flag naming the directory slots are saved to and restored from.
SLOT_SAVE_FLAG: Final = "--slot-save-path"
_NO_SLOTS_FLAG: Final = "--no-slots"


def flag_value(cmd: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``cmd`` (``FLAG VALUE`` or ``FLAG=VALUE``; the last wins)."""
    value: str | None = None
    for index, word in enumerate(cmd):
        if word == flag and index + 1 < len(cmd):
            value = cmd[index + 1]
        elif word.startswith(flag + "="):
            value = word[len(flag) + 1 :]
    return value


def slot_save_path(cmd: Sequence[str]) -> str | None:
    """The ``--slot-save-path`` directory of a llama-server command, or None."""
    path = flag_value(cmd, SLOT_SAVE_FLAG)
    return path if path and path.strip() else None


def check_keep_cache(model: ModelConfig, doc: Document) -> None:
    """``models.<id>.keepCache: true`` needs a ``cmd`` whose slots can be saved, and a
    health check (the slots are restored once the server answers it)."""
    path: KeyPath = ("models", model.id, "keepCache")
    cmd = model.cmd
    if slot_save_path(cmd) is None:
        raise doc.error(
            path,
            f"needs '{SLOT_SAVE_FLAG} DIR' in cmd: llama-server saves and restores "
            "slots only in that directory",
        )
    if _NO_SLOTS_FLAG in cmd:
        raise doc.error(
            path,
            f"cannot work with '{_NO_SLOTS_FLAG}' in cmd: trio-swap lists the slots "
            "to save with GET /slots",
        )
    if model.check_endpoint is None:
        raise doc.error(
            path,
            "needs a health check (checkEndpoint is none): the slots are restored "
            "once the server answers it",
        )


def check_cache_budget(value: int | str, doc: Document) -> int:
    """Top-level ``cacheDiskBudget``: a size (``20GiB``, bytes); 0 keeps no saved slot."""
    try:
        return parse_size(value)
    except SizeError as exc:
        raise doc.error(("cacheDiskBudget",), str(exc)) from None
