"""A tiny HTTP/1.1 keep-alive load generator on plain sockets.

Why not httpx or aiohttp: the client shares two cores with trio-swap and the
responder, so every microsecond it spends per request is taken from the
servers it measures, and an event loop of its own would add jitter to the
latency figures. Requests are pre-built bytes; responses are parsed only as
far as framing needs (status, ``Content-Length`` or chunked encoding), and SSE
events are counted by scanning the payload for ``data:``, never decoded.

Two drivers share one parser (:class:`ResponseReader`):

* :class:`Connection`, blocking, one request at a time: latency samples, one
  bulk stream, health polling.
* :func:`closed_loop` and :func:`run_streams`, one ``epoll`` loop over many
  non-blocking sockets: throughput at N connections and N concurrent streams.
"""

from __future__ import annotations

import selectors
import socket
import time
from dataclasses import dataclass, field
from typing import Final, final

__all__ = [
    "Connection",
    "LoadResult",
    "ResponseReader",
    "StreamResult",
    "chat_request",
    "closed_loop",
    "get_request",
    "run_streams",
]

_RECV_SIZE: Final = 256 * 1024
#: A benchmark socket silent this long means the server under test hung.
_STALL_TIMEOUT: Final = 30.0
_EVENT_MARK: Final = b"data:"
_CARRY: Final = len(_EVENT_MARK) - 1  # a mark split across two pieces is still found

# Parser states.
_HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILER, _DONE = range(7)


def chat_request(port: int, *, model: str, max_tokens: int, stream: bool = False) -> bytes:
    """A complete ``POST /v1/chat/completions`` request, ready for ``sendall``."""
    body = (
        b'{"model":"%s","messages":[{"role":"user","content":"hello"}],"max_tokens":%d,"stream":%s}'
    ) % (model.encode(), max_tokens, b"true" if stream else b"false")
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n"
        b"Host: 127.0.0.1:%d\r\n"
        b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n"
        b"\r\n%s"
    ) % (port, len(body), body)


def get_request(port: int, path: str) -> bytes:
    """A ``GET`` request with no body."""
    return b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (path.encode(), port)


@final
class ResponseReader:
    """Incremental parser for one HTTP/1.1 response; :meth:`reset` reuses it.

    Only framing is parsed. ``events`` counts ``data:`` marks in the decoded
    payload (chunk framing removed, so a mark split by a chunk boundary still
    counts once) when ``count_events`` is set; otherwise the payload is only
    measured, which keeps the small-request path cheap.
    """

    __slots__ = (
        "_buf",
        "_carry",
        "_remaining",
        "_state",
        "body_bytes",
        "closing",
        "count_events",
        "events",
        "first_event_at",
        "status",
    )

    def __init__(self, *, count_events: bool = False) -> None:
        self.count_events = count_events
        self._buf = bytearray()
        self.reset()

    def reset(self) -> None:
        """Prepare for the next response on the same connection."""
        self._state = _HEAD
        self._remaining = 0
        self._carry = b""
        self.status = 0
        #: The server said ``Connection: close`` (hypercorn does after
        #: ``keep_alive_max_requests``): reconnect before the next request.
        self.closing = False
        self.body_bytes = 0
        self.events = 0
        #: ``time.perf_counter()`` when the first ``data:`` mark arrived (streams only).
        self.first_event_at: float | None = None

    @property
    def done(self) -> bool:
        return self._state == _DONE

    def feed(self, data: bytes) -> bool:
        """Consume ``data``; True once the response is complete.

        Raises:
            ValueError: the response is not framed by Content-Length or chunks.
        """
        buf = self._buf
        buf += data
        while True:
            state = self._state
            if state in (_BODY, _CHUNK_DATA):
                take = min(self._remaining, len(buf))
                if take:
                    self._payload(bytes(buf[:take]))
                    del buf[:take]  # O(1): bytearray trims its head in place
                    self._remaining -= take
                if self._remaining:
                    return False
                self._state = _DONE if state == _BODY else _CHUNK_END
            elif state == _CHUNK_SIZE:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                size = int(bytes(buf[:end]).split(b";", 1)[0], 16)
                del buf[: end + 2]
                self._remaining = size
                self._state = _CHUNK_DATA if size else _TRAILER
            elif state == _CHUNK_END:
                if len(buf) < 2:
                    return False
                del buf[:2]
                self._state = _CHUNK_SIZE
            elif state == _HEAD:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return False
                self._head(bytes(buf[:end]).lower())
                del buf[: end + 4]
            elif state == _TRAILER:
                end = buf.find(b"\r\n")
                if end < 0:
                    return False
                del buf[: end + 2]
                if end == 0:
                    self._state = _DONE
            else:
                return True

    def _head(self, head: bytes) -> None:
        self.status = int(head[9:12])
        self.closing = b"\r\nconnection: close" in head
        if b"\r\ntransfer-encoding: chunked" in head:
            self._state = _CHUNK_SIZE
            return
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            end = head.find(b"\r\n", at + 2)
            self._remaining = int(head[at + 17 : end if end >= 0 else None])
            self._state = _BODY if self._remaining else _DONE
        elif self.status in (204, 304) or 100 <= self.status < 200:
            self._state = _DONE
        else:
            raise ValueError("response has neither Content-Length nor chunked encoding")

    def _payload(self, piece: bytes) -> None:
        self.body_bytes += len(piece)
        if self.count_events:
            window = self._carry + piece
            found = window.count(_EVENT_MARK)
            if found and self.first_event_at is None:
                self.first_event_at = time.perf_counter()
            self.events += found
            self._carry = window[-_CARRY:]


