"""No HTTP input may crash, hang or 500 trio-swap: hostile and broken clients against a real server.

Every test runs trio-swap in-process (``serving``: responder-backed models,
port 0) and talks to it as a client would, over raw sockets where an HTTP
library would refuse to send the bytes. What each test expects of every
answer:

* a 4xx with an OpenAI-style JSON error body; framing garbage (a request h11
  cannot parse) may instead get hypercorn's bodiless 4xx and a closed
  connection; a wrong method gets 405 with ``Allow``. The only 5xx allowed
  are the ones HTTP prescribes for a client's request: 501 (a transfer coding
  nobody implements, RFC 9112 §6.1) and 505 (an HTTP version other than 1.x);
* ``/health`` answering after every case;
* no ERROR log record and no traceback in the log;
* afterwards, while the server still runs: no connection or request-handler
  task left once the clients are gone, no socket of theirs still open on the
  server's port (read from /proc, not from trio-swap's own bookkeeping), and
  once the models are unloaded as many trio tasks as right after the start;
  then the server stopping cleanly, with as many open file descriptors and
  trio tasks as before it started.

Regression tests are named after the bug they pin. Timing is never asserted:
``fail_after`` only guards against hangs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
import h11
import httpx
import msgspec
import pytest
import trio
import trio.testing

from tests.conftest import (
    Harness,
    alive,
    chat,
    free_port,
    make_config,
    responder_model,
    running,
    wait_for,
)
from trio_swap.config.model import Config
from trio_swap.errors import BadRequest, ModelNotFound
from trio_swap.http.multipart import MAX_PARTS, boundary_of, find_field
from trio_swap.http.passthrough import MAX_NAME_SEGMENTS, split_passthrough

#: Hang guard for one test (never an expectation).
TEST_LIMIT = 60
#: The body limit the suite's servers run with: small, so oversized bodies are cheap to send.
MAX_BODY = 4 * 1024 * 1024

# --- a raw HTTP/1.1 client -------------------------------------------------------------


@dataclass
class Answer:
    """What came back: a response, or nothing but a closed connection (``status`` None)."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    #: Every byte received (for answers that are not HTTP/1.1 at all).
    raw: bytes = b""

    def error(self) -> dict[str, object]:
        """The JSON error object (OpenAI's ``error``, or Anthropic's)."""
        assert self.headers.get("content-type", "").startswith("application/json"), self
        payload = json.loads(self.body)
        assert isinstance(payload, dict) and isinstance(payload.get("error"), dict), payload
        error: dict[str, object] = payload["error"]
        assert isinstance(error.get("message"), str) and error["message"], payload
        return error


async def exchange(
    port: int, request: bytes | Sequence[bytes], *, method: bytes | None = None
) -> Answer:
    """Send ``request`` (pieces one after another) on a new connection; read one answer."""
    pieces = [request] if isinstance(request, bytes) else list(request)
    if method is None:
        first = pieces[0].split(b" ", 1)[0]
        method = first if first.isalpha() and first.isupper() else b"GET"
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        try:
            for piece in pieces:
                await stream.send_all(piece)
        except trio.BrokenResourceError:
            pass  # the server answered and closed early: read what it said
        return await read_answer(stream, method)


async def read_answer(stream: trio.abc.ReceiveStream, method: bytes) -> Answer:
    """Read one response (to a request made with ``method``) with h11's client side."""
    parser = h11.Connection(h11.CLIENT)
    # h11 reads a response only after "sending" a request: prime it with one like ours.
    parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
    parser.send(h11.EndOfMessage())
    answer = Answer(None)
    while True:
        try:
            event = parser.next_event()
        except h11.RemoteProtocolError:
            return answer  # not HTTP/1.1 (an HTTP/2 frame): ``raw`` has it
        if event is h11.NEED_DATA:
            try:
                data = await stream.receive_some(65536)
            except trio.BrokenResourceError:
                data = b""
            answer.raw += data
            parser.receive_data(data)
        elif isinstance(event, h11.InformationalResponse):
            if event.status_code == 101:
                answer.status = 101
                return answer
        elif isinstance(event, h11.Response):
            answer.status = event.status_code
            answer.headers = {k.decode(): v.decode("latin-1") for k, v in event.headers}
        elif isinstance(event, h11.Data):
            answer.body += bytes(event.data)
        elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
            return answer


def http_request(
    method: str,
    target: str | bytes,
    body: bytes | None = None,
    *,
    headers: Sequence[tuple[str, str]] = (),
    content_type: str = "application/json",
) -> bytes:
    """One well-framed request as bytes (the target and body may be anything)."""
    if isinstance(target, str):
        target = target.encode("utf-8", "surrogateescape")
    head = [f"{method} ".encode() + target + b" HTTP/1.1", b"Host: localhost"]
    if body is not None:
        head.append(f"Content-Type: {content_type}".encode())
        head.append(b"Content-Length: %d" % len(body))
    head.extend(f"{name}: {value}".encode("latin-1") for name, value in headers)
    return b"\r\n".join(head) + b"\r\n\r\n" + (body or b"")


# --- the server under test -------------------------------------------------------------


@dataclass
class Served:
    harness: Harness
    port: int
    #: For /health checks between cases (closed before the leak checks).
    client: httpx.AsyncClient

    async def healthy(self) -> None:
        response = await self.client.get("/health")
        assert response.status_code == 200 and response.text == "OK", response


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _tasks(fragment: str = "") -> int:
    """Live trio tasks whose name contains ``fragment`` (every task for "")."""
    count = 0
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is not None:
            count += fragment in task.name
            stack.extend(t for nursery in task.child_nurseries for t in nursery.child_tasks)
    return count


