"""The hot-path HTTP/1.1 client from trio-swap to its model servers, on h11 + trio sockets.

Why not httpx here: profiling put a third of trio-swap's per-request CPU in
httpx (URL and header models, a connection pool that polls every idle
connection on each request, a cookie jar that would carry one client's
upstream cookies into another client's requests). Model servers are a handful
of known ``host:port`` pairs on loopback speaking HTTP/1.1, so a keep-alive
stack per upstream, the h11 protocol engine, and one ``send_all`` per request
(head and body together) is all this path needs. (The readiness probes use h11
too, on a fresh connection each: ``upstream/probe.py``.)

Errors: anything that breaks before the response head arrives is raised as
:class:`UpstreamFailed`. A request whose *write* fails on a reused connection
is retried once on a fresh connection: the server never got it. One that was
written is never sent twice (a generation is not idempotent), which is why
the pool takes such care never to hand out a connection the server may close.

Pool hygiene (docs/faster-swaps.md): a request is never sent on a connection
that a stopped or restarted process owned, nor on one its server is about to
close for idleness.

- :meth:`UpstreamClient.retire` runs when a model's process starts, is told to
  stop, crashes or ends (:class:`ConnectionRetirer`, a process hook): idle
  connections to its address are closed at once, before the stop signal is
  sent (an idle keep-alive connection holds llama-server's exit ~100 ms), and
  connections in use are closed when their response ends instead of pooled.
- An idle connection expires a second before the server's own keep-alive
  timeout, learned from its ``Keep-Alive: timeout=N`` header (llama-server: 5
  s), or after :data:`DEFAULT_IDLE_EXPIRY` when it sends none (uvicorn's
  default is 5 s too). A server that ends a connection after ``max=N``
  requests says ``Connection: close`` on the last one, which h11 honours.
- A connection that carried an event stream (SSE) is closed afterwards, never
  pooled: llama-server closes it itself, unannounced (:meth:`UpstreamResponse._streamed`).
  :meth:`UpstreamClient.run`
  closes expired and half-closed idle connections every second, so none
  lingers in CLOSE-WAIT.

A model's ``timeouts:`` (llama-swap's Go transport knobs; passed per request)
bound the TCP connect (``connect``) and the TLS handshake (``tlsHandshake``)
separately, set TCP keep-alive probes (``keepalive``), cap how long an idle
connection is kept (``idleConn``) and, when ``responseHeader`` is set, turn a
response head that does not arrive in time into a 504 (:class:`UpstreamTimeout`).
"""

from __future__ import annotations

import math
import re
import select
import socket
import ssl
from collections import defaultdict
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Final, final

import h11
import trio

from trio_swap.config.address import Upstream
from trio_swap.config.model import UpstreamTimeouts
from trio_swap.errors import UpstreamFailed
from trio_swap.observe.hooks import ProcessHooks
from trio_swap.reasons import StopReason

__all__ = [
    "DEFAULT_IDLE_EXPIRY",
    "ConnectionRetirer",
    "Upstream",
    "UpstreamClient",
    "UpstreamResponse",
    "UpstreamTimeout",
]

_READ_SIZE: Final = 256 * 1024
#: Bodies up to this size are copied into the head's buffer (one ``send_all``);
#: larger ones (uploads) are written from the caller's buffer as they are.
_COALESCE_LIMIT: Final = 64 * 1024
#: Idle keep-alive connections kept per upstream; more are closed after use.
_MAX_IDLE_PER_UPSTREAM: Final = 128
#: An idle connection older than this is closed instead of reused, unless the
#: server said how long it keeps one (``Keep-Alive: timeout=N``).
DEFAULT_IDLE_EXPIRY: Final = 4.0
#: Closed this long before the server's announced keep-alive timeout.
_EXPIRY_MARGIN: Final = 1.0
#: How often :meth:`UpstreamClient.run` sweeps the idle connections.
SWEEP_INTERVAL: Final = 1.0
_KEEP_ALIVE_TIMEOUT = re.compile(rb"timeout\s*=\s*(\d{1,9})", re.IGNORECASE)

