"""Request captures (``captureBuffer``): what a recorded request sent and got back.

Every model-routed request that gets an activity row may keep a
:class:`Capture`: its method, path and query, the request's headers and body,
and the response's status, headers and body, as trio-swap saw them, with the
secret headers (:data:`SECRET_HEADERS`) replaced by :data:`REDACTED`. They
live in one :class:`CaptureStore`, a FIFO keyed by the activity row id that
never holds more than ``captureBuffer`` bytes, whatever the body sizes:

* Bytes are counted as they are copied, with a fixed cost per capture and per
  kept piece (:data:`CAPTURE_OVERHEAD`, :data:`PIECE_OVERHEAD`) for the Python
  objects around them, so the count follows the memory really held.
* A request in flight reserves each piece before keeping it
  (:meth:`CaptureStore._reserve`): the oldest finished captures are evicted to
  make room, and a piece that still does not fit is cut to what does; the rest
  of that body is then only counted, never kept, and the capture says
  ``*_body_truncated``. One body keeps at most half the buffer, so a huge
  request leaves room for its answer. So a 100 MB body keeps at most half the
  buffer's size of it, and the accounted total (finished captures plus
  reservations of requests in flight) never passes the limit.
* A body whose content type is not text (audio, images, multipart uploads,
  ``application/octet-stream``) or that is compressed (``Content-Encoding``)
  is not kept at all: only its size, and why (``*_body_omitted``). llama-swap
  also leaves out the big binary parts of its audio and image routes.

A body that is kept and fits is kept by reference: a chunk the client or the
upstream sent is the ``bytes`` object the request already holds, so the
common capture copies nothing. Everything runs on the trio thread: no locks.
"""

from __future__ import annotations

import base64
import time
from collections import OrderedDict
from collections.abc import Iterable
from typing import Final, final

from hypercorn.typing import HTTPScope

__all__ = [
    "CAPTURE_OVERHEAD",
    "HEADER_OVERHEAD",
    "PIECE_OVERHEAD",
    "REDACTED",
    "SECRET_HEADERS",
    "Capture",
    "CaptureDraft",
    "CaptureStore",
    "is_text",
]

#: What a secret header's value is shown as.
REDACTED: Final = "[REDACTED]"
#: Headers whose values are never kept (llama-swap's list).
SECRET_HEADERS: Final = frozenset(
    {b"authorization", b"proxy-authorization", b"cookie", b"set-cookie", b"x-api-key"}
)
#: Bytes counted for each capture's own objects (the capture, its dicts and strings).
CAPTURE_OVERHEAD: Final = 1024
#: Bytes counted for each kept body chunk beside its own bytes (a ``bytes`` object's
#: header and its list slot, rounded up for the allocator).
PIECE_OVERHEAD: Final = 64
#: Bytes counted for each kept header beside its name and value (a tuple of two ``str``).
HEADER_OVERHEAD: Final = 160

_TEXT_TYPES: Final = frozenset(
    {
        b"application/x-www-form-urlencoded",
        b"application/xml",
        b"application/javascript",
        b"application/yaml",
    }
)


def is_text(content_type: bytes) -> bool:
    """Whether a body of this ``Content-Type`` is kept (text, JSON, SSE; none given too)."""
    kind = content_type.split(b";", 1)[0].strip().lower()
    return (
        not kind
        or kind.startswith(b"text/")
        or kind.endswith(b"json")  # application/json, +json, x-ndjson
        or kind in _TEXT_TYPES
    )


@final
class Body:
    """One side's body: the pieces kept, the bytes seen, and why the rest is missing."""

    __slots__ = ("chunks", "cost", "omitted", "size", "truncated")

    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        #: Every byte of the body, kept or not.
        self.size = 0
        #: Bytes counted for the kept pieces.
        self.cost = 0
        #: The buffer ran out: only the first bytes are kept.
        self.truncated = False
        #: Why nothing is kept (``binary``, ``encoded``); None: kept.
        self.omitted: str | None = None

    def data(self) -> bytes:
        return b"".join(self.chunks)


