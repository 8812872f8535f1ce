"""llama-server's slot API, as trio-swap calls it to keep a model's KV cache across a swap.

Three calls (llama.cpp ``tools/server``; checked against a real server, see
docs/faster-swaps.md)::

    GET  /slots                               [{"id": 0, "is_processing": false,
                                                "n_prompt_tokens": 1421, ...}, ...]
    POST /slots/{id}?action=save    {"filename": F}  {"n_saved": 1421, "n_written": 750388}
    POST /slots/{id}?action=restore {"filename": F}  {"n_restored": 1421, "n_read": 750388}

The file lives in the server's ``--slot-save-path`` directory (a server
started without it answers 501; a name with a ``/`` is a 400). A restore that
fails answers 400 and leaves the slot empty.

Each call dials a fresh connection, sends ``Connection: close`` and hangs up,
as the readiness probe does (:mod:`.probe` says why): the save runs just
before the stop signal, and an idle keep-alive connection left open would hold
llama-server's exit by ~100 ms. :class:`SlotApi` is the seam: tests pass a
fake that answers on trio's virtual clock.
"""

from __future__ import annotations

import ssl
from typing import Final, Protocol, final

import h11
import msgspec
import trio

from trio_swap.config.address import Upstream

__all__ = ["HttpSlotApi", "Slot", "SlotApi", "SlotConnectionError", "SlotError", "SlotFile"]

_READ_SIZE: Final = 64 * 1024
#: A /slots answer bigger than this is not a slot list (each slot is ~2 KB of JSON).
_MAX_BODY: Final = 16 * 1024 * 1024
_ssl_context: ssl.SSLContext | None = None


class SlotError(Exception):
    """A slot call failed: refused, cut, timed out at the HTTP level, or answered an error.

    ``str()`` is one line for the log: the status and the server's own message.
    """


class SlotConnectionError(SlotError):
    """A slot call got no answer: refused, reset, or closed before the answer ended.

    Unlike an error answer, this can mean the server is gone: a restore that
    meets it has the server's health checked again before it is called ready.
    """


@final
class Slot(msgspec.Struct, frozen=True):
    """One slot of ``GET /slots``, reduced to what decides whether it is worth saving."""

    id: int
    #: Tokens the slot holds, where the server says (``n_prompt_tokens``); None: not said.
    tokens: int | None
    #: A request is running in it (a save would wait for that request to end).
    processing: bool
    #: Never given a task since the server started (``id_task`` -1, or left out
    #: while other slots have one).
    unused: bool

    @property
    def holds_prompt(self) -> bool:
        """Worth a save: not known to be empty. Versions that report no token count
        are saved, and a save that wrote 0 tokens is thrown away afterwards."""
        return not self.processing and not self.unused and self.tokens != 0


@final
class SlotFile(msgspec.Struct, frozen=True):
    """What a save or a restore moved: tokens and bytes, as the server counted them."""

    tokens: int
    bytes: int


class SlotApi(Protocol):
    """The slot calls :class:`~trio_swap.upstream.kvcache.ModelCache` makes.

    Each raises :class:`SlotError` when the call fails; none has a timeout of
    its own (the caller bounds them with a cancel scope).
    """

    async def slots(self, upstream: Upstream) -> list[Slot]: ...

    async def save(self, upstream: Upstream, slot: int, filename: str) -> SlotFile: ...

    async def restore(self, upstream: Upstream, slot: int, filename: str) -> SlotFile: ...


class _RawSlot(msgspec.Struct):
    id: int
    is_processing: bool = False
    id_task: int | None = None
    n_prompt_tokens: int | None = None
    n_past: int | None = None  # older llama.cpp versions


class _RawSaved(msgspec.Struct):
    n_saved: int = 0
    n_written: int = 0


class _RawRestored(msgspec.Struct):
    n_restored: int = 0
    n_read: int = 0


class _RawErrorObject(msgspec.Struct):
    message: str = ""


class _RawError(msgspec.Struct):
    error: _RawErrorObject | str | None = None


_decode_slots = msgspec.json.Decoder(list[_RawSlot]).decode
_decode_saved = msgspec.json.Decoder(_RawSaved).decode
_decode_restored = msgspec.json.Decoder(_RawRestored).decode
_decode_error = msgspec.json.Decoder(_RawError).decode
_encode = msgspec.json.Encoder().encode