_Address = tuple[str, int]


class UpstreamTimeout(UpstreamFailed):
    """504: the upstream sent no response head within the model's ``timeouts.responseHeader``."""

    status = 504
    code = "gateway_timeout"


@final
class _Connection:
    __slots__ = ("expiry", "generation", "h11", "idle_cap", "idle_since", "reused", "stream")

    def __init__(
        self, stream: trio.abc.Stream, generation: int, idle_cap: float = math.inf
    ) -> None:
        self.stream = stream
        self.h11 = h11.Connection(h11.CLIENT)
        self.idle_since = 0.0
        self.reused = False
        #: The process generation of its address when it was opened (see ``retire``).
        self.generation = generation
        #: The longest it may stay idle whatever the server says (``timeouts.idleConn``).
        self.idle_cap = idle_cap
        #: Seconds it may stay idle (learned from the server's Keep-Alive header).
        self.expiry = min(DEFAULT_IDLE_EXPIRY, idle_cap)

    def learn(self, headers: Sequence[tuple[bytes, bytes]]) -> None:
        """Read the server's ``Keep-Alive`` header after a response."""
        for name, value in headers:
            if name.lower() != b"keep-alive":
                continue
            found = _KEEP_ALIVE_TIMEOUT.search(value)
            if found is not None:
                self.expiry = min(max(0.0, int(found[1]) - _EXPIRY_MARGIN), self.idle_cap)


@final
class UpstreamResponse:
    """Status and headers of an upstream answer; the body is read with :meth:`iter_raw`.

    Always :meth:`aclose` it: a fully read body returns the connection to the pool.
    """

    def __init__(
        self,
        client: UpstreamClient,
        upstream: Upstream,
        connection: _Connection,
        head: h11.Response,
        model: str,
    ) -> None:
        self._client = client
        self._model = model
        self._upstream = upstream
        self._connection: _Connection | None = connection
        self.status = head.status_code
        self.headers: list[tuple[bytes, bytes]] = list(head.headers)
        self._complete = False

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None

    async def iter_raw(self) -> AsyncIterator[bytes]:
        """Body bytes as they arrive: everything one socket read produced goes out as one piece.

        Raises:
            UpstreamFailed: the connection broke before the body was complete.
        """
        connection = self._connection
        assert connection is not None, "response already closed"
        conn = connection.h11
        while True:
            pieces: list[bytes] = []
            while True:
                try:
                    event = conn.next_event()
                except h11.RemoteProtocolError as exc:
                    raise UpstreamFailed(self._model, f"protocol error: {exc}") from exc
                if isinstance(event, h11.Data):
                    pieces.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    self._complete = True
                    if pieces:
                        yield b"".join(pieces)
                    return
                elif event is h11.NEED_DATA:
                    break
                elif isinstance(event, h11.ConnectionClosed):
                    raise UpstreamFailed(self._model, "connection closed mid-body")
            if pieces:
                yield b"".join(pieces)
            try:
                data = await connection.stream.receive_some(_READ_SIZE)
            except (trio.BrokenResourceError, OSError) as exc:
                raise UpstreamFailed(self._model, f"connection broke: {exc}") from exc
            conn.receive_data(bytes(data))

    def _streamed(self) -> bool:
        """An event stream: its connection is not reused.

        llama-server closes the connection after every streamed response without
        saying so (no ``Connection: close``; measured: the next request on it
        gets EOF), so a pooled one fails the next request that takes it before
        the FIN arrives (a 502). A stream lasts far longer than a loopback
        connect, so a fresh connection costs nothing anyone can see.
        """
        content_type = self.header(b"content-type") or b""
        return content_type.lower().startswith(b"text/event-stream")

    async def aclose(self) -> None:
        connection, self._connection = self._connection, None
        if connection is None:
            return
        if (
            self._complete
            and connection.h11.our_state is h11.DONE
            and connection.h11.their_state is h11.DONE
            and not self._streamed()
        ):
            connection.learn(self.headers)
            connection.h11.start_next_cycle()
            await self._client._release(self._upstream, connection)
        else:
            await self._client._discard(connection)


