"""The ledger's file: measured peaks, out-of-memory floors and load times per model.

JSON, one object keyed by model id, written atomically (a temporary file in
the same directory, then a rename) so a crash never leaves half a file. A file
that cannot be read or parsed is logged and ignored: learning starts again,
trio-swap still starts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Final

import msgspec
import trio

from trio_swap.config.files import files_bytes, model_files
from trio_swap.config.model import Config
from trio_swap.fit.ledger import FitLedger, Learned

__all__ = [
    "STATE_FILE",
    "default_state_dir",
    "encode_learned",
    "estimates",
    "keep_saved",
    "read_learned",
    "write_state",
]

log = logging.getLogger("trio_swap.fit")

STATE_FILE: Final = "learned.json"
#: Larger than any real ledger (a few hundred bytes per model): refuse to read more.
_MAX_BYTES: Final = 16 << 20


class _StateFile(msgspec.Struct, kw_only=True):
    version: int = 1
    models: dict[str, Learned] = msgspec.field(default_factory=dict)


def estimates(config: Config) -> dict[str, int]:
    """Model id -> bytes of the weight files its ``cmd`` names (a ``stat`` each; 0 if none)."""
    return {model_id: files_bytes(model_files(m.cmd)) for model_id, m in config.models.items()}


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else the XDG state home."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "trio-swap"


def read_learned(path: Path) -> dict[str, Learned]:
    """What an earlier run learned; ``{}`` when there is no usable file (logged)."""
    try:
        with path.open("rb") as file:
            data = file.read(_MAX_BYTES + 1)
    except FileNotFoundError:
        return {}
    except OSError as exc:
        log.warning("cannot read %s (%s); learning model sizes afresh", path, exc.strerror)
        return {}
    try:
        if len(data) > _MAX_BYTES:
            raise msgspec.DecodeError("file too large")
        return msgspec.json.decode(data, type=_StateFile).models
    except msgspec.DecodeError as exc:
        log.warning("ignoring %s: not a trio-swap state file (%s)", path, exc)
        return {}


def encode_learned(learned: Mapping[str, Learned]) -> bytes:
    """The file's bytes (encode in the router's thread: the ledger changes there)."""
    return msgspec.json.format(msgspec.json.encode(_StateFile(models=dict(learned))))


def write_state(path: Path, data: bytes) -> None:
    """Replace the file atomically (blocking: run it in a thread)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with temporary.open("wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, path)


#: Seconds between saves while something new was learned.
SAVE_EVERY: Final = 10.0


async def keep_saved(ledger: FitLedger, path: Path, *, every: float = SAVE_EVERY) -> None:
    """Save the ledger whenever it learned something, and once more when cancelled."""
    try:
        while True:
            await trio.sleep(every)
            await _save(ledger, path)
    finally:
        with trio.CancelScope(shield=True):
            await _save(ledger, path)


async def _save(ledger: FitLedger, path: Path) -> None:
    if not ledger.dirty:
        return
    ledger.dirty = False
    data = encode_learned(ledger.learned())  # here: the ledger only changes in this thread
    try:
        await trio.to_thread.run_sync(write_state, path, data)
    except OSError as exc:
        ledger.dirty = True
        log.warning("cannot save what was learned to %s: %s", path, exc.strerror or exc)
