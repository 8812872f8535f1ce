"""The ledger's file: measured peaks, out-of-memory floors and load times per command.

JSON, one object keyed by the command's fingerprint (so two configs, or two
trio-swap instances, that name different commands the same model id never
overwrite each other, and reverting a flag finds its old numbers). Saving
merges with what is on disk under an exclusive ``flock`` (another instance may
share the directory), keeps the :data:`MAX_ENTRIES` most recently updated,
and replaces the file atomically (a temporary file, fsync, rename, fsync of
the directory), so a crash never leaves half a file. A file that cannot be
read or parsed is logged and ignored: learning starts again, trio-swap still
starts.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import msgspec
import trio

from trio_swap.config.files import files_bytes, weight_files
from trio_swap.config.model import Config
from trio_swap.fit.ledger import FitLedger, Learned

__all__ = [
    "MAX_ENTRIES",
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
#: Commands the file remembers (a few hundred bytes each); the oldest go first.
MAX_ENTRIES: Final = 1000
#: Larger than any real ledger: refuse to read more.
_MAX_BYTES: Final = 16 << 20
_VERSION: Final = 2


class _StateFile(msgspec.Struct, kw_only=True):
    version: int = _VERSION
    entries: dict[str, Learned] = msgspec.field(default_factory=dict)


def estimates(config: Config) -> dict[str, int]:
    """Model id -> bytes of its weight files (named in ``cmd`` or ``files:``; a ``stat``
    each; 0 if none)."""
    return {model_id: files_bytes(weight_files(m)) for model_id, m in config.models.items()}


def default_state_dir() -> Path:
    """``$STATE_DIRECTORY`` (systemd's ``StateDirectory=``), else the XDG state home."""
    systemd = os.environ.get("STATE_DIRECTORY")
    if systemd:
        return Path(systemd.split(":")[0])
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg) if xdg else Path.home() / ".local" / "state"
    return base / "trio-swap"


def read_learned(path: Path) -> dict[str, Learned]:
    """What earlier runs learned, by fingerprint; ``{}`` when there is no usable file."""
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
        state = msgspec.json.decode(data, type=_StateFile)
    except msgspec.DecodeError as exc:
        log.warning("ignoring %s: not a trio-swap state file (%s)", path, exc)
        return {}
    if state.version != _VERSION:
        log.warning("ignoring %s: state file version %d (expected %d)", path, state.version, 2)
        return {}
    return {key: entry for key, entry in state.entries.items() if entry.fingerprint == key}


def encode_learned(learned: Mapping[str, Learned]) -> bytes:
    """The entries to save, as bytes (encode in the router's thread: the ledger changes there)."""
    return msgspec.json.encode(_StateFile(entries=dict(learned)))


def write_state(path: Path, data: bytes) -> None:
    """Merge ``data`` (from :func:`encode_learned`) into the file (blocking: run in a thread).

    An entry on disk that is newer than ours (another instance learned more
    since) is kept; everything else of ours wins.
    """
    ours = msgspec.json.decode(data, type=_StateFile).entries
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.with_name(path.name + ".lock")):
        merged = read_learned(path)
        for key, entry in ours.items():
            theirs = merged.get(key)
            if theirs is None or theirs.updated <= entry.updated:
                merged[key] = entry
        if len(merged) > MAX_ENTRIES:
            newest = sorted(merged.values(), key=lambda e: e.updated, reverse=True)
            merged = {e.fingerprint: e for e in newest[:MAX_ENTRIES]}
        text = msgspec.json.format(msgspec.json.encode(_StateFile(entries=merged)))
        descriptor, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(descriptor, "wb") as file:
                file.write(text)
                file.flush()
                os.fsync(file.fileno())
            os.replace(temporary, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
            raise
        _fsync_directory(path.parent)


@contextlib.contextmanager
def _locked(lock_path: Path) -> Iterator[None]:
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable (ext4 and xfs want the directory synced too)."""
    with contextlib.suppress(OSError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


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