@final
class UpstreamClient:
    """Keep-alive HTTP/1.1 connections to model servers, one idle stack per upstream."""

    def __init__(self, *, connect_timeout: float = 30.0) -> None:
        self._connect_timeout = connect_timeout
        self._idle: defaultdict[_Address, list[_Connection]] = defaultdict(list)
        #: Bumped by :meth:`retire`: connections of an older generation are never reused.
        self._generation: defaultdict[_Address, int] = defaultdict(int)
        self._ssl: ssl.SSLContext | None = None
        self._closed = False

    def retire(self, upstream: Upstream) -> None:
        """The process behind ``upstream`` is going (or a new one is starting there).

        Closes every idle connection to it now, synchronously (so the server sees
        them gone before any stop signal that follows), and makes connections in
        use close when their response ends. Never blocks.
        """
        address = (upstream.host, upstream.port)
        self._generation[address] += 1
        idle = self._idle.pop(address, [])
        for connection in idle:
            _close_now(connection)
        idle.clear()  # in place: nobody may pop a closed connection from this list

    def idle_connections(self, upstream: Upstream) -> int:
        """Idle pooled connections to ``upstream`` (for tests and the bench)."""
        return len(self._idle.get((upstream.host, upstream.port), ()))

    async def run(self, *, interval: float = SWEEP_INTERVAL) -> None:
        """Close expired and half-closed idle connections every ``interval`` seconds."""
        while True:
            await trio.sleep(interval)
            self.sweep()

    def sweep(self) -> None:
        """Close expired and half-closed idle connections (synchronously: no checkpoint)."""
        now = trio.current_time()
        for address, idle in list(self._idle.items()):
            keep = [c for c in idle if _reusable(c, now)]
            for connection in idle:
                if connection not in keep:
                    _close_now(connection)
            idle[:] = keep  # in place: the one list per address stays the one list
            if not idle:
                del self._idle[address]

    async def send(
        self,
        upstream: Upstream,
        *,
        method: bytes,
        target: bytes,
        headers: Sequence[tuple[bytes, bytes]],
        body: bytes | Sequence[bytes | memoryview],
        model: str,
        timeouts: UpstreamTimeouts | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the response head is in.

        ``timeouts``: the model's ``timeouts:``; None: only the client's connect timeout.

        Raises:
            UpstreamFailed: could not connect, or no response head arrived.
            UpstreamTimeout: no response head within ``timeouts.response_header``.
        """
        request = h11.Request(
            method=method,
            target=target,
            headers=[
                (b"host", upstream.authority),
                *headers,
                (b"content-length", b"%d" % _length(body)),
            ],
        )
        for attempt in (1, 2):
            # A retry always dials: the idle connections were opened to the same
            # server as the one that just failed, and are most likely dead too.
            connection = await self._checkout(
                upstream, model, reuse=attempt == 1, timeouts=timeouts
            )
            try:
                await self._write(connection, request, body)
            except (trio.BrokenResourceError, OSError, h11.ProtocolError) as exc:
                await self._discard(connection)
                if connection.reused and attempt == 1:
                    # The write itself failed: the server never got this request.
                    await self._flush(upstream)
                    continue
                raise UpstreamFailed(model, _describe(exc)) from exc
            except BaseException:
                await self._discard(connection)
                raise
            wait = timeouts.response_header if timeouts is not None else 0.0
            try:
                if wait > 0:
                    with trio.fail_after(wait):
                        head = await self._read_head(connection)
                else:
                    head = await self._read_head(connection)
            except trio.TooSlowError as exc:
                await self._discard(connection)
                raise UpstreamTimeout(
                    model, f"no response headers within {wait:g}s (timeouts.responseHeader)"
                ) from exc
            except (trio.BrokenResourceError, OSError, h11.ProtocolError, _EarlyClose) as exc:
                # The request went out: the server may be working on it. Never send
                # it twice (a generation is not idempotent); report the failure.
                await self._discard(connection)
                raise UpstreamFailed(model, _describe(exc)) from exc
            except BaseException:
                await self._discard(connection)
                raise
            return UpstreamResponse(self, upstream, connection, head, model)
        raise AssertionError("unreachable")

    async def _write(
        self,
        connection: _Connection,
        request: h11.Request,
        body: bytes | Sequence[bytes | memoryview],
    ) -> None:
        """Head and a small body in one ``send_all``; a large or sliced body after it, uncopied."""
        conn = connection.h11
        data = conn.send(request) or b""
        if isinstance(body, bytes) and len(body) <= _COALESCE_LIMIT:
            if body:
                data += conn.send(h11.Data(data=body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
            await connection.stream.send_all(data)
            return
        await connection.stream.send_all(data)
        for piece in [body] if isinstance(body, bytes) else body:
            # h11 passes any bytes-like object through untouched; its stubs say bytes.
            data_event = h11.Data(data=piece)  # type: ignore[arg-type]
            for part in conn.send_with_data_passthrough(data_event) or ():
                await connection.stream.send_all(part)
        await connection.stream.send_all(conn.send(h11.EndOfMessage()) or b"")

    async def _read_head(self, connection: _Connection) -> h11.Response:
        conn = connection.h11
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                chunk = await connection.stream.receive_some(_READ_SIZE)
                if not chunk:
                    raise _EarlyClose("the upstream closed the connection without answering")
                conn.receive_data(bytes(chunk))
                continue
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                return event
            raise _EarlyClose(f"unexpected {type(event).__name__} before the response")

    async def _flush(self, upstream: Upstream) -> None:
        idle = self._idle.pop((upstream.host, upstream.port), [])
        while idle:
            await self._discard(idle.pop())

    async def _checkout(
        self,
        upstream: Upstream,
        model: str,
        *,
        reuse: bool,
        timeouts: UpstreamTimeouts | None = None,
    ) -> _Connection:
        address = (upstream.host, upstream.port)
        idle = self._idle.get(address, [])
        now = trio.current_time()
        # No checkpoint in this loop: retire() and sweep() (other tasks) can never
        # change the list under it, so no connection is taken twice or after a close.
        while reuse and idle:
            connection = idle.pop()
            if connection.generation == self._generation[address] and _reusable(connection, now):
                connection.reused = True
                return connection
            _close_now(connection)
        # Read before dialling: a retire() while we connect makes this connection old.
        generation = self._generation[address]
        if timeouts is None:
            return _Connection(await self._dial(upstream, model), generation)
        connect = timeouts.connect or math.inf  # 0: no limit, as in Go
        handshake = timeouts.tls_handshake or math.inf
        stream = await self._dial(upstream, model, connect=connect, handshake=handshake)
        if timeouts.keepalive > 0:
            _keep_alive(stream, timeouts.keepalive)
        return _Connection(stream, generation, timeouts.idle_conn or math.inf)

    async def _dial(
        self,
        upstream: Upstream,
        model: str,
        *,
        connect: float | None = None,
        handshake: float | None = None,
    ) -> trio.abc.Stream:
        """A new connection; without ``handshake``, ``connect`` (default: the client's
        connect timeout) bounds the TCP connect and the TLS handshake together."""
        connect = self._connect_timeout if connect is None else connect
        step = "connect"
        try:
            with trio.fail_after(connect):
                stream: trio.abc.Stream = await trio.open_tcp_stream(upstream.host, upstream.port)
                if upstream.tls and handshake is None:
                    return await self._handshake(stream, upstream)
            if upstream.tls:
                step = "TLS handshake"
                with trio.fail_after(handshake or math.inf):
                    return await self._handshake(stream, upstream)
            return stream
        except trio.TooSlowError as exc:
            limit = connect if step == "connect" else handshake
            raise UpstreamFailed(model, f"{step} timed out after {limit:g}s") from exc
        except (OSError, trio.BrokenResourceError) as exc:  # trio wraps a failed handshake
            detail = exc if isinstance(exc, OSError) else _describe(exc.__cause__ or exc)
            raise UpstreamFailed(
                model, f"cannot connect to {upstream.host}:{upstream.port}: {detail}"
            ) from exc

    async def _handshake(
        self, stream: trio.abc.Stream, upstream: Upstream
    ) -> trio.SSLStream[trio.abc.Stream]:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        tls = trio.SSLStream(stream, self._ssl, server_hostname=upstream.host)
        try:
            await tls.do_handshake()
        except BaseException:
            await trio.aclose_forcefully(stream)
            raise
        return tls

    async def _release(self, upstream: Upstream, connection: _Connection) -> None:
        address = (upstream.host, upstream.port)
        idle = self._idle[address]
        if (
            self._closed
            or len(idle) >= _MAX_IDLE_PER_UPSTREAM
            or connection.generation != self._generation[address]  # its process is going
            or connection.expiry <= 0
        ):
            await self._discard(connection)
            return
        connection.idle_since = trio.current_time()
        connection.reused = False
        idle.append(connection)

    async def _discard(self, connection: _Connection) -> None:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await connection.stream.aclose()

    async def aclose(self) -> None:
        """Close every idle connection; connections in use close when their response does."""
        self._closed = True
        for address in list(self._idle):  # the sweeper may still run: no live iteration
            idle = self._idle.pop(address, [])
            while idle:
                await self._discard(idle.pop())


def _length(body: bytes | Sequence[bytes | memoryview]) -> int:
    if isinstance(body, bytes):
        return len(body)
    return sum(len(piece) for piece in body)


def _reusable(connection: _Connection, now: float) -> bool:
    """Young enough for the server to keep it, and nothing arrived on it while idle."""
    if now - connection.idle_since >= connection.expiry:
        return False
    return _still_open(connection.stream)


def _keep_alive(stream: trio.abc.Stream, period: float) -> None:
    """TCP keep-alive probes every ``period`` seconds, as Go's dialer ``KeepAlive`` does."""
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return
    seconds = max(1, round(period))
    inner.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option in ("TCP_KEEPIDLE", "TCP_KEEPINTVL"):  # Linux; macOS has TCP_KEEPALIVE
        if hasattr(socket, option):
            inner.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), seconds)