@final
class Capture:
    """One request and its response, as kept (read it through :meth:`to_json`)."""

    __slots__ = (
        "cost",
        "id",
        "method",
        "path",
        "query",
        "req_body",
        "req_headers",
        "resp_body",
        "resp_headers",
        "status",
        "time",
    )

    def __init__(self, method: str, path: str, query: str) -> None:
        self.id = 0
        self.time = time.time()
        self.method = method
        self.path = path
        self.query = query
        self.req_headers: list[tuple[str, str]] = []
        self.req_body = Body()
        #: None: no response was sent (the client left first).
        self.status: int | None = None
        self.resp_headers: list[tuple[str, str]] = []
        self.resp_body = Body()
        #: Bytes counted against the buffer for this capture.
        self.cost = 0

    def to_json(self) -> dict[str, object]:
        """llama-swap's shape (``req_path``, ``req_headers``, ``req_body`` in base64,
        ``resp_headers``, ``resp_body``) and trio-swap's extra fields."""
        return {
            "id": self.id,
            "time": self.time,
            "method": self.method,
            "req_path": self.path,
            "req_query": self.query,
            "req_headers": _header_map(self.req_headers),
            "req_body": base64.b64encode(self.req_body.data()).decode(),
            **_body_fields("req", self.req_body),
            "resp_status": self.status,
            "resp_headers": _header_map(self.resp_headers),
            "resp_body": base64.b64encode(self.resp_body.data()).decode(),
            **_body_fields("resp", self.resp_body),
            "bytes": self.cost,
        }


def _header_map(headers: list[tuple[str, str]]) -> dict[str, str]:
    """Name -> value; a repeated header's values joined with ``, `` (RFC 9110 §5.3)."""
    joined: dict[str, str] = {}
    for name, value in headers:
        joined[name] = f"{joined[name]}, {value}" if name in joined else value
    return joined


def _body_fields(side: str, body: Body) -> dict[str, object]:
    return {
        f"{side}_body_size": body.size,
        f"{side}_body_kept": sum(len(chunk) for chunk in body.chunks),
        f"{side}_body_truncated": body.truncated,
        f"{side}_body_omitted": body.omitted,
    }


@final
class CaptureStore:
    """The bounded FIFO of finished captures, and the byte count of those in progress.

    ``limit`` 0 turns capturing off (:meth:`begin` returns None).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        #: Bytes counted now: finished captures plus what requests in flight reserved.
        self.used = 0
        #: The most :attr:`used` ever was (it never passes :attr:`limit`).
        self.peak = 0
        #: Captures evicted to make room, since the start.
        self.evicted = 0
        self._done: OrderedDict[int, Capture] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def __contains__(self, capture_id: object) -> bool:
        return capture_id in self._done

    def __len__(self) -> int:
        return len(self._done)

    def get(self, capture_id: int) -> Capture | None:
        return self._done.get(capture_id)

    def stats(self) -> dict[str, object]:
        """``GET /api/captures``: the buffer's size and what it holds."""
        return {
            "enabled": self.enabled,
            "limit_bytes": self.limit,
            "used_bytes": self.used,
            "peak_bytes": self.peak,
            "count": len(self._done),
            "evicted": self.evicted,
            "oldest_id": next(iter(self._done), None),
            "newest_id": next(reversed(self._done), None),
        }

    def resize(self, limit: int) -> None:
        """A reload's ``captureBuffer``: evict the oldest until the rest fits (0: all).

        Requests in flight keep what they already kept and reserve no more
        past the new limit; their capture is dropped when they finish if it
        does not fit then.
        """
        self.limit = limit
        self._evict_until(limit)

    def begin(self, scope: HTTPScope) -> CaptureDraft | None:
        """Start capturing a request (its line and headers); None when off or full."""
        if self.limit <= 0:
            return None
        capture = Capture(scope["method"], scope["path"], scope["query_string"].decode("latin-1"))
        headers = _redacted(scope["headers"])
        cost = CAPTURE_OVERHEAD + len(capture.path) + len(capture.query) + _headers_cost(headers)
        granted = self._reserve(cost)
        if granted < cost:
            self._release(granted)
            return None
        capture.req_headers = headers
        capture.cost = cost
        return CaptureDraft(self, capture)

    # -- accounting (for CaptureDraft) -------------------------------------------------

    def _reserve(self, size: int) -> int:
        """Count up to ``size`` more bytes (evicting the oldest to make room); how many."""
        if self.used + size > self.limit:
            self._evict_until(self.limit - size)
        granted = max(0, min(size, self.limit - self.used))
        self.used += granted
        self.peak = max(self.peak, self.used)
        return granted

    def _release(self, size: int) -> None:
        self.used -= size

    def _evict_until(self, target: int) -> None:
        done = self._done
        while done and self.used > target:
            _, oldest = done.popitem(last=False)
            self.used -= oldest.cost
            self.evicted += 1

    def _finish(self, capture: Capture, capture_id: int) -> None:
        if self.used > self.limit:  # shrunk by a reload meanwhile
            self._evict_until(self.limit)
            if self.used > self.limit:
                self.used -= capture.cost
                return
        capture.id = capture_id
        self._done[capture_id] = capture