def _client_sockets(port: int) -> int:
    """This process's TCP sockets whose local port is ``port``, listeners excepted: the
    server's side of every client connection still open (read from /proc, not from
    trio-swap's own bookkeeping)."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as rows:
            for row in list(rows)[1:]:
                fields = row.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] != "0A":  # 0A: LISTEN
                    inodes.add(fields[9])
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            link = os.readlink(f"/proc/self/fd/{fd}")
            count += link.startswith("socket:[") and link[8:-1] in inodes
    return count


def _connection_tasks() -> int:
    """A task per open client connection, and one per request handler under way."""
    return _tasks("serve_listeners._run_handler") + _tasks("task_group._handle")


def assert_quiet(caplog: pytest.LogCaptureFixture) -> None:
    """No ERROR record, and no traceback anywhere in the log."""
    for record in caplog.records:
        assert record.levelno < logging.ERROR, caplog.text
        assert record.exc_info is None, caplog.text
    assert "Traceback" not in caplog.text, caplog.text


@asynccontextmanager
async def serving(
    caplog: pytest.LogCaptureFixture, config: Config | None = None, **options: object
) -> AsyncIterator[Served]:
    """trio-swap on a free port; afterwards: no leaked connection tasks, fds or tasks."""
    caplog.set_level(logging.INFO)
    if config is None:
        config = suite_config()
    fds_before = _open_fds()
    tasks_before = _tasks()
    async with running(config, max_body_bytes=MAX_BODY, **options) as harness:
        port = int(harness.server.url.rsplit(":", 1)[1])
        served = Served(harness, port, httpx.AsyncClient(base_url=harness.server.url, timeout=30))
        await trio.testing.wait_all_tasks_blocked()  # tasks that end at once have ended
        running_tasks = _tasks()
        try:
            yield served
            await served.healthy()
        finally:
            await served.client.aclose()  # the test may have replaced it
        # Every client is gone now, and the server still runs: nothing of theirs may be
        # left in it (checked before shutdown, which would close everything anyway).
        await wait_for(lambda: _connection_tasks() == 0, what="connection tasks to end")
        await wait_for(lambda: _client_sockets(port) == 0, what="client connections to close")
        await harness.server.router.unload()  # models the test loaded, and their tasks
        await wait_for(lambda: _tasks() == running_tasks, what="tasks back to their number")
    assert _tasks() == tasks_before
    assert _open_fds() == fds_before
    assert_quiet(caplog)


def suite_config() -> Config:
    """``m``: a plain model; ``renamed``: its body is rewritten (``useModelName``).

    Every ``Host`` is answered (``allowedHosts: ["*"]``), so the cases here may send
    ``Host: x``; the Host allowlist has its own tests (test_dns_rebinding.py).
    """
    models = (responder_model("m"), responder_model("renamed", use_model_name="real"))
    return msgspec.structs.replace(make_config(*models), allowed_hosts=("*",))


@dataclass
class Case:
    name: str
    request: bytes | list[bytes]
    #: Acceptable statuses (None: the server closed the connection without answering).
    statuses: frozenset[int | None] = frozenset({400})
    #: The answer must carry a JSON error body (False: framing errors hypercorn answers).
    json_error: bool = True


def case(
    name: str,
    request: bytes | list[bytes],
    *statuses: int | None,
    json_error: bool = True,
) -> Case:
    return Case(name, request, frozenset(statuses or (400,)), json_error)


async def check_cases(served: Served, cases: Sequence[Case]) -> None:
    """Run every case, /health after each; report every case that went wrong at once."""
    failures: list[str] = []
    for item in cases:
        answer = await exchange(served.port, item.request)
        problem = _judge(item, answer)
        if problem:
            failures.append(f"{item.name}: {problem}")
        await served.healthy()
    assert not failures, "\n".join(failures)


def _judge(item: Case, answer: Answer) -> str | None:
    if answer.status not in item.statuses:
        return f"status {answer.status}, expected {sorted(item.statuses, key=str)}: {answer}"
    if answer.status is not None and answer.status >= 400 and item.json_error:
        try:
            answer.error()
        except (AssertionError, ValueError) as exc:
            return f"no JSON error body: {exc}"
    return None


# --- framing ---------------------------------------------------------------------------

CHAT = "/v1/chat/completions"


async def test_framing_garbage_gets_a_4xx_or_a_closed_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    huge_header = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n"
    cases = [
        case("not HTTP", b"HELLO\r\n\r\n", 400, json_error=False),
        case("no version", b"GET /health\r\n\r\n", 400, None, json_error=False),
        case("header without colon", b"GET /health HTTP/1.1\r\nHost: x\r\nOops\r\n\r\n",
             json_error=False),
        case("NUL in the target", b"GET /he\x00alth HTTP/1.1\r\nHost: x\r\n\r\n", json_error=False),
        case("control byte in a header", b"GET /health HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n",
             200, 400, json_error=False),
        case("raw UTF-8 in the target", "GET /upstream/模型/x HTTP/1.1\r\nHost: x\r\n\r\n".encode(),
             json_error=False),
        case("no Host", b"GET /health HTTP/1.1\r\n\r\n", json_error=False),
        case("two Hosts", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", json_error=False),
        case("headers over the limit", huge_header, 431, json_error=False),
        case("two Content-Lengths",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
             b"Content-Length: 6\r\n\r\nhello!", json_error=False),
        case("Content-Length: abc",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
             json_error=False),
        case("negative Content-Length",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
             json_error=False),
        case("Content-Length and chunked (chunked wins: an empty body)",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
             b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        case("unknown transfer coding",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
             b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501, json_error=False),
        case("bad chunk size",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"\r\nzz\r\n", json_error=False),
        case("bad chunk size on an admin route",
             b"POST /api/models/unload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
             b"\r\nzz\r\n", json_error=False),
        case("HTTP/9.9", b"GET /health HTTP/9.9\r\nHost: x\r\n\r\n", 505),
        case("HTTP/2.0 without the preface", b"GET /health HTTP/2.0\r\nHost: x\r\n\r\n", None),
        case("a declared body over the limit",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: %d\r\n\r\n" % (MAX_BODY + 1), 413),
        case("an astronomic Content-Length",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
             b"Content-Length: 99999999999999999999999\r\n\r\n", 400, 413, json_error=False),
        case("Expect: 100-continue over the limit",
             b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
             b"Content-Length: 999999999\r\n\r\n", 413),
        case("a chunked body over the limit",
             [b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n",
              *([b"100000\r\n" + b"x" * 0x100000 + b"\r\n"] * 5), b"0\r\n\r\n"], 413),
        case("CONNECT", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
             404, 405),
    ]  # fmt: skip
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)


async def test_a_413_tells_the_client_to_close(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            answer = await exchange(
                served.port, http_request("POST", CHAT, b"{" + b" " * MAX_BODY + b"}")
            )
            assert answer.status == 413 and answer.headers.get("connection") == "close", answer


# --- JSON bodies -----------------------------------------------------------------------


def _json(text: str | bytes, path: str = CHAT) -> bytes:
    body = text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass")
    return http_request("POST", path, body)


async def test_hostile_json_bodies_get_400s(caplog: pytest.LogCaptureFixture) -> None:
    cases = [
        case("empty body", _json("")),
        case("not an object", _json("[]")),
        case("null", _json("null")),
        case("trailing garbage", _json('{"model": "m"} trailing')),
        case("a byte order mark", _json('\ufeff{"model": "m"}')),
        case("invalid UTF-8", _json(b'{"model": "m\xff\xfe"}')),
        case("a lone surrogate escape", _json('{"model": "\\ud800"}')),
        case("a lone surrogate escape where the body is rewritten",
             _json('{"model": "renamed", "x": "\\ud800"}')),
        case("a raw NUL", _json(b'{"model": "a\x00b"}')),
        case("model is a number", _json('{"model": 5}')),
        case("model is a huge number", _json('{"model": 1e999999}')),
        case("model is null", _json('{"model": null}')),
        case("no model", _json('{"messages": []}')),
        case("a 100k-digit integer where the body is rewritten",
             _json('{"model": "renamed", "max_tokens": 1' + "0" * 100_000 + "}")),
        case("an out-of-range float where the body is rewritten",
             _json('{"model": "renamed", "temperature": 1e999999}')),
        case("unterminated", _json('{"model": "m", "messages": [')),
        case("Anthropic route, not JSON", _json("{", "/v1/messages")),
        case("versionless route, bad model", _json('{"model": []}', "/v/chat/completions")),
    ]  # fmt: skip
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)
            # Anthropic's SDK reads its own error shape on /v1/messages.
            answer = await exchange(served.port, _json("{", "/v1/messages"))
            assert json.loads(answer.body)["type"] == "error", answer


async def test_deeply_nested_json_is_a_400_not_a_recursion_error_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    nested = "[" * 100_000 + "]" * 100_000
    cases = [
        case("nested in an ignored field", _json('{"model": "m", "x": ' + nested + "}")),
        case("nested in stream", _json('{"model": "m", "stream": ' + nested + "}")),
        case("nested, body rewritten", _json('{"model": "renamed", "x": ' + nested + "}")),
    ]
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)


# --- multipart forms -------------------------------------------------------------------

TRANSCRIBE = "/v1/audio/transcriptions"


def _form_field(name: bytes, value: bytes) -> bytes:
    return b'Content-Disposition: form-data; name="' + name + b'"\r\n\r\n' + value


def _form(parts: Sequence[bytes], boundary: bytes = b"b", *, closed: bool = True) -> bytes:
    body = b"".join(b"--" + boundary + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary + b"--\r\n" if closed else b"")


def _upload(body: bytes, content_type: str = "multipart/form-data; boundary=b") -> bytes:
    return http_request("POST", TRANSCRIBE, body, content_type=content_type)


async def test_hostile_multipart_forms_get_4xx(caplog: pytest.LogCaptureFixture) -> None:
    long_boundary = b"q" * 5000
    cases = [
        case("no content type", http_request("POST", TRANSCRIBE, b"x", content_type="")),
        case("not multipart", _upload(b"x", "text/plain")),
        case("no boundary", _upload(b"x", "multipart/form-data")),
        case("empty boundary", _upload(b"x", "multipart/form-data; boundary=")),
        case("non-ASCII boundary (RFC 2231)",
             _upload(b"x", "multipart/form-data; boundary*=UTF-8''%E2%82%AC")),
        case("a 5000-byte boundary (unknown model)",
             _upload(_form([_form_field(b"model", b"nope")], long_boundary),
                     "multipart/form-data; boundary=" + long_boundary.decode()), 404),
        case("no parts", _upload(b"--b--\r\n")),
        case("no model part", _upload(_form([_form_field(b"language", b"en")]))),
        case("model only as a file part",
             _upload(_form([b'Content-Disposition: form-data; name="model"; filename="m"'
                            b"\r\n\r\nm"]))),
        case("unterminated", _upload(b'--b\r\nContent-Disposition: form-data; name="model"'
                                     b"\r\n\r\nm")),
        case("thousands of parts before the model",
             _upload(_form([_form_field(b"x", b"y")] * (MAX_PARTS + 50)
                           + [_form_field(b"model", b"m")]))),
        case("2 MiB of empty parts", _upload(b"--b\r\n" * (2 * 1024 * 1024 // 5))),
        case("model is invalid UTF-8", _upload(_form([_form_field(b"model", b"\xff\xfe")])), 404),
        case("a 100 KB model name", _upload(_form([_form_field(b"model", b"x" * 100_000)])), 404),
        case("a header block over 16 KiB",
             _upload(_form([b"X-Pad: " + b"p" * 20_000 + b"\r\n" + _form_field(b"model", b"m")]))),
    ]  # fmt: skip
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)


async def test_a_body_of_empty_multipart_parts_is_refused_not_scanned_for_minutes(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: each ``--b\\r\\n`` made the scan search 16 KiB for a header end, so 2 MiB
    of them blocked the event loop for seconds (minutes at 64 MiB): one request, a DoS."""
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            answer = await exchange(served.port, _upload(b"--b\r\n" * (2 * 1024 * 1024 // 5)))
            assert answer.status == 400, answer
            assert f"more than {MAX_PARTS} parts" in str(answer.error()["message"])


class _CountingBytes(bytes):
    """A body that counts how many bytes ``find`` looked at."""

    searched = 0

    def find(self, sub: bytes, start: int | None = None, end: int | None = None) -> int:  # type: ignore[override]
        found = super().find(sub, start, end)
        low = start or 0
        high = len(self) if end is None else min(end, len(self))
        _CountingBytes.searched += (found + len(sub) if found >= 0 else high) - low
        return found


@pytest.mark.parametrize(
    "body",
    [
        b"--b\r\n" * 100_000,  # empty parts
        b"--b\r\n\r\n\r\n" * 50_000,  # parts without headers
        _form([_form_field(b"x", b"y")] * 20_000),  # plain fields
        _form([b"X: " + b"h" * 30_000] * 20),  # header blocks over the limit
    ],
    ids=["empty parts", "no headers", "fields", "huge headers"],
)
def test_the_multipart_scan_reads_each_byte_a_bounded_number_of_times(body: bytes) -> None:
    """Regression (the same DoS): the scan is linear in the body, whatever its parts."""
    counted = _CountingBytes(body)
    _CountingBytes.searched = 0
    assert find_field(counted, b"b", "model", max_parts=10**9) is None
    assert _CountingBytes.searched <= 3 * len(body)


def test_an_rfc_2231_boundary_that_is_not_latin_1_is_a_400_not_a_unicode_error() -> None:
    """Regression: ``boundary*=UTF-8''%E2%82%AC`` raised UnicodeEncodeError (a 500)."""
    with pytest.raises(BadRequest, match="not ASCII"):
        boundary_of("multipart/form-data; boundary*=UTF-8''%E2%82%AC")
    assert boundary_of("multipart/form-data; boundary=abc") == b"abc"


# --- model names, paths and query values ------------------------------------------------

ODD_NAMES = [
    "x" * 100_000,
    "\x00",
    "../../etc/passwd",
    "%00",
    "模型🙂",
    "\x1b[31mred\r\nX-Injected: 1",
    " m ",
    "m/../m",
]


async def test_odd_model_names_get_a_404_on_every_route(caplog: pytest.LogCaptureFixture) -> None:
    cases: list[Case] = []
    for index, name in enumerate(ODD_NAMES):
        label = f"name #{index}"
        short = quote(name[:2000], safe="")  # the request line has to fit hypercorn's limit
        cases += [
            case(f"{label} in JSON", _json(json.dumps(chat(name))), 404),
            case(f"{label} in a form", _upload(_form([_form_field(b"model", name.encode())])), 404),
            case(f"{label} in the query", http_request("GET", f"/props?model={short}"), 404),
            case(
                f"{label} in a passthrough path",
                http_request("GET", f"/upstream/{short}/x"),
                404,
                400,
            ),
            case(
                f"{label} to unload", http_request("POST", f"/api/models/unload/{short}", b""), 404
            ),
            case(f"{label} to load", http_request("POST", f"/api/models/load/{short}", b""), 404),
            case(f"{label} log stream", http_request("GET", f"/logs/stream/{short}"), 400, 404),
        ]
    cases += [
        case("empty name in JSON", _json('{"model": ""}')),
        case("empty name in the query", http_request("GET", "/props?model=")),
        case("empty name in a form", _upload(_form([_form_field(b"model", b"")]))),
        case("empty passthrough name", http_request("GET", "/upstream//x"), 404),
    ]  # fmt: skip
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)


async def test_a_huge_model_name_is_not_echoed_whole(caplog: pytest.LogCaptureFixture) -> None:
    """Regression: a 100 KB model name came back whole in the 404's message."""
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            answer = await exchange(served.port, _json(json.dumps(chat("x" * 100_000))))
            message = str(answer.error()["message"])
            assert answer.status == 404 and len(message) < 1000, message
            assert "100000 characters" in message


#: (method, path) pairs no route takes; every one must be a 405 naming what is allowed.
WRONG_METHODS = [
    ("DELETE", "/api/models"),
    ("GET", "/api/models/unload"),
    ("GET", "/api/models/unload/m"),
    ("GET", "/api/models/load/m"),
    ("GET", "/api/config/reload"),
    ("POST", "/api/events"),
    ("PATCH", "/api/activity"),
    ("POST", "/logs"),
    ("POST", "/logs/stream"),
    ("PUT", "/logs/stream/m"),
    ("POST", "/running"),
    ("POST", "/unload"),
    ("POST", "/ui"),
    ("DELETE", "/ui/index.html"),
    ("POST", "/metrics"),
    ("POST", "/v1/models"),
    ("PUT", "/health"),
    ("TRACE", "/health"),
    ("GET", "/v1/chat/completions"),
    ("HEAD", "/v1/embeddings"),
    ("GET", "/v1/audio/transcriptions"),
    ("POST", "/props"),
    ("PUT", "/v1/audio/voices"),
    ("BREW", "/v1/models"),
]


async def test_a_wrong_method_gets_405_with_allow_on_every_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: Quart's 405s had no ``Allow``, and POST /props was a 404."""
    failures: list[str] = []
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            for method, path in WRONG_METHODS:
                body = b"" if method in ("POST", "PUT", "PATCH") else None
                answer = await exchange(served.port, http_request(method, path, body))
                allowed = {m.strip() for m in answer.headers.get("allow", "").split(",")}
                if answer.status != 405 or not allowed - {""} or method in allowed:
                    failures.append(f"{method} {path}: {answer}")
                elif method != "HEAD":
                    answer.error()
            await served.healthy()
    assert not failures, "\n".join(failures)


async def test_odd_paths_and_query_values_never_get_a_5xx(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Every route with odd path segments and query values: an answer, a 4xx when refused."""
    ok_or_refused = (200, 204, 301, 302, 304, 400, 404)
    paths = [
        "/%ff%fe",
        "/" + "a/" * 4000,
        "//" * 100,
        "/health?%ff=%zz&&&=",
        "/v1/models?limit=-1&x=%00",
        "/api/models?x=" + "%00" * 2000,
        "/running?x=%ff",
        "/api/fit?x=%ff",
        "/logs?no-history=%ff",
        "/metrics?name[]=%00",
        "/ui/%2e%2e/%2e%2e/etc/passwd",
        "/ui/..%2f..%2fetc%2fpasswd",
        "/ui/" + "a" * 5000,
        "/ui/x.js%00.html",
        "/upstream/m/..%2f..%2fhealth",
        "/upstream/%2e%2e/health",
        "/upstream/m/%2e%2e/x",
        "/upstream/" + "%2f" * 3000,
        "/upstream/" + "a/" * 30_000,  # 60 KB: in one piece, under hypercorn's 64 KiB read
        "/props?model=m&model=%ff",
        "/v1/audio/voices?model=%zz",
        "/sdapi/v1/loras?model",
    ]
    refused_queries = [
        "/api/activity?limit=abc",
        "/api/activity?limit=-1",
        "/api/activity?limit=0",
        "/api/activity?limit=1_0",
        "/api/activity?limit=%EF%BC%91",  # a fullwidth digit one
        "/api/activity?limit=" + "9" * 5000,
        "/api/activity?before=abc",
        "/api/activity?before=99999999999999999999999999",
        "/api/activity?before=-99999999999999999999999999",
        "/api/timeline?since=nan",
        "/api/timeline?since=inf",
        "/api/timeline?since=1_0",
        "/api/timeline?since=" + "9" * 5000,
    ]
    cases = [
        *(case(f"GET {p[:60]}", http_request("GET", p), *ok_or_refused) for p in paths),
        *(case(f"GET {p[:60]}", http_request("GET", p), 400) for p in refused_queries),
        case("activity filter by odd models", http_request(
            "GET", "/api/activity?model=%00&model=" + "x" * 3000), 200),
    ]  # fmt: skip
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)


async def test_an_activity_cursor_beyond_64_bits_is_a_400_not_a_sqlite_overflow(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: ``?before=99999999999999999999999999`` raised OverflowError (a 500)."""
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            for value in ("99999999999999999999999999", "-99999999999999999999999999"):
                response = await served.client.get("/api/activity", params={"before": value})
                assert response.status_code == 400, response.text
                assert "64-bit integer" in response.json()["error"]["message"]
            assert (await served.client.get("/api/activity?before=5")).status_code == 200


def test_a_passthrough_path_of_thousands_of_segments_is_not_searched_quadratically() -> None:
    """Regression: every leading run of segments was joined and looked up, so a 60 KB
    ``/upstream/a/a/a/...`` line cost seconds of blocked event loop (quadratic)."""
    asked: list[str] = []

    def is_model(name: str) -> bool:
        asked.append(name)
        return False

    with pytest.raises(ModelNotFound):
        split_passthrough(b"/upstream/" + b"a/" * 30_000, is_model)
    assert len(asked) <= MAX_NAME_SEGMENTS
    assert sum(map(len, asked)) <= MAX_NAME_SEGMENTS**2 * 2
    # Names of several segments are still found, written plainly or escaped.
    target = split_passthrough(b"/upstream/org%2Fm/v1/x", lambda name: name == "org/m")
    assert (target.model, target.rest) == ("org/m", b"/v1/x")


async def test_a_closed_connection_releases_its_task_and_socket_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: hypercorn kept a closed connection's keep-alive timer, and with it the
    connection's task and socket (an fd in CLOSE_WAIT), for the whole 75 s keep-alive
    timeout: clients that open and close connections could use up the fds."""
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await served.client.aclose()
            await served.harness.client.aclose()
            await wait_for(lambda: _connection_tasks() == 0, what="idle connections to end")
            fds = len(_open_fds())
            for _ in range(50):
                answer = await exchange(served.port, _json("[]"))  # then the client closes
                assert answer.status == 400
            await wait_for(lambda: _connection_tasks() == 0, what="closed connections to end")
            assert len(_open_fds()) == fds
            served.client = httpx.AsyncClient(base_url=served.harness.server.url, timeout=30)


async def test_a_framing_error_in_a_body_the_handler_did_not_read_does_not_kill_the_server(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: /health answers without reading the body; when its answer closed the
    connection just as the reader answered the body's bad chunk, hypercorn's two writes
    collided (BusyResourceError, uncaught) and trio-swap died with every connection."""
    request = b"GET /health HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            statuses: list[int | None] = []

            async def one() -> None:
                statuses.append((await exchange(served.port, request)).status)

            for _ in range(5):  # the race needs many tries: 100 connections at a time
                async with trio.open_nursery() as nursery:
                    for _ in range(100):
                        nursery.start_soon(one)
                await served.healthy()
            assert set(statuses) <= {200, 400, None}, statuses


async def test_a_write_colliding_with_the_close_is_a_closed_connection_not_an_error() -> None:
    """The same race, made certain: the socket reports another task writing."""
    from hypercorn.config import Config as HypercornConfig
    from hypercorn.events import Closed, RawData
    from hypercorn.trio.worker_context import WorkerContext
    from hypercorn.typing import ConnectionState

    from trio_swap.http.listener import _Connection

    class BusyStream:
        async def send_all(self, data: bytes) -> None:
            raise trio.BusyResourceError("another task is currently sending data")

    class Protocol:
        def __init__(self) -> None:
            self.events: list[object] = []

        async def handle(self, event: object) -> None:
            self.events.append(event)

    connection = _Connection(
        None,  # type: ignore[arg-type]
        HypercornConfig(),
        WorkerContext(None),
        ConnectionState({}),
        BusyStream(),  # type: ignore[arg-type]
        h2c=False,
    )
    protocol = Protocol()
    connection.protocol = protocol  # type: ignore[assignment]
    await connection.protocol_send(RawData(data=b"HTTP/1.1 400 \r\n\r\n"))
    assert protocol.events == [Closed()]


async def test_an_exception_in_one_connection_costs_only_that_connection(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever else goes wrong inside hypercorn's connection code is logged, and the
    server goes on serving (it ended serve(), and trio-swap, before)."""
    from trio_swap.http import listener

    original = listener._Connection.run
    calls: list[int] = []

    async def fails_once(self: listener._Connection) -> None:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a bug in the protocol code")
        await original(self)

    monkeypatch.setattr(listener._Connection, "run", fails_once)
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            answer = await exchange(served.port, http_request("GET", "/health"))
            assert answer.status is None  # that connection was dropped
            errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
            assert len(errors) == 1 and "failed; it is closed" in errors[0].getMessage()
            caplog.clear()  # seen: the rest of the test must be quiet


async def test_a_host_header_idna_cannot_encode_is_a_400_not_a_500(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression (found by fuzzing): Quart's routing encodes Host with IDNA, and a label
    over 63 characters (or an empty one) raised out of Quart: a 500 and a traceback."""
    hosts = [b"a" * 64, b"a" * 64 + b":8080", b"a..b", b".example", b"x." + b"b" * 100 + b".com"]
    cases = [
        case(f"Host {host[:20]!r} on {path}", _with_host(path, host))
        for host in hosts
        for path in ("/v1/models", "/api/models", "/props?model=nope")
    ]
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)
            for host in ("bücher.example", "127.0.0.1:8080", "[::1]:8080", "localhost."):
                answer = await exchange(
                    served.port, _with_host("/v1/models", host.encode("latin-1"))
                )
                assert answer.status == 200, (host, answer)


def _with_host(path: str, host: bytes) -> bytes:
    return f"GET {path} HTTP/1.1\r\n".encode() + b"Host: " + host + b"\r\n\r\n"


# --- upgrades: HTTP/2 and websockets ---------------------------------------------------

_WEBSOCKET = (
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Version", "13"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
)


async def test_a_websocket_upgrade_gets_a_json_400_on_every_route(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Regression: a websocket to a path Quart does not know was a 500 with a traceback.

    ``/v1/chat/completions`` takes websockets but names no model here (400);
    ``/upstream/m/ws`` is proxied to m's server, which has no such route (its 404).
    """
    paths = ["/v1/chat/completions", "/logs/stream", "/api/events", "/nope"]
    cases = [
        case(f"websocket {path}", http_request("GET", path, headers=_WEBSOCKET)) for path in paths
    ]
    upstream = http_request("GET", "/upstream/m/ws", headers=_WEBSOCKET)
    cases.append(case("websocket /upstream/m/ws", upstream, 404))
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            await check_cases(served, cases)


_H2C_UPGRADE = (
    ("Connection", "Upgrade, HTTP2-Settings"),
    ("Upgrade", "h2c"),
    ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
)
_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


async def test_cleartext_http2_is_not_served_by_default(caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            # An h2c upgrade is ignored: the request is answered in HTTP/1.1.
            answer = await exchange(
                served.port, http_request("GET", "/health", headers=_H2C_UPGRADE)
            )
            assert answer.status == 200 and answer.body == b"OK", answer
            # Prior knowledge: the HTTP/2 way of saying "use HTTP/1.1", then the close.
            client = _h2_client()
            stream = await trio.open_tcp_stream("127.0.0.1", served.port)
            async with stream:
                await stream.send_all(_h2_request(client, "/health"))
                events = await _h2_read_until(stream, client, h2.events.ConnectionTerminated)
                assert await stream.receive_some(1024) == b""  # closed
            goaway = [e for e in events if isinstance(e, h2.events.ConnectionTerminated)]
            assert goaway and goaway[0].error_code == h2.errors.ErrorCodes.HTTP_1_1_REQUIRED
            assert not any(isinstance(e, h2.events.ResponseReceived) for e in events)
            await served.healthy()


def _h2_client() -> h2.connection.H2Connection:
    return h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))


def _h2_request(
    client: h2.connection.H2Connection, path: str, *, window: int | None = None
) -> bytes:
    """An HTTP/2 connection preface and one GET, as a prior-knowledge client sends them."""
    client.initiate_connection()
    if window is not None:
        client.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window})
    headers = [(":method", "GET"), (":path", path), (":scheme", "http"), (":authority", "x")]
    client.send_headers(1, headers, end_stream=True)
    return client.data_to_send()


async def _h2_read_until(
    stream: trio.abc.ReceiveStream, client: h2.connection.H2Connection, kind: type[object]
) -> list[h2.events.Event]:
    """Events received until one of ``kind`` (or the connection's end)."""
    events: list[h2.events.Event] = []
    while not any(isinstance(event, kind) for event in events):
        data = await stream.receive_some(65536)
        if not data:
            break
        events.extend(client.receive_data(data))
    return events


# --- slow and vanishing clients --------------------------------------------------------


async def test_a_client_trickling_its_request_does_not_block_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    body = json.dumps(chat("nope")).encode()
    request = http_request("POST", CHAT, body)
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            slow = await trio.open_tcp_stream("127.0.0.1", served.port)
            async with slow:
                # Headers and half the body a byte at a time, with others served in between.
                for index in range(len(request) - len(body) // 2):
                    await slow.send_all(request[index : index + 1])
                    if index % 40 == 0:
                        await served.healthy()
                        models = await served.client.get("/v1/models")
                        assert models.status_code == 200
                await slow.send_all(request[len(request) - len(body) // 2 :])
                answer = await read_answer(slow, b"POST")
            assert answer.status == 404, answer


async def test_clients_that_vanish_mid_body_mid_load_and_mid_stream_leave_nothing_behind(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(
        responder_model("stream", "--token-delay", "0.05"),
        responder_model("cold", "--startup-delay", "1.5"),
    )
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog, config) as served:
            harness = served.harness
            # Mid-body: half a declared body, then gone (JSON and multipart routes, admin too).
            for path in (CHAT, TRANSCRIBE, "/api/models/unload"):
                head = http_request("POST", path, b"x" * 1000)
                await _send_and_vanish(served.port, head[: len(head) - 500])
            # Mid-load: the model is starting when the client leaves.
            waiting = await trio.open_tcp_stream("127.0.0.1", served.port)
            await waiting.send_all(_json(json.dumps(chat("cold"))))
            await harness.wait_for_state("cold", "starting")
            await waiting.aclose()
            # Mid-stream: the first event arrived, then the client is gone.
            streaming = await trio.open_tcp_stream("127.0.0.1", served.port)
            await streaming.send_all(_json(json.dumps(chat("stream", stream=True, max_tokens=500))))
            received = b""
            while b"data: " not in received:
                received += await streaming.receive_some(4096)
            await streaming.aclose()
            # Mid-stream on the admin side: a log stream and the UI's event feed.
            for path in ("/logs/stream", "/api/events"):
                follower = await trio.open_tcp_stream("127.0.0.1", served.port)
                await follower.send_all(http_request("GET", path))
                await follower.receive_some(4096)
                await follower.aclose()
            await harness.client.aclose()  # its keep-alive connection would count
            await wait_for(lambda: _connection_tasks() == 0, what="every handler to end")
            # Nothing was lost: both models serve.
            for model in ("cold", "stream"):
                response = await served.client.post(CHAT, json=chat(model, max_tokens=3))
                assert response.status_code == 200, response.text


async def _send_and_vanish(port: int, data: bytes) -> None:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(data)


# --- shutdown --------------------------------------------------------------------------
# These run ``trio-swap serve`` as a process: a shutdown that hangs in a shielded write
# cannot be cancelled in-process, but a process can be killed, so the test fails cleanly.


@dataclass
class CliServer:
    process: trio.Process
    port: int
    output: bytes = b""

    async def read_until(self, text: bytes) -> None:
        """Read the process's output until ``text`` appears in it."""
        assert self.process.stdout is not None
        while text not in self.output:
            chunk = await self.process.stdout.receive_some(65536)
            assert chunk, f"no {text!r} in the output:\n{self.text}"
            self.output += chunk

    @property
    def text(self) -> str:
        return self.output.decode(errors="replace")

    async def upstream_pid(self) -> int:
        async with httpx.AsyncClient() as client:
            rows = (await client.get(f"http://127.0.0.1:{self.port}/api/models")).json()
        (pid,) = [row["pid"] for row in rows["models"] if row["pid"]]
        assert isinstance(pid, int)
        return pid

    async def exit_code(self) -> int:
        """Wait for the process to end; its whole output is read (a pipe must not fill)."""
        assert self.process.stdout is not None
        while chunk := await self.process.stdout.receive_some(65536):
            self.output += chunk
        return await self.process.wait()


@asynccontextmanager
async def cli_server(tmp_path: Path, *args: str) -> AsyncIterator[CliServer]:
    """``trio-swap serve`` with one responder model ``m``; killed (group) if still running."""
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"healthCheckTimeout: 30\nstartPort: {port + 1}\nmodels:\n  m:\n"
        f"    cmd: {sys.executable} -m trio_swap responder --port ${{PORT}} --model m\n"
    )
    argv = [sys.executable, "-m", "trio_swap", "serve", "--config", str(config),
            "--listen", f"127.0.0.1:{port}", *args]  # fmt: skip
    process = await trio.lowlevel.open_process(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    server = CliServer(process, port)
    try:
        await server.read_until(b"serving 1 models")
        yield server
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
            assert process.stdout is not None
            await process.stdout.aclose()
    assert "Traceback" not in server.text and "[ERROR]" not in server.text, server.text


async def _stalled_stream(port: int) -> trio.SocketStream:
    """A client that asked for a long stream and stopped reading after its first bytes."""
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect(("127.0.0.1", port))
    stream = trio.SocketStream(sock)
    await stream.send_all(_json(json.dumps(chat("m", stream=True, max_tokens=10_000_000))))
    await stream.receive_some(1024)
    return stream


async def test_shutdown_cuts_a_client_that_stopped_reading(tmp_path: Path) -> None:
    """Regression: hypercorn writes under a shield, so a client that stopped reading held
    the drain (and so trio-swap's exit) forever; now it is cut at the drain deadline."""
    with trio.fail_after(TEST_LIMIT):
        async with cli_server(tmp_path, "--shutdown-timeout", "1") as server:
            stalled = await _stalled_stream(server.port)
            pid = await server.upstream_pid()
            server.process.send_signal(signal.SIGTERM)
            assert await server.exit_code() == 0, server.text
            await stalled.aclose()
            assert "cutting 1 HTTP connection" in server.text
            assert not alive(pid)


async def test_shutdown_cuts_an_http2_client_that_never_opens_its_window(tmp_path: Path) -> None:
    """Regression: with h2c on, a log stream to a client whose flow-control window stays 0
    held shutdown forever (the shielded last send waited for the window)."""
    with trio.fail_after(TEST_LIMIT):
        async with cli_server(tmp_path, "--h2c", "--shutdown-timeout", "1") as server:
            client = _h2_client()
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            await stream.send_all(_h2_request(client, "/logs/stream", window=0))
            # h2c was asked for, so it is served.
            await _h2_read_until(stream, client, h2.events.ResponseReceived)
            server.process.send_signal(signal.SIGTERM)
            assert await server.exit_code() == 0, server.text
            await stream.aclose()


async def test_a_second_sigterm_ends_a_shutdown_stuck_on_clients_at_once(tmp_path: Path) -> None:
    """Regression: the second SIGTERM cancelled every task, but hypercorn's shielded write
    to a client that stopped reading kept trio-swap alive; now it cuts the connections."""
    with trio.fail_after(TEST_LIMIT):
        async with cli_server(tmp_path, "--shutdown-timeout", "600") as server:
            stalled = await _stalled_stream(server.port)
            pid = await server.upstream_pid()
            server.process.send_signal(signal.SIGTERM)
            await server.read_until(b"draining HTTP")  # the drain could last 600 s
            server.process.send_signal(signal.SIGTERM)
            assert await server.exit_code() == 0, server.text
            await stalled.aclose()
            assert not alive(pid)


# --- afterwards --------------------------------------------------------------------------


async def test_the_server_serves_normally_after_a_barrage(caplog: pytest.LogCaptureFixture) -> None:
    """A mixed barrage over concurrent connections, then ordinary requests still work."""
    requests: list[bytes] = [
        b"HELLO\r\n\r\n",
        _json("["),
        _upload(b"--b\r\n" * 10_000),
        http_request("GET", "/upstream/%00/x"),
        http_request("GET", "/v1/chat/completions", headers=_WEBSOCKET),
        _PREFACE + b"\x00" * 30,
        http_request("POST", "/props", b""),
    ] * 10
    with trio.fail_after(TEST_LIMIT):
        async with serving(caplog) as served:
            statuses: list[int | None] = []

            async def one(request: bytes) -> None:
                statuses.append((await exchange(served.port, request)).status)

            async with trio.open_nursery() as nursery:
                for request in requests:
                    nursery.start_soon(one, request)
            assert all(s is None or 400 <= s < 500 for s in statuses), statuses
            response = await served.client.post(CHAT, json=chat("m", max_tokens=3))
            assert response.status_code == 200, response.text
            response = await served.client.post(CHAT, json=chat("renamed", max_tokens=3))
            assert response.status_code == 200 and response.json()["model"] == "real"