def _close_now(connection: _Connection) -> None:
    """Close the socket at once, without a checkpoint (a connection we abandon: no TLS goodbye)."""
    stream = connection.stream
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if isinstance(inner, trio.SocketStream):
        inner.socket.close()


def _still_open(stream: trio.abc.Stream) -> bool:
    """An idle keep-alive connection is reusable only if nothing is waiting to be read.

    Readable while idle means the server closed it (EOF) or sent bytes nobody
    asked for: either way a request written to it would be lost or misread.
    """
    inner = stream.transport_stream if isinstance(stream, trio.SSLStream) else stream
    if not isinstance(inner, trio.SocketStream):
        return True
    if inner.socket.fileno() < 0:  # closed already (retired)
        return False
    poller = select.poll()
    poller.register(inner.socket.fileno(), select.POLLIN)
    return not poller.poll(0)


class _EarlyClose(Exception):
    """The connection ended, or misbehaved, before a response head arrived."""


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


@final
class ConnectionRetirer(ProcessHooks):
    """Process hooks that retire a model's pooled connections at every change of process.

    ``upstream_of`` maps a model id to where its process listens (None once the
    model left the config).
    """

    def __init__(
        self, client: UpstreamClient, upstream_of: Callable[[str], Upstream | None]
    ) -> None:
        self._client = client
        self._upstream_of = upstream_of

    def _retire(self, model: str) -> None:
        upstream = self._upstream_of(model)
        if upstream is not None:
            self._client.retire(upstream)

    def starting(self, model: str) -> None:
        self._retire(model)

    def stopping(self, model: str, reason: StopReason) -> None:
        self._retire(model)

    def crashed(self, model: str) -> None:
        self._retire(model)

    def stopped(self, model: str) -> None:
        self._retire(model)
