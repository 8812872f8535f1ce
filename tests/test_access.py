"""``apiKeys`` and CORS (``trio_swap.http.access``), as an HTTP client sees them.

Two parts:

* The middleware alone, wrapped around a tiny inner ASGI app that echoes the
  request it received, served by a real hypercorn on a free loopback port.
* End to end (``test_e2e_*``): trio-swap itself (``running()``) with
  ``apiKeys`` set, in front of a real responder model; ``server.py`` wraps its
  whole ASGI app in ``AccessControl(app, api_keys=config.api_keys)``.
"""

from __future__ import annotations

import base64
import hmac
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import anthropic
import httpx
import msgspec
import openai
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from tests.conftest import chat, make_config, responder_model, running
from trio_swap.config.model import Config
from trio_swap.http.access import (
    BAD_KEY,
    DEFAULT_ALLOW_HEADERS,
    NO_KEY,
    NO_WEBSOCKETS,
    AccessControl,
)

KEYS = ("key-one", "key-two", "key-three")

# ---------------------------------------------------------------------------
# The middleware around an echo app, over real HTTP
# ---------------------------------------------------------------------------


class Echo:
    """Inner ASGI app: answers every request with what it received, as JSON.

    ``/v1/embeddings`` answers 429 with ``Retry-After``; ``/v1/completions`` sets
    its own ``Access-Control-Allow-Origin`` (as a proxied llama-server does).
    """

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.lifespan: list[str] = []

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                self.lifespan.append(message["type"])
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] == "websocket":
            self.seen.append(f"websocket {scope['path']}")
            await receive()  # websocket.connect
            await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
            await send({"type": "websocket.close", "code": 1000, "reason": None})
            return
        assert scope["type"] == "http"
        self.seen.append(f"{scope['method']} {scope['path']}")
        body = b""
        more = True
        while more:
            message = await receive()
            assert message["type"] == "http.request"
            body += message.get("body", b"")
            more = message.get("more_body", False)
        payload = msgspec.json.encode(
            {
                "method": scope["method"],
                "path": scope["path"],
                "headers": [[k.decode(), v.decode()] for k, v in scope["headers"]],
                "body": body.decode(),
            }
        )
        status = 429 if scope["path"] == "/v1/embeddings" else 200
        headers = [(b"content-type", b"application/json")]
        if status == 429:
            headers.append((b"retry-after", b"1"))
        if scope["path"] == "/v1/completions":
            headers.append((b"access-control-allow-origin", b"https://app.example"))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload, "more_body": False})


@asynccontextmanager
async def serve_asgi(app: AccessControl) -> AsyncIterator[httpx.AsyncClient]:
    """Serve ``app`` with hypercorn on a free loopback port; a client for it."""
    config = HypercornConfig()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.graceful_timeout = 1
    stop = trio.Event()
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait)
            )
            try:
                async with httpx.AsyncClient(base_url=binds[0], timeout=10) as client:
                    yield client
            finally:
                stop.set()


@asynccontextmanager
async def guarded(keys: tuple[str, ...] = KEYS) -> AsyncIterator[tuple[httpx.AsyncClient, Echo]]:
    echo = Echo()
    async with serve_asgi(AccessControl(echo, api_keys=keys)) as client:
        yield client, echo


