"""llama-server's slots, faked: the prompt each slot holds, and its save and restore.

A slot remembers the "tokens" (words, as everywhere in the responder) of the
last prompt run in it. A completion goes to the slot sharing the longest
prefix with its prompt, if that is at least a tenth of the prompt (else an
unused one, else the least recently used),
and reports that prefix as llama-server does: ``timings.cache_n`` reused,
``timings.prompt_n`` processed. So a conversation resent with one more
message reuses what its slot held, and a slot restored from a file after a
restart does the same: what trio-swap's ``keepCache`` relies on.

Routes, in llama-server's shapes (``tools/server``)::

    GET  /slots                          [{"id", "n_ctx", "is_processing", "id_task",
                                           "n_prompt_tokens"}]  (a never-used slot has
                                           no id_task and no n_prompt_tokens)
    POST /slots/{id}?action=save         {"filename"} -> {"n_saved", "n_written"}
    POST /slots/{id}?action=restore      {"filename"} -> {"n_restored", "n_read"}
    POST /slots/{id}?action=erase        -> {"n_erased"}

Without ``--slot-save-path`` the actions answer 501, as llama-server does. A
restore that fails answers 400 and leaves the slot empty, as llama-server
does. Faults for tests: ``--slot-save-delay`` (a hanging save),
``--slot-save-fails``, ``--slot-restore-delay``, ``--slot-restore-fails``,
``--slot-restore-noop`` (answers success, restores nothing: llama.cpp's
silent no-op).
"""

from __future__ import annotations

import itertools
import os
from typing import Final, final

import msgspec
import trio

from trio_swap.responder.payloads import JSONObject, error_body

__all__ = ["SlotFaults", "SlotTable", "prompt_tokens"]

_encode: Final = msgspec.json.Encoder().encode
_CONTEXT: Final = 4096
_FILE_KIND: Final = "responder-slot"
#: llama-server's --slot-prompt-similarity: a slot sharing less of the prompt is not its slot.
_SIMILARITY: Final = 0.1


class SlotFaults(msgspec.Struct, frozen=True, kw_only=True):
    """How the fake slot actions misbehave (all off by default)."""

    save_delay: float = 0.0
    save_fails: bool = False
    restore_delay: float = 0.0
    restore_fails: bool = False
    restore_noop: bool = False


class _SlotFile(msgspec.Struct):
    kind: str
    tokens: list[str]


_decode_file = msgspec.json.Decoder(_SlotFile).decode


def prompt_tokens(value: object) -> list[str]:
    """The words of a prompt or a messages list, each message opened by its role.

    A conversation resent with one more message starts with the same tokens,
    so its slot's prefix is reused (as with a chat template's rendering).
    """
    if isinstance(value, str):
        return value.split()
    if isinstance(value, list):
        return [token for item in value for token in prompt_tokens(item)]
    if isinstance(value, dict):
        role = value.get("role")
        head = [f"<{role}>"] if isinstance(role, str) else []
        return head + prompt_tokens(value.get("content")) + prompt_tokens(value.get("text"))
    return []


@final
class _Slot:
    __slots__ = ("id", "task", "tokens", "used_at")

    def __init__(self, slot_id: int) -> None:
        self.id = slot_id
        self.tokens: list[str] = []
        #: The last task run in it; None until the first (llama-server leaves it out then).
        self.task: int | None = None
        self.used_at = 0