@final
class Connection:
    """One blocking keep-alive connection; use as a context manager."""

    def __init__(self, port: int, *, timeout: float = 30.0) -> None:
        self.port = port
        self.timeout = timeout
        #: How often the server closed the connection and we had to reconnect.
        self.reconnects = 0
        self.sock = _connect(port, timeout)

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self.sock.close()

    def exchange(self, request: bytes, reader: ResponseReader) -> ResponseReader:
        """Send ``request`` and read its whole response into ``reader`` (reset first).

        Raises:
            ConnectionError: the server closed the connection mid-response.
        """
        reader.reset()
        self.sock.sendall(request)
        recv = self.sock.recv
        while True:
            data = recv(_RECV_SIZE)
            if not data:
                raise ConnectionError("server closed the connection mid-response")
            if reader.feed(data):
                if reader.closing:  # the next request pays for the new connection, as in life
                    self.sock.close()
                    self.sock = _connect(self.port, self.timeout)
                    self.reconnects += 1
                return reader


def _connect(port: int, timeout: float | None) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


@dataclass
class LoadResult:
    """What :func:`closed_loop` measured."""

    completed: int
    errors: dict[int, int]  # non-200 status -> count; not in ``completed``
    elapsed: float
    client_cpu: float  # seconds of CPU this process spent, to show the client is not the limit
    reconnects: int = 0  # connections the server closed (``Connection: close``)

    @property
    def rate(self) -> float:
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0


def closed_loop(port: int, request: bytes, *, connections: int, duration: float) -> LoadResult:
    """Keep ``connections`` requests in flight for ``duration`` seconds.

    Each connection sends its next request as soon as the previous response is
    complete (a closed loop, as ``wrk`` does). Responses completed after the
    deadline are drained but not counted. A ``Connection: close`` from the
    server costs a reconnect inside the measured time, as it would a client.
    """
    selector = selectors.DefaultSelector()
    readers: dict[socket.socket, ResponseReader] = {}
    completed = reconnects = 0
    errors: dict[int, int] = {}
    cpu_start = time.process_time()

    def start_one(sock: socket.socket, reader: ResponseReader) -> None:
        sock.sendall(request)  # small; fits the empty send buffer
        sock.setblocking(False)
        selector.register(sock, selectors.EVENT_READ)
        readers[sock] = reader

    try:
        socks = [_connect(port, None) for _ in range(connections)]
        start = time.perf_counter()
        deadline = start + duration
        for sock in socks:
            start_one(sock, ResponseReader())
        in_flight = connections
        while in_flight:
            ready = selector.select(timeout=_STALL_TIMEOUT)
            if not ready:
                raise TimeoutError(f"no response for {_STALL_TIMEOUT:g}s at port {port}")
            for key, _ in ready:
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                data = conn.recv(_RECV_SIZE)
                if not data:
                    raise ConnectionError("server closed a benchmark connection")
                reader = readers[conn]
                if not reader.feed(data):
                    continue
                if time.perf_counter() >= deadline:
                    in_flight -= 1
                    selector.unregister(conn)
                    continue
                if reader.status == 200:
                    completed += 1
                else:
                    errors[reader.status] = errors.get(reader.status, 0) + 1
                closing = reader.closing
                reader.reset()
                if closing:
                    selector.unregister(conn)
                    del readers[conn]
                    conn.close()
                    reconnects += 1
                    start_one(_connect(port, None), reader)
                else:
                    conn.send(request)
        elapsed = min(time.perf_counter(), deadline) - start
    finally:
        selector.close()
        for sock in readers:
            sock.close()
    return LoadResult(completed, errors, elapsed, time.process_time() - cpu_start, reconnects)


@dataclass
class StreamResult:
    """What :func:`run_streams` measured, one entry per stream."""

    events: list[int] = field(default_factory=list)
    first_event: list[float] = field(default_factory=list)  # seconds after start
    finished: list[float] = field(default_factory=list)  # seconds after start
    statuses: list[int] = field(default_factory=list)

    @property
    def total_events(self) -> int:
        return sum(self.events)

    @property
    def wall(self) -> float:
        return max(self.finished) if self.finished else 0.0


def run_streams(port: int, request: bytes, *, streams: int) -> StreamResult:
    """Open ``streams`` connections, send ``request`` on each at once, read all to the end."""
    selector = selectors.DefaultSelector()
    readers: dict[socket.socket, ResponseReader] = {}
    result = StreamResult()
    try:
        for _ in range(streams):
            readers[_connect(port, None)] = ResponseReader(count_events=True)
        start = time.perf_counter()
        for sock in readers:
            sock.sendall(request)
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ)
        open_streams = streams
        while open_streams:
            ready = selector.select(timeout=_STALL_TIMEOUT)
            if not ready:
                raise TimeoutError(f"streams stalled for {_STALL_TIMEOUT:g}s at port {port}")
            for key, _ in ready:
                conn = key.fileobj
                assert isinstance(conn, socket.socket)
                data = conn.recv(_RECV_SIZE)
                if not data:
                    raise ConnectionError("server closed a stream before its end")
                reader = readers[conn]
                if reader.feed(data):
                    open_streams -= 1
                    selector.unregister(conn)
                    result.finished.append(time.perf_counter() - start)
                    result.events.append(reader.events)
                    result.statuses.append(reader.status)
                    first = reader.first_event_at
                    result.first_event.append(first - start if first is not None else 0.0)
    finally:
        selector.close()
        for sock in readers:
            sock.close()
    return result