def assert_401(response: httpx.Response, message: str) -> None:
    assert response.status_code == 401, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"] == 'Basic realm="trio-swap"'
    assert response.json() == {
        "error": {"message": message, "type": "authentication_error", "code": "invalid_api_key"}
    }


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer key-one"},
        {"Authorization": "bearer key-three"},  # the scheme is case-insensitive
        {"x-api-key": "key-two"},
        {"Authorization": basic("anyone", "key-two")},
        {"Authorization": basic("", "key-one")},
        # a malformed Authorization falls through to x-api-key
        {"Authorization": "Basic !!not-base64!!", "x-api-key": "key-one"},
        {"Authorization": "Token key-one", "x-api-key": "key-one"},
    ],
    ids=["bearer", "bearer-lowercase", "x-api-key", "basic", "basic-no-user", "bad-basic", "other"],
)
async def test_a_valid_key_is_accepted_and_passed_on_unchanged(headers: dict[str, str]) -> None:
    async with guarded() as (client, echo):
        response = await client.post("/v1/chat/completions", json=chat("A"), headers=headers)
        assert response.status_code == 200, response.text
        assert echo.seen == ["POST /v1/chat/completions"]
        received = response.json()
        assert json.loads(received["body"]) == chat("A")
        # the key headers reach the inner app (and so the upstream) byte for byte
        for name, value in headers.items():
            assert [name.lower(), value] in received["headers"]


async def test_a_missing_key_gets_401_and_the_app_is_not_called() -> None:
    async with guarded() as (client, echo):
        for method, path in [
            ("POST", "/v1/chat/completions"),
            ("GET", "/v1/models"),
            ("GET", "/api/models"),
            ("POST", "/api/models/unload"),
            ("GET", "/running"),
            ("GET", "/logs/stream"),
            ("GET", "/upstream/A/props"),
            ("POST", "/"),  # only GET and HEAD of / are open
            ("GET", "/health/../v1/models"),  # exact paths only
            ("GET", "/healthz"),
        ]:
            response = await client.request(method, path, content=b'{"model": "A"}')
            assert_401(response, NO_KEY)
        assert echo.seen == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Token key-one"},  # a scheme that carries no key
        {"Authorization": "Bearer"},
        {"Authorization": basic("key-one", "")},  # the key is the password, not the user
        {"Authorization": "Basic a2V5LW9uZQ=="},  # base64 "key-one": no colon
        {"x-api-key": ""},
    ],
    ids=["unknown-scheme", "empty-bearer", "user-only", "no-colon", "empty-x-api-key"],
)
async def test_credentials_without_a_key_count_as_missing(headers: dict[str, str]) -> None:
    async with guarded() as (client, echo):
        assert_401(await client.get("/v1/models", headers=headers), NO_KEY)
        assert echo.seen == []


@pytest.mark.parametrize(
    "headers",
    [
        {"Authorization": "Bearer wrong"},
        {"x-api-key": "KEY-ONE"},
        {"Authorization": basic("u", "key-one ")},
        {"Authorization": "Bearer key-on"},  # a prefix of a key
        {"Authorization": "Bearer key-one-and-more"},
        # the first key found wins: Basic, then Bearer, then x-api-key
        {"Authorization": "Bearer wrong", "x-api-key": "key-one"},
        {"Authorization": basic("u", "wrong"), "x-api-key": "key-one"},
    ],
    ids=["bearer", "case", "trailing-space", "prefix", "longer", "bearer-first", "basic-first"],
)
async def test_a_wrong_key_gets_401_without_echoing_it(headers: dict[str, str]) -> None:
    async with guarded() as (client, echo):
        response = await client.post("/v1/chat/completions", json=chat("A"), headers=headers)
        assert_401(response, BAD_KEY)
        assert "wrong" not in response.text and "key-" not in response.text
        assert echo.seen == []


async def test_anthropic_clients_get_anthropics_error_shape() -> None:
    async with guarded() as (client, _):
        for path in ("/v1/messages", "/v1/messages/count_tokens"):
            response = await client.post(path, json={"model": "A"}, headers={"x-api-key": "no"})
            assert response.status_code == 401
            assert response.headers["www-authenticate"] == 'Basic realm="trio-swap"'
            assert response.json() == {
                "type": "error",
                "error": {"type": "authentication_error", "message": BAD_KEY},
            }