@final
class SlotTable:
    """The responder's slots (``--parallel``); touched only from its trio run's tasks."""

    def __init__(self, count: int, save_path: str | None, faults: SlotFaults) -> None:
        self._slots = [_Slot(i) for i in range(max(1, count))]
        self._save_path = save_path
        self._faults = faults
        self._tasks = itertools.count()
        self._clock = itertools.count(1)

    def __repr__(self) -> str:
        held = [len(slot.tokens) for slot in self._slots]
        return f"<SlotTable {held} save_path={self._save_path}>"

    def assign(self, tokens: list[str]) -> int:
        """Run a prompt: pick its slot, keep the prompt there; returns cache_n (reused)."""
        best, reused = None, 0
        for slot in self._slots:
            shared = _common_prefix(slot.tokens, tokens)
            if shared > reused:
                best, reused = slot, shared
        if best is None or reused < _SIMILARITY * len(tokens):  # not this conversation
            best = min(self._slots, key=lambda s: (s.task is not None, s.used_at, s.id))
            reused = _common_prefix(best.tokens, tokens)
        if reused == len(tokens) and tokens:
            reused -= 1  # llama-server always evaluates the prompt's last token again
        best.tokens = list(tokens)
        best.task = next(self._tasks)
        best.used_at = next(self._clock)
        return reused

    def list_body(self) -> bytes:
        """``GET /slots``."""
        slots: list[JSONObject] = []
        for slot in self._slots:
            entry: JSONObject = {"id": slot.id, "n_ctx": _CONTEXT, "is_processing": False}
            if slot.task is not None:
                entry["id_task"] = slot.task
                entry["n_prompt_tokens"] = len(slot.tokens)
            slots.append(entry)
        return _encode(slots)

    async def action(self, slot_text: str, action: str | None, body: bytes) -> tuple[int, bytes]:
        """``POST /slots/{id}?action=...``: (status, JSON body)."""
        if self._save_path is None:
            message = "This server does not support slots action. Start it with `--slot-save-path`"
            return 501, error_body(message, type_="not_supported_error", code=501)
        slot = self._slot(slot_text)
        if slot is None:
            return 400, error_body("Invalid slot ID", code=400)
        if action == "erase":
            erased, slot.tokens = len(slot.tokens), []
            return 200, _encode({"id_slot": slot.id, "n_erased": erased})
        if action not in ("save", "restore"):
            return 400, error_body("Invalid action", code=400)
        filename = _filename(body)
        if filename is None:
            return 400, error_body("Invalid filename", code=400)
        path = os.path.join(self._save_path, filename)
        if action == "save":
            return await self._save(slot, filename, path)
        return await self._restore(slot, filename, path)

    async def _save(self, slot: _Slot, filename: str, path: str) -> tuple[int, bytes]:
        faults = self._faults
        if faults.save_delay > 0:
            await trio.sleep(faults.save_delay)
        if faults.save_fails:
            return 500, error_body("simulated save failure", type_="server_error", code=500)
        data = _encode(_SlotFile(kind=_FILE_KIND, tokens=slot.tokens))
        await trio.Path(path).write_bytes(data)
        answer = {"id_slot": slot.id, "filename": filename, "n_saved": len(slot.tokens)}
        return 200, _encode({**answer, "n_written": len(data), "timings": {"save_ms": 0.1}})

    async def _restore(self, slot: _Slot, filename: str, path: str) -> tuple[int, bytes]:
        faults = self._faults
        if faults.restore_delay > 0:
            await trio.sleep(faults.restore_delay)
        try:
            data = await trio.Path(path).read_bytes()
            saved = _decode_file(data)
        except (OSError, msgspec.DecodeError):
            saved = None
        if faults.restore_fails or saved is None or saved.kind != _FILE_KIND:
            slot.tokens = []  # as llama-server: a failed restore leaves the slot empty
            message = (
                "Unable to restore slot: No available space in KV cache or invalid slot save file"
            )
            return 400, error_body(message, code=400)
        if not faults.restore_noop:
            slot.tokens = list(saved.tokens)
            slot.task = next(self._tasks) if slot.task is None else slot.task
            slot.used_at = next(self._clock)
        answer = {"id_slot": slot.id, "filename": filename, "n_restored": len(saved.tokens)}
        return 200, _encode({**answer, "n_read": len(data), "timings": {"restore_ms": 0.1}})

    def _slot(self, text: str) -> _Slot | None:
        if not text.isdigit() or int(text) >= len(self._slots):
            return None
        return self._slots[int(text)]


def _filename(body: bytes) -> str | None:
    """The request's ``filename``, if llama-server would accept it (no path, no dot first)."""
    try:
        request = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return None
    name = request.get("filename") if isinstance(request, dict) else None
    if not isinstance(name, str) or not name or name.startswith(".") or "/" in name:
        return None
    if "\\" in name or "\0" in name or len(name) > 255:
        return None
    return name


def _common_prefix(held: list[str], prompt: list[str]) -> int:
    count = 0
    for a, b in zip(held, prompt, strict=False):
        if a != b:
            break
        count += 1
    return count