@final
class HttpSlotApi:
    """The slot calls over HTTP/1.1, one fresh connection each.

    ``api_key``: sent as ``Authorization: Bearer`` (llama-server's ``--api-key``
    guards the slot routes too).
    """

    def __init__(self, api_key: str = "") -> None:
        self.api_key = api_key

    async def slots(self, upstream: Upstream) -> list[Slot]:
        body = await self._call(upstream, b"GET", b"/slots", None)
        try:
            raw = _decode_slots(body)
        except msgspec.DecodeError as exc:
            raise SlotError(f"GET /slots: not a list of slots ({exc})") from None
        # A version that numbers the tasks of used slots leaves the number out of
        # slots never used since the start; one that numbers none tells nothing.
        numbered = any(item.id_task is not None for item in raw)
        return [_slot(item, numbered) for item in raw]

    async def save(self, upstream: Upstream, slot: int, filename: str) -> SlotFile:
        body = await self._action(upstream, slot, "save", filename)
        try:
            saved = _decode_saved(body)
        except msgspec.DecodeError as exc:
            raise SlotError(f"save of slot {slot}: unreadable answer ({exc})") from None
        return SlotFile(tokens=saved.n_saved, bytes=saved.n_written)

    async def restore(self, upstream: Upstream, slot: int, filename: str) -> SlotFile:
        body = await self._action(upstream, slot, "restore", filename)
        try:
            restored = _decode_restored(body)
        except msgspec.DecodeError as exc:
            raise SlotError(f"restore of slot {slot}: unreadable answer ({exc})") from None
        return SlotFile(tokens=restored.n_restored, bytes=restored.n_read)

    async def _action(self, upstream: Upstream, slot: int, action: str, filename: str) -> bytes:
        target = f"/slots/{slot}?action={action}".encode()
        return await self._call(upstream, b"POST", target, _encode({"filename": filename}))

    async def _call(
        self, upstream: Upstream, method: bytes, path: bytes, body: bytes | None
    ) -> bytes:
        """One request; the body of a 200, else :class:`SlotError` with the server's words."""
        what = f"{method.decode()} {path.decode()}"
        try:
            status, answer = await self._exchange(upstream, method, path, body)
        except _Closed as exc:
            raise SlotConnectionError(f"{what}: {exc}") from None
        except (OSError, trio.BrokenResourceError, h11.ProtocolError) as exc:
            raise SlotConnectionError(f"{what}: {exc or type(exc).__name__}") from None
        if status != 200:
            raise SlotError(f"{what}: {status} {_error_message(answer)}".rstrip())
        return answer

    async def _exchange(
        self, upstream: Upstream, method: bytes, path: bytes, body: bytes | None
    ) -> tuple[int, bytes]:
        global _ssl_context
        stream: trio.abc.Stream = await trio.open_tcp_stream(upstream.host, upstream.port)
        async with stream:
            if upstream.tls:
                if _ssl_context is None:
                    _ssl_context = ssl.create_default_context()
                tls = trio.SSLStream(stream, _ssl_context, server_hostname=upstream.host)
                await tls.do_handshake()
                stream = tls
            headers = [(b"host", upstream.authority), (b"connection", b"close")]
            if self.api_key:
                headers.append((b"authorization", b"Bearer " + self.api_key.encode()))
            if body is not None:
                headers += [(b"content-type", b"application/json")]
                headers += [(b"content-length", str(len(body)).encode())]
            conn = h11.Connection(h11.CLIENT)
            request = h11.Request(method=method, target=upstream.target(path, b""), headers=headers)
            data = conn.send(request) or b""
            if body is not None:
                data += conn.send(h11.Data(data=body)) or b""
            await stream.send_all(data + (conn.send(h11.EndOfMessage()) or b""))
            return await _read_response(conn, stream)


class _Closed(Exception):
    """The server closed the connection before its answer ended (h11's words are
    about its own states: "can't handle event type ConnectionClosed ...")."""


async def _read_response(conn: h11.Connection, stream: trio.abc.Stream) -> tuple[int, bytes]:
    status = 0
    chunks: list[bytes] = []
    size = 0
    ended = False
    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError:
            if not ended:
                raise
            event = h11.ConnectionClosed()
        if event is h11.NEED_DATA:
            data = await stream.receive_some(_READ_SIZE)
            ended = not data
            conn.receive_data(bytes(data))  # b"" is the end of the stream
        elif isinstance(event, h11.Response):
            status = event.status_code
        elif isinstance(event, h11.Data):
            size += len(event.data)
            if size > _MAX_BODY:
                raise h11.RemoteProtocolError("answer too large")
            chunks.append(bytes(event.data))
        elif isinstance(event, h11.EndOfMessage):
            return status, b"".join(chunks)
        elif isinstance(event, h11.ConnectionClosed):
            when = "mid-answer" if status else "before answering"
            raise _Closed(f"the server closed the connection {when}")


def _slot(raw: _RawSlot, numbered: bool) -> Slot:
    tokens = raw.n_prompt_tokens if raw.n_prompt_tokens is not None else raw.n_past
    task = raw.id_task
    return Slot(
        id=raw.id,
        tokens=tokens,
        processing=raw.is_processing,
        unused=(task is None and numbered) or (task is not None and task < 0),
    )


def _error_message(body: bytes) -> str:
    """llama-server's ``{"error": {"message": ...}}``, else the start of the body."""
    try:
        error = _decode_error(body).error
    except msgspec.DecodeError:
        return body[:200].decode("utf-8", "replace").strip()
    if isinstance(error, _RawErrorObject):
        return error.message
    return error or body[:200].decode("utf-8", "replace").strip()