@final
class CaptureDraft:
    """A capture in progress: fed by the request's record, finished with the row id."""

    __slots__ = ("_capture", "_open", "_store")

    def __init__(self, store: CaptureStore, capture: Capture) -> None:
        self._store = store
        self._capture = capture
        self._open = True

    def request_body(self, body: bytes, content_type: bytes) -> None:
        """The whole request body (read before the request is routed)."""
        side = self._capture.req_body
        if not is_text(content_type):
            side.omitted = "binary"
        self._keep(side, body)

    def response_start(self, status: int, headers: Iterable[tuple[bytes, bytes]]) -> None:
        capture = self._capture
        capture.status = status
        kept = _redacted(headers)
        cost = _headers_cost(kept)
        granted = self._store._reserve(cost)
        if granted < cost:  # no room even for the headers: keep none of the response
            self._store._release(granted)
            capture.resp_body.truncated = True
            return
        capture.cost += cost
        capture.resp_headers = kept
        for name, value in kept:
            if name == "content-type" and not is_text(value.encode("latin-1")):
                capture.resp_body.omitted = "binary"
            elif name == "content-encoding" and value.lower() not in ("", "identity"):
                capture.resp_body.omitted = "encoded"

    def response_body(self, chunk: bytes) -> None:
        self._keep(self._capture.resp_body, chunk)

    def _keep(self, side: Body, chunk: bytes) -> None:
        size = len(chunk)
        side.size += size
        if not size or side.truncated or side.omitted is not None or not self._open:
            return
        want = size + PIECE_OVERHEAD
        # One body takes at most half the buffer: a huge request leaves room for its answer.
        granted = self._store._reserve(min(want, self._store.limit // 2 - side.cost))
        if granted < want:
            side.truncated = True
            if granted <= PIECE_OVERHEAD:  # not even a byte of it fits
                self._store._release(granted)
                return
            chunk = chunk[: granted - PIECE_OVERHEAD]  # a copy of what fits, no more
        elif not isinstance(chunk, bytes):
            chunk = bytes(chunk)
        side.chunks.append(chunk)
        side.cost += granted
        self._capture.cost += granted

    def finish(self, capture_id: int) -> None:
        """The request's activity row is ``capture_id``: the capture joins the FIFO."""
        if self._open:
            self._open = False
            self._store._finish(self._capture, capture_id)

    def discard(self) -> None:
        """No row (or the accounting failed): give the reserved bytes back."""
        if self._open:
            self._open = False
            self._store._release(self._capture.cost)


def _redacted(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [
        (
            name.decode("latin-1").lower(),
            REDACTED if name.lower() in SECRET_HEADERS else value.decode("latin-1"),
        )
        for name, value in headers
    ]


def _headers_cost(headers: list[tuple[str, str]]) -> int:
    return sum(len(name) + len(value) + HEADER_OVERHEAD for name, value in headers)
