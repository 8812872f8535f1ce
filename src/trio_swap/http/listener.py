"""The HTTP server: hypercorn's trio worker loop, with connections that shutdown can cut.

``hypercorn.trio.serve`` is replaced by :class:`HttpServer` for these reasons.

**Shutdown ends, whatever the clients do.** hypercorn writes every byte under
a cancel shield, so that a cancelled handler never leaves half a frame on the
wire. A client that stops reading (its socket buffer full: a stalled
streaming client, a hostile one) therefore holds its connection task, and
with it hypercorn's graceful drain, forever; neither the drain deadline nor a
second SIGTERM could end it. Here every accepted connection is registered,
and cutting closes their sockets: trio wakes a write blocked on a closed
socket with ``ClosedResourceError``, hypercorn treats that as the client
gone, and the connection task ends. The timeline of a stop::

    shutdown trigger   stop accepting; idle keep-alive connections close;
                       requests under way may finish ...
    graceful_timeout   ... until this deadline: handlers are cancelled and
                       every connection still open is cut
    cut()              the same at once, whenever called (a second SIGTERM)

**Cleartext HTTP/2 (h2c) is not served unless asked for** (``h2c=True``).
hypercorn answers an ``Upgrade: h2c`` request with ``101`` and switches, and
treats a connection opening with the HTTP/2 preface ("prior knowledge") as
HTTP/2. trio-swap's clients (OpenAI and Anthropic SDKs, curl, browsers
through ``http://``) speak HTTP/1.1 to a local proxy, Go's ``net/http``
(llama-swap) serves no h2c either, and HTTP/2's flow control gives a client
one more way to stall a response. So by default ``Upgrade: h2c`` is ignored
(RFC 9110 §7.8 lets a server ignore Upgrade: the request is answered in
HTTP/1.1), the HTTP/2 preface gets an HTTP/2 ``GOAWAY`` with
``HTTP_1_1_REQUIRED`` (RFC 9113 §7), and any other version but 1.0 and 1.1
a ``505``. docs/security.md says the same for users.

**One connection cannot take the server down.** An exception out of
hypercorn's connection code ended hypercorn's worker, and trio-swap with it;
one such race (a handler's answer ending the connection as the reader answers
a framing error) is fixed in :meth:`_Connection.protocol_send`, and anything
else is logged and costs only that connection.

**A connection ends when its client leaves.** hypercorn left a closed
connection's keep-alive timer running, and with it the connection's task and
socket (an fd in CLOSE_WAIT) for the whole keep-alive timeout: a client
opening and closing connections could use up trio-swap's file descriptors.

Only plain TCP is served (trio-swap binds no TLS); hypercorn's connection
class :class:`~hypercorn.trio.tcp_server.TCPServer` and its protocol classes
do the rest, unchanged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final, final

import h11
import msgspec
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.events import Closed, Event, RawData
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.task_group import TaskGroup
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import AppWrapper, ASGIFramework, ConnectionState, LifespanState
from hypercorn.utils import parse_socket_addr, repr_socket_addr, wrap_app

__all__ = ["HttpServer"]

log = logging.getLogger("trio_swap.http")

#: The server's reply to the HTTP/2 connection preface: an empty SETTINGS frame
#: (the server preface, RFC 9113 §3.4), then GOAWAY with last stream 0 and error
#: code HTTP_1_1_REQUIRED (0xd): "use HTTP/1.1", in words an HTTP/2 client reads.
_GOAWAY_HTTP_1_1_REQUIRED: Final = (
    b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # length 0, SETTINGS, no flags, stream 0
    + b"\x00\x00\x08\x07\x00\x00\x00\x00\x00"  # length 8, GOAWAY, no flags, stream 0
    + b"\x00\x00\x00\x00\x00\x00\x00\x0d"  # last stream id 0, HTTP_1_1_REQUIRED
)
_HTTP1_VERSIONS: Final = (b"1.0", b"1.1")


@final
class HttpServer:
    """Serves an ASGI app over HTTP/1.1 on ``config.bind``; :meth:`cut` ends every connection.

    ``config`` is hypercorn's: ``bind``, ``graceful_timeout`` (the drain),
    ``keep_alive_timeout`` and the h11 limits are read from it; TLS, QUIC and
    worker settings are not.
    """

    def __init__(self, app: ASGIFramework, config: HypercornConfig, *, h2c: bool = False) -> None:
        self._app: AppWrapper = wrap_app(app, config.wsgi_max_body_size, "asgi")
        self._config = config
        self._h2c = h2c
        #: Every connection accepted and not yet ended (their handlers remove them).
        self._connections: set[trio.SocketStream] = set()
        #: Set by :meth:`cut`: no more draining, and connections accepted later are closed.
        self._cut = trio.Event()

    def cut(self) -> None:
        """Close every connection now, and stop accepting. Idempotent; callable from any task.

        Handlers see the client gone; a shutdown under way skips the rest of its drain.
        """
        self._cut.set()
        for stream in list(self._connections):
            stream.socket.close()  # wakes a blocked send/receive with ClosedResourceError

    async def serve(
        self,
        *,
        shutdown_trigger: Callable[[], Awaitable[None]],
        task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Listen, serve until ``shutdown_trigger`` returns (or :meth:`cut`), then drain.

        Returns once every connection has ended: at most ``graceful_timeout``
        after the trigger, however the clients behave. ``task_status`` gets the
        bound URLs (``http://host:port``). Like hypercorn's worker, the app's
        lifespan (Quart's startup and shutdown) wraps the serving.
        """
        config = self._config
        lifespan_state: LifespanState = {}
        lifespan = Lifespan(self._app, config, lifespan_state)
        context = WorkerContext(None)
        async with trio.open_nursery() as lifespan_nursery:
            await lifespan_nursery.start(lifespan.handle_lifespan)
            await lifespan.wait_for_startup()
            listeners: list[trio.SocketListener] = []
            binds: list[str] = []
            for sock in config.create_sockets().insecure_sockets:
                sock.listen(config.backlog)
                listeners.append(trio.SocketListener(trio.socket.from_stdlib_socket(sock)))
                binds.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
            handler = partial(self._connection, context, ConnectionState(lifespan_state.copy()))
            async with trio.open_nursery() as cutter:
                # Outside the connections' nursery, so that its deadline cannot cancel it.
                drain: trio.CancelScope = await cutter.start(self._cut_when_due)
                async with trio.open_nursery() as connections:
                    async with trio.open_nursery() as accepting:
                        accepting.start_soon(
                            partial(trio.serve_listeners, handler_nursery=connections),
                            handler,
                            listeners,
                        )
                        task_status.started(binds)
                        await _first_of(shutdown_trigger, self._cut.wait)
                        accepting.cancel_scope.cancel(reason="shutting down")
                    for listener in listeners:
                        await listener.aclose()
                    # hypercorn's protocols read this: idle keep-alive connections close,
                    # finished responses do not recycle their connection.
                    await context.terminated.set()
                    deadline = trio.current_time() + config.graceful_timeout
                    connections.cancel_scope.deadline = deadline
                    drain.deadline = deadline
                cutter.cancel_scope.cancel(reason="every connection ended")
            await lifespan.wait_for_shutdown()
            lifespan_nursery.cancel_scope.cancel(reason="lifespan done")

    async def _cut_when_due(
        self, *, task_status: trio.TaskStatus[trio.CancelScope] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Cut every connection at the drain deadline (set on the scope it hands back), on
        :meth:`cut`, or when cancelled from outside: whatever ends serving, nothing lingers."""
        try:
            with trio.CancelScope() as drain:
                task_status.started(drain)
                await self._cut.wait()
        finally:
            if self._connections:
                log.warning(
                    "cutting %d HTTP connection(s) that did not finish in time",
                    len(self._connections),
                )
                self.cut()

    async def _connection(
        self, context: WorkerContext, state: ConnectionState, stream: trio.SocketStream
    ) -> None:
        """One client connection, from accept to close (hypercorn's ``TCPServer``)."""
        self._connections.add(stream)
        try:
            if self._cut.is_set():
                return  # accepted as the cut happened
            connection = _Connection(self._app, self._config, context, state, stream, h2c=self._h2c)
            await connection.run()
        except Exception:
            # A bug in a connection's protocol code: lose that connection, not every
            # client's (an exception here would end serve(), and trio-swap with it).
            log.exception("HTTP connection from %s failed; it is closed", _peer(stream))
        finally:
            self._connections.discard(stream)
            stream.socket.close()


def _peer(stream: trio.SocketStream) -> str:
    try:
        host, port, *_ = stream.socket.getpeername()
    except OSError:
        return "a client"
    return f"{host}:{port}"


async def _first_of(*waits: Callable[[], Awaitable[object]]) -> None:
    """Return as soon as one of ``waits`` returns."""
    async with trio.open_nursery() as nursery:

        async def wait_then_cancel(wait: Callable[[], Awaitable[object]]) -> None:
            await wait()
            nursery.cancel_scope.cancel(reason="one of several waits returned")

        for wait in waits:
            nursery.start_soon(wait_then_cancel, wait)


class _NotHttp1(Exception):
    """A request line naming another HTTP version than 1.0 or 1.1."""

    def __init__(self, version: bytes) -> None:
        super().__init__(version)
        self.version = version


class _Http1Protocol(H11Protocol):
    """hypercorn's HTTP/1.1 protocol without its two ways into HTTP/2."""

    async def _check_protocol(self, event: h11.Request) -> None:
        # hypercorn's version switches to HTTP/2 here: on `Upgrade: h2c` (after
        # sending 101) and on the HTTP/2 preface's request line. Not replacing
        # it is enough to ignore the upgrade: the request goes on as HTTP/1.1.
        if event.http_version not in _HTTP1_VERSIONS:
            raise _NotHttp1(event.http_version)


class _Http1Wrapper(ProtocolWrapper):
    """hypercorn's protocol switch, fixed to :class:`_Http1Protocol`."""

    def __init__(
        self,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        task_group: TaskGroup,
        state: ConnectionState,
        client: tuple[str, int] | None,
        server: tuple[str, int] | None,
        send: Callable[[Event], Awaitable[None]],
    ) -> None:
        super().__init__(app, config, context, task_group, state, False, client, server, send)
        self.protocol = _Http1Protocol(
            app, config, context, task_group, state, False, client, server, send
        )

    async def handle(self, event: Event) -> None:
        try:
            await self.protocol.handle(event)
        except _NotHttp1 as refused:
            if refused.version == b"2.0":
                await self.send(RawData(data=_GOAWAY_HTTP_1_1_REQUIRED))
            else:
                await self.send(RawData(data=_version_not_supported(refused.version)))
            await self.send(Closed())


@final
class _Connection(TCPServer):
    """hypercorn's connection: HTTP/1.x only (:class:`_Http1Wrapper`) unless ``h2c``, and
    done as soon as the client is."""

    def __init__(
        self,
        app: AppWrapper,
        config: HypercornConfig,
        context: WorkerContext,
        state: ConnectionState,
        stream: trio.SocketStream,
        *,
        h2c: bool,
    ) -> None:
        # hypercorn annotates the stream as SSLStream; its own worker passes plain ones.
        super().__init__(app, config, context, state, stream)  # type: ignore[arg-type]
        self._h2c = h2c

    async def run(self) -> None:
        # TCPServer.run for a plain socket (its TLS handshake part does not apply),
        # with two changes marked below; a third is in protocol_send.
        socket = self.stream.socket
        try:
            client = parse_socket_addr(socket.family, socket.getpeername())
            server = parse_socket_addr(socket.family, socket.getsockname())
            async with TaskGroup() as task_group:
                self._task_group = task_group
                state = ConnectionState(self.state)
                send = self.protocol_send
                # (1) The protocol wrapper, HTTP/1.x only unless h2c was asked for.
                if self._h2c:
                    self.protocol = ProtocolWrapper(
                        self.app, self.config, self.context, task_group, state, False,
                        client, server, send, "http/1.1",
                    )  # fmt: skip
                else:
                    self.protocol = _Http1Wrapper(
                        self.app, self.config, self.context, task_group, state,
                        client, server, send,
                    )  # fmt: skip
                await self.protocol.initiate()
                await self.idle_task.restart(self._task_group, self._idle_timeout)
                await self._read_data()
                # (2) The client closed: stop the keep-alive timer. hypercorn leaves it
                # running, so every closed connection kept its task and its socket
                # (an fd in CLOSE_WAIT) for the whole keep-alive timeout (75 s here):
                # a client opening and closing connections could use up the fds.
                await self.idle_task.stop()
        except OSError:
            pass
        finally:
            await self._close()

    async def protocol_send(self, event: Event) -> None:
        try:
            await super().protocol_send(event)
        except trio.BusyResourceError:
            # (3) hypercorn half-closes the socket (send_eof, in _close) without its
            # send lock. When a handler's answer ends the connection (a request body it
            # did not read) just as the reader answers a framing error in that body,
            # one write met the other: BusyResourceError, uncaught, ended trio-swap.
            # Either way the connection is closing: say so, as for a broken socket.
            await self.protocol.handle(Closed())


def _version_not_supported(version: bytes) -> bytes:
    """A complete ``505`` response (JSON error body, connection closing)."""
    message = f"HTTP/{version.decode('latin-1')} is not supported: use HTTP/1.1"
    body = msgspec.json.encode(
        {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "code": "http_version_not_supported",
            }
        }
    )
    head = (
        b"HTTP/1.1 505 HTTP Version Not Supported\r\n"
        b"content-type: application/json\r\n"
        b"content-length: %d\r\n"
        b"connection: close\r\n\r\n" % len(body)
    )
    return head + body