async def test_health_and_the_root_page_are_open() -> None:
    async with guarded() as (client, echo):
        for method, path in [
            ("GET", "/health"),
            ("POST", "/health"),
            ("GET", "/wol-health"),
            ("GET", "/"),
            ("HEAD", "/"),
        ]:
            response = await client.request(method, path)
            assert response.status_code == 200, (method, path)
        assert echo.seen == ["GET /health", "POST /health", "GET /wol-health", "GET /", "HEAD /"]
        # a wrong key on an open path is not held against the request
        assert (await client.get("/health", headers={"x-api-key": "wrong"})).status_code == 200


async def test_every_configured_key_is_compared_with_compare_digest(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No early exit: a match on the first key still compares all of them, in constant time."""
    real = hmac.compare_digest
    calls: list[tuple[int, int]] = []

    def counting(a: bytes, b: bytes) -> bool:
        assert isinstance(a, bytes) and isinstance(b, bytes)
        calls.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    async with guarded() as (client, _):
        for key, status in [("key-one", 200), ("key-three", 200), ("nope", 401), ("x" * 500, 401)]:
            calls.clear()
            response = await client.get("/v1/models", headers={"x-api-key": key})
            assert response.status_code == status
            assert len(calls) == len(KEYS), key
            # digests: every comparison has the same length, whatever the key's
            assert set(calls) == {(32, 32)}
        calls.clear()
        assert (await client.get("/v1/models")).status_code == 401  # no key: nothing to compare
        assert (await client.get("/health")).status_code == 200  # open: nothing compared
        assert calls == []


async def test_preflight_is_answered_without_a_key() -> None:
    async with guarded() as (client, echo):
        response = await client.options(
            "/v1/chat/completions",
            headers={
                "Origin": "https://app.example",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
            },
        )
        assert response.status_code == 204
        assert response.content == b""
        assert response.headers["access-control-allow-origin"] == "*"
        assert (
            response.headers["access-control-allow-methods"]
            == "GET, POST, PUT, PATCH, DELETE, OPTIONS"
        )
        assert (
            response.headers["access-control-allow-headers"]
            == "authorization, content-type, x-stainless-os"
        )
        assert response.headers["access-control-max-age"] == "86400"
        assert "access-control-allow-credentials" not in response.headers
        # any OPTIONS, any path, with or without Origin
        response = await client.options("/anything/at/all")
        assert response.status_code == 204
        assert response.headers["access-control-allow-headers"] == DEFAULT_ALLOW_HEADERS
        assert echo.seen == []


@pytest.mark.parametrize(
    ("requested", "allowed"),
    [
        (b"x-ok, bad header, a(b), ok_2,, ,x~y", "x-ok, ok_2, x~y"),
        ("évil, x\\y, {x}, a:b".encode(), DEFAULT_ALLOW_HEADERS),  # none valid: the default
        (b"", DEFAULT_ALLOW_HEADERS),
    ],
    ids=["some-valid", "none-valid", "empty"],
)
async def test_preflight_allows_only_valid_header_names(requested: bytes, allowed: str) -> None:
    async with guarded() as (client, _):
        response = await client.options(
            "/v1/models",
            headers=[
                (b"origin", b"https://app.example"),
                (b"access-control-request-headers", requested),
            ],
        )
        assert response.status_code == 204
        assert response.headers["access-control-allow-headers"] == allowed


async def test_preflight_needs_no_keys_configured_either() -> None:
    async with guarded(keys=()) as (client, echo):
        response = await client.options("/v1/models", headers={"Origin": "https://a.example"})
        assert response.status_code == 204
        assert response.headers["access-control-allow-origin"] == "*"
        assert echo.seen == []


@pytest.mark.parametrize("keys", [KEYS, ()], ids=["keys", "no-keys"])
async def test_responses_to_a_browser_carry_cors_headers(keys: tuple[str, ...]) -> None:
    origin = {"Origin": "https://app.example"}
    async with guarded(keys) as (client, _):
        ok = await client.get("/v1/models", headers={**origin, "x-api-key": "key-one"})
        assert ok.status_code == 200
        assert ok.headers["access-control-allow-origin"] == "*"
        assert ok.headers["access-control-expose-headers"] == "Retry-After"
        limited = await client.get("/v1/embeddings", headers={**origin, "x-api-key": "key-one"})
        assert limited.status_code == 429
        assert limited.headers["retry-after"] == "1"
        assert limited.headers["access-control-allow-origin"] == "*"
        # no Origin: not a browser, no CORS headers
        plain = await client.get("/v1/models", headers={"x-api-key": "key-one"})
        assert plain.status_code == 200
        assert "access-control-allow-origin" not in plain.headers
        assert "access-control-expose-headers" not in plain.headers
        # a header the app set itself is kept, not doubled
        own = await client.get("/v1/completions", headers={**origin, "x-api-key": "key-one"})
        assert own.headers.get_list("access-control-allow-origin") == ["https://app.example"]
        assert own.headers["access-control-expose-headers"] == "Retry-After"
        # admin and log routes are never readable by another site's page
        admin = await client.get("/logs", headers={**origin, "x-api-key": "key-one"})
        assert admin.status_code == 200
        assert "access-control-allow-origin" not in admin.headers


@pytest.mark.parametrize("keys", [KEYS, ()], ids=["keys", "no-keys"])
async def test_another_sites_page_cannot_call_admin_routes(keys: tuple[str, ...]) -> None:
    cross = {
        "Origin": "https://evil.example",
        "Sec-Fetch-Site": "cross-site",
        "x-api-key": "key-one",
    }
    async with guarded(keys) as (client, echo):
        for path in ("/api/models/unload", "/unload", "/upstream/A/slots"):
            refused = await client.post(path, headers=cross, content=b"x" * 10)
            assert refused.status_code == 403, path
            assert refused.json()["error"]["code"] == "forbidden"
            assert "access-control-allow-origin" not in refused.headers
        # another port of the same host is another origin too
        same_site = {**cross, "Sec-Fetch-Site": "same-site"}
        assert (await client.post("/api/config/reload", headers=same_site)).status_code == 403
        assert echo.seen == []
        # a link from another site may open the web UI (its files hold no data)
        assert (await client.get("/ui/", headers=cross)).status_code == 200
        # the same requests from the page's own origin, or from a script, pass
        same = {**cross, "Sec-Fetch-Site": "same-origin"}
        assert (await client.post("/api/models/unload", headers=same)).status_code == 200
        allowed = await client.post("/v1/chat/completions", headers=cross, json={})
        assert allowed.status_code == 200
        assert allowed.headers["access-control-allow-origin"] == "*"


async def test_a_browser_can_read_a_401() -> None:
    async with guarded() as (client, _):
        response = await client.get("/v1/models", headers={"Origin": "https://app.example"})
        assert_401(response, NO_KEY)
        assert response.headers["access-control-allow-origin"] == "*"
        assert response.headers["access-control-expose-headers"] == "Retry-After"


async def test_with_no_keys_nothing_is_required() -> None:
    async with guarded(keys=()) as (client, echo):
        for method, path in [("POST", "/v1/chat/completions"), ("GET", "/api/models")]:
            response = await client.request(method, path, headers={"x-api-key": "anything"})
            assert response.status_code == 200
            assert "access-control-allow-origin" not in response.headers
        assert (await client.get("/v1/models")).status_code == 200
        assert echo.seen == ["POST /v1/chat/completions", "GET /api/models", "GET /v1/models"]


async def test_a_401_leaves_the_connection_usable() -> None:
    """A refused POST's body is drained, so the next request on the connection works."""
    async with guarded() as (client, _):
        for _ in range(5):
            refused = await client.post("/v1/chat/completions", content=b"x" * 200_000)
            assert refused.status_code == 401
            assert "connection" not in refused.headers
            accepted = await client.post(
                "/v1/chat/completions", content=b"y" * 1000, headers={"x-api-key": "key-two"}
            )
            assert accepted.status_code == 200
            assert accepted.json()["body"] == "y" * 1000


class _HugeBody:
    """A 4 MiB chunked body (a class, not an async generator: httpx stops reading it when
    the refusal arrives, and an unfinished generator warns when it is collected)."""

    def __init__(self) -> None:
        self.left = 64

    def __aiter__(self) -> _HugeBody:
        return self

    async def __anext__(self) -> bytes:
        if not self.left:
            raise StopAsyncIteration
        self.left -= 1
        return b"z" * 65536


async def test_a_401_to_a_huge_body_closes_the_connection() -> None:
    """Past 256 KiB the body is not read: the 401 says Connection: close, nothing breaks."""
    async with guarded() as (client, _):
        for _ in range(3):
            refused = await client.post("/v1/chat/completions", content=_HugeBody())
            assert_401(refused, NO_KEY)
            assert refused.headers["connection"] == "close"
            accepted = await client.get("/v1/models", headers={"x-api-key": "key-one"})
            assert accepted.status_code == 200


async def test_a_refusal_reads_no_body_that_is_declared_huge_or_awaits_100_continue() -> None:
    """A body the client only announces (a large Content-Length, or Expect:
    100-continue) is never waited for: the refusal comes at once, with Connection:
    close, though the client sends no body."""
    async with guarded() as (client, echo):
        url = httpx.URL(str(client.base_url))
        assert url.port is not None
        for extra in (
            b"Content-Length: 999999999\r\n",
            b"Expect: 100-continue\r\nContent-Length: 10\r\n",
        ):
            stream = await trio.open_tcp_stream(url.host, url.port)
            async with stream:
                await stream.send_all(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n" + extra + b"\r\n"
                )
                answer = b""
                while chunk := await stream.receive_some(65536):
                    answer += chunk
            final = answer[answer.rfind(b"HTTP/1.1 ") :]  # after hypercorn's own 100
            assert final.startswith(b"HTTP/1.1 401"), answer
            assert b"connection: close" in final.lower(), answer
        assert echo.seen == []


async def _websocket_handshake(
    url: str, path: str, extra: str = "", *, host_header: str | None = None
) -> str:
    """Send a websocket upgrade by hand; the server's response head."""
    host, port = httpx.URL(url).host, httpx.URL(url).port
    assert port is not None
    stream = await trio.open_tcp_stream(host, port)
    authority = host_header if host_header is not None else f"{host}:{port}"
    async with stream:
        await stream.send_all(
            (
                f"GET {path} HTTP/1.1\r\nHost: {authority}\r\nUpgrade: websocket\r\n"
                "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\n{extra}\r\n"
            ).encode()
        )
        received = b""
        while b"\r\n\r\n" not in received or not _complete(received):
            chunk = await stream.receive_some(4096)
            if not chunk:
                break
            received += chunk
        return received.decode("latin-1")


def _complete(response: bytes) -> bool:
    """The head is in, and as much body as its Content-Length says."""
    head, _, body = response.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
    return length is None or len(body) >= int(length.group(1))


async def test_websockets_pass_the_key_check_and_only_model_routes_go_on() -> None:
    """A missing key is a 401; with a valid one a model route's upgrade reaches the inner
    app (the websocket proxy), any other path gets 400. Lifespan passes through."""
    async with guarded() as (client, echo):
        url = str(client.base_url)
        refused = await _websocket_handshake(url, "/upstream/A/ws")
        assert refused.startswith("HTTP/1.1 401"), refused
        assert 'www-authenticate: basic realm="trio-swap"' in refused.lower()
        keyed = await _websocket_handshake(url, "/upstream/A/ws", "x-api-key: key-two\r\n")
        assert keyed.startswith("HTTP/1.1 101"), keyed
        elsewhere = await _websocket_handshake(url, "/logs/stream", "x-api-key: key-two\r\n")
        assert elsewhere.startswith("HTTP/1.1 400"), elsewhere
        assert NO_WEBSOCKETS in elsewhere
        assert echo.seen == ["websocket /upstream/A/ws"]
    assert echo.lifespan == ["lifespan.startup", "lifespan.shutdown"]


async def test_websockets_without_keys_go_on_only_on_model_routes() -> None:
    """Regression: a websocket upgrade reached Quart, whose 404 handler raised (a 500)."""
    echo = Echo()
    async with serve_asgi(AccessControl(echo)) as client:
        for path in ("/logs/stream", "/health", "/api/events"):
            refused = await _websocket_handshake(str(client.base_url), path)
            assert refused.startswith("HTTP/1.1 400"), refused
            assert NO_WEBSOCKETS in refused
        accepted = await _websocket_handshake(str(client.base_url), "/v1/chat/completions")
        assert accepted.startswith("HTTP/1.1 101"), accepted
    assert echo.seen == ["websocket /v1/chat/completions"]


async def test_a_websocket_with_a_foreign_host_is_refused_before_the_key() -> None:
    """DNS rebinding: a page's websocket carries the attacker's Host too."""
    async with guarded() as (client, echo):
        for extra in ("", "x-api-key: key-two\r\n"):
            refused = await _websocket_handshake(
                str(client.base_url), "/upstream/A/ws", extra, host_header="attacker.example:8080"
            )
            assert refused.startswith("HTTP/1.1 403"), refused
            assert "host_not_allowed" in refused
        assert echo.seen == []


async def test_a_websocket_is_closed_with_1008_where_no_401_can_be_sent() -> None:
    """Servers without the websocket.http.response extension get a policy-violation close."""
    sent: list[dict[str, object]] = []

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    async def receive() -> dict[str, object]:
        raise AssertionError("the middleware needs nothing from the client to refuse")

    async def inner(scope: Scope, receive: object, send: object) -> None:
        raise AssertionError("must not be called")

    scope = {"type": "websocket", "path": "/x", "headers": [(b"x-api-key", b"bad")]}
    await AccessControl(inner, api_keys=KEYS)(scope, receive, send)  # type: ignore[arg-type]
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": BAD_KEY}]


# ---------------------------------------------------------------------------
# End to end: trio-swap with apiKeys in front of a real responder model
# ---------------------------------------------------------------------------


E2E_KEYS = ("k-alpha", "k-beta")


def keyed_config() -> Config:
    return msgspec.structs.replace(make_config(responder_model("A")), api_keys=E2E_KEYS)


async def test_e2e_every_route_family_needs_a_key() -> None:
    with trio.fail_after(60):
        async with running(keyed_config()) as h:
            routes = [
                ("POST", "/v1/chat/completions", chat("A")),
                ("POST", "/v1/embeddings", {"model": "A", "input": "x"}),
                ("GET", "/props?model=A", None),
                ("GET", "/upstream/A/v1/models", None),
                ("GET", "/v1/models", None),
                ("GET", "/api/models", None),
                ("GET", "/running", None),
                ("GET", "/logs", None),
                ("POST", "/api/models/unload", None),
            ]
            for method, path, body in routes:
                missing = await h.client.request(method, path, json=body)
                assert_401(missing, NO_KEY)
                wrong = await h.client.request(
                    method, path, json=body, headers={"Authorization": "Bearer k-gamma"}
                )
                assert_401(wrong, BAD_KEY)
            # nothing got through: A was never started
            assert h.server.processes["A"].start_count == 0
            for method, path, body in routes:
                for headers in (
                    {"Authorization": "Bearer k-alpha"},
                    {"x-api-key": "k-beta"},
                    {"Authorization": basic("me", "k-alpha")},
                ):
                    response = await h.client.request(method, path, json=body, headers=headers)
                    assert response.status_code == 200, (method, path, response.text)
            assert (await h.client.get("/health")).status_code == 200


async def test_e2e_key_headers_reach_the_upstream_unchanged() -> None:
    with trio.fail_after(60):
        async with running(keyed_config()) as h:
            sent = [
                {"Authorization": "Bearer k-alpha"},
                {"x-api-key": "k-beta"},
                {"Authorization": basic("me", "k-beta"), "x-api-key": "ignored-extra"},
            ]
            for headers in sent:
                response = await h.client.post(
                    "/v1/chat/completions", json=chat("A"), headers=headers
                )
                assert response.status_code == 200, response.text
            proxy = h.server.processes["A"].model.proxy
            records = (await h.client.get(f"{proxy}/debug/requests")).json()
            chats = [r for r in records if r["path"] == "/v1/chat/completions"]
            assert len(chats) == len(sent)
            for record, headers in zip(chats, sent, strict=True):
                for name, value in headers.items():
                    assert record["headers"][name.lower()] == value


async def test_e2e_sdks_send_their_keys() -> None:
    """The OpenAI SDK sends ``Authorization: Bearer``, the Anthropic SDK ``x-api-key``."""
    with trio.fail_after(60):
        async with running(keyed_config()) as h:
            base = h.server.url

            def openai_story() -> tuple[list[str], str]:
                with (
                    openai.OpenAI(base_url=base + "/v1", api_key="k-beta", max_retries=0) as good,
                    openai.OpenAI(base_url=base + "/v1", api_key="k-nope", max_retries=0) as bad,
                ):
                    ids = [m.id for m in good.models.list()]
                    reply = good.chat.completions.create(
                        model="A", messages=[{"role": "user", "content": "hi"}]
                    )
                    try:
                        bad.models.list()
                    except openai.AuthenticationError as exc:
                        return ids, f"{reply.model} {exc.status_code} {exc.body}"
                raise AssertionError("a wrong key was accepted")

            ids, outcome = await trio.to_thread.run_sync(openai_story)
            assert ids == ["A"]
            assert outcome.startswith("A 401 ")
            assert BAD_KEY in outcome

            def anthropic_refused() -> anthropic.AuthenticationError:
                with anthropic.Anthropic(base_url=base, api_key="k-nope", max_retries=0) as client:
                    try:
                        client.messages.create(
                            model="A", max_tokens=8, messages=[{"role": "user", "content": "hi"}]
                        )
                    except anthropic.AuthenticationError as exc:
                        return exc
                raise AssertionError("a wrong key was accepted")

            error = await trio.to_thread.run_sync(anthropic_refused)
            assert error.status_code == 401
            assert error.body == {
                "type": "error",
                "error": {"type": "authentication_error", "message": BAD_KEY},
            }


async def test_e2e_cors_and_open_paths() -> None:
    with trio.fail_after(60):
        async with running(keyed_config()) as h:
            assert (await h.client.get("/health")).status_code == 200
            preflight = await h.client.options(
                "/v1/chat/completions",
                headers={
                    "Origin": "https://app.example",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "authorization,content-type",
                },
            )
            assert preflight.status_code == 204
            assert preflight.headers["access-control-allow-origin"] == "*"
            assert (
                preflight.headers["access-control-allow-headers"] == "authorization, content-type"
            )
            browser = {"Origin": "https://app.example", "Authorization": "Bearer k-alpha"}
            response = await h.client.post("/v1/chat/completions", json=chat("A"), headers=browser)
            assert response.status_code == 200
            assert response.headers.get_list("access-control-allow-origin") in (
                ["*"],
                ["https://app.example"],  # an upstream's own header wins
            )
            refused = await h.client.get("/v1/models", headers={"Origin": "https://app.example"})
            assert refused.status_code == 401
            assert refused.headers["access-control-allow-origin"] == "*"


async def test_e2e_without_api_keys_nothing_is_required() -> None:
    with trio.fail_after(60):
        async with running(make_config(responder_model("A"))) as h:
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).status_code == 200
            assert (await h.client.get("/v1/models")).status_code == 200
            assert (await h.client.post("/api/models/unload")).status_code == 200
