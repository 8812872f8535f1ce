"""Tests for peers: the ``peers:`` config, peer name resolution, and the forwarder.

Config tests load YAML through the public loader, as ``test_config.py`` does:
error tests assert the file, the exact key path and the 1-based line (config
texts start on the line after the opening quotes, so line 1 is their first
line).

Forwarder tests send real HTTP to a real responder subprocess (or, for a
body cut short, a scripted TCP peer) and collect what
:meth:`PeerForwarder.forward` hands to ASGI ``send``; one test serves the
forwarder with hypercorn and reads it with httpx. Every test that talks to a
process has an absolute limit (``fail_after``); no assert depends on timing.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Final

import httpx
import msgspec
import pytest
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve as hypercorn_serve
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

from tests.conftest import free_port
from tests.test_config import assert_error, fails, load
from tests.test_responder import Responder, run_responder
from trio_swap.config import Config, load_config_text
from trio_swap.config.model import FilterConfig, ModelConfig, PeerConfig
from trio_swap.errors import PeerFailed, error_style
from trio_swap.http.peers import PeerForwarder

TIMEOUT: Final = 15.0
CHAT: Final = b"/v1/chat/completions"


# --- config helpers ----------------------------------------------------------------------


# write, load, fails and assert_error: shared with tests/test_config.py (imported above).


# --- config: good files ------------------------------------------------------------------


def test_peers_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TS_GPU2_KEY", "sk-gpu2")
    config = load(
        tmp_path,
        """\
        macros:
          or_key: sk-or-123
          temp: 0.6
        models:
          local:
            cmd: s ${PORT}
        peers:
          gpu2:
            proxy: http://10.0.0.2:8080/
            apiKey: ${env.TS_GPU2_KEY}
            models: [qwen-32b, org/llama, qwen-32b]
            filters:
              stripParams: "top_k, model"
              setParams: {temperature: "${temp}", model: nope}
              setParamsByID:
                gpu2/qwen-32b: {reasoning: high}
                qwen-32b: {reasoning: low}
            timeouts:
              connect: 5
              responseHeader: 90
          openrouter:
            proxy: https://openrouter.ai/api
            apiKey: "${or_key}"
            models: [deepseek/deepseek-r1]
        """,
    )
    assert config.warnings == ()
    gpu2 = config.peers["gpu2"]
    assert gpu2 == PeerConfig(
        id="gpu2",
        proxy="http://10.0.0.2:8080",
        api_key="sk-gpu2",
        models=("qwen-32b", "org/llama"),
        filters=FilterConfig(
            strip_params=("top_k",),
            set_params={"temperature": 0.6},
            set_params_by_id={
                "gpu2/qwen-32b": {"reasoning": "high"},
                "qwen-32b": {"reasoning": "low"},
            },
        ),
        connect_timeout=5.0,
        response_header_timeout=90.0,
    )
    router = config.peers["openrouter"]
    assert (router.proxy, router.api_key, router.models) == (
        "https://openrouter.ai/api",
        "sk-or-123",
        ("deepseek/deepseek-r1",),
    )
    assert (router.filters, router.connect_timeout, router.response_header_timeout) == (
        FilterConfig(),
        30.0,
        0.0,
    )
    assert list(config.peers) == ["gpu2", "openrouter"]
    assert config.resolve_peer("openrouter/deepseek/deepseek-r1") == (
        "openrouter",
        "deepseek/deepseek-r1",
    )


def test_no_peers_by_default(tmp_path: Path) -> None:
    config = load(tmp_path, "models: {}\n")
    assert (config.peers, config.peer_names) == ({}, {})
    assert config.resolve_peer("anything") is None


def test_env_in_api_key_with_explicit_environ() -> None:
    text = "peers:\n  p:\n    proxy: http://h\n    apiKey: 'k-${env.K}'\n    models: [m]\n"
    config = load_config_text(text, "<string>", environ={"K": "it's"})
    assert config.peers["p"].api_key == "k-it's"


def test_unset_env_in_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TS_NOT_SET", raising=False)
    err = fails(
        tmp_path,
        """\
        peers:
          gpu2:
            proxy: http://h
            apiKey: ${env.TS_NOT_SET}
            models: [m]
        """,
    )
    assert_error(err, "peers.gpu2.apiKey", 4, "environment variable 'TS_NOT_SET' is not set")


def test_peer_warnings(tmp_path: Path) -> None:
    config = load(
        tmp_path,
        """\
        peers:
          gpu2:
            proxy: http://h
            models: [m]
            timeouts:
              keepalive: 30
              tlsHandshake: 10
              connect: 3
            modles: [x]
            filters:
              setParamsByID:
                m: {a: 1}
                other: {a: 2}
        """,
    )
    source = str(tmp_path / "config.yaml")
    assert config.warnings == (
        f"{source}:9: peers.gpu2.modles: unknown key (did you mean 'models'?); ignored",
        f"{source}:13: peers.gpu2.filters.setParamsByID.other: not a name of this peer's "
        "models ('gpu2/<model>' or a bare model it lists), so it never applies; ignored",
    )
    peer = config.peers["gpu2"]
    assert peer.connect_timeout == 3.0
    assert peer.filters.set_params_by_id == {"m": {"a": 1}}


def test_json_schema_names_peer_keys() -> None:
    from trio_swap.config.schema import json_schema

    text = repr(json_schema())
    for key in ("peers", "apiKey", "responseHeader"):
        assert key in text


# --- config: errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "key_path", "line", "fragment"),
    [
        pytest.param(
            """\
            peers:
              gpu2:
                models: [m]
            """,
            "peers.gpu2.proxy",
            2,
            "required key is missing",
            id="proxy-missing",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: 10.0.0.2:8080
                models: [m]
            """,
            "peers.gpu2.proxy",
            3,
            "must be an http:// or https:// URL",
            id="proxy-not-a-url",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: ""
                models: [m]
            """,
            "peers.gpu2.proxy",
            3,
            "must be an http(s) URL",
            id="proxy-empty",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h:99999
                models: [m]
            """,
            "peers.gpu2.proxy",
            3,
            "a valid port",
            id="proxy-bad-port",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: []
            """,
            "peers.gpu2.models",
            4,
            "must list at least one model",
            id="models-empty",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
            """,
            "peers.gpu2.models",
            2,
            "required key is missing",
            id="models-missing",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: [a, " "]
            """,
            "peers.gpu2.models[1]",
            4,
            "a model name must not be empty",
            id="model-name-blank",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: m
            """,
            "peers.gpu2.models",
            4,
            "expected list, got string 'm'",
            id="models-not-a-list",
        ),
        pytest.param(
            """\
            models:
              gpu2/qwen:
                cmd: s ${PORT}
            peers:
              gpu2:
                proxy: http://h
                models:
                  - llama
                  - qwen
            """,
            "peers.gpu2.models[1]",
            9,
            "'gpu2/qwen' is already a local model ID",
            id="fqn-is-a-local-model",
        ),
        pytest.param(
            """\
            models:
              local:
                cmd: s ${PORT}
                aliases: [gpu2/qwen]
            peers:
              gpu2:
                proxy: http://h
                models: [qwen]
            """,
            "peers.gpu2.models[0]",
            8,
            "'gpu2/qwen' is already an alias of local model 'local'",
            id="fqn-is-an-alias",
        ),
        pytest.param(
            """\
            models:
              local:
                cmd: s ${PORT}
                filters:
                  setParamsByID:
                    gpu2/qwen: {a: 1}
            peers:
              gpu2:
                proxy: http://h
                models: [qwen]
            """,
            "peers.gpu2.models[0]",
            10,
            "'gpu2/qwen' is already an alias of local model 'local'",
            id="fqn-is-a-generated-alias",
        ),
        pytest.param(
            """\
            peers:
              a:
                proxy: http://h1
                models: [b/c]
              a/b:
                proxy: http://h2
                models:
                  - x
                  - c
            """,
            "peers.a/b.models[1]",
            9,
            "'a/b/c' is also the name of model 'b/c' of peer 'a'",
            id="two-peers-same-fqn",
        ),
        pytest.param(
            """\
            peers: [a, b]
            """,
            "peers",
            1,
            "must be a mapping of peer IDs (got list)",
            id="peers-not-a-mapping",
        ),
        pytest.param(
            """\
            peers:
              gpu2: http://h
            """,
            "peers.gpu2",
            2,
            "must be a mapping of keys (got string)",
            id="peer-not-a-mapping",
        ),
        pytest.param(
            """\
            peers:
              " ":
                proxy: http://h
                models: [m]
            """,
            'peers." "',
            2,
            "a peer ID must not be empty",
            id="peer-id-blank",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                apiKey: ${nokey}
                models: [m]
            """,
            "peers.gpu2.apiKey",
            4,
            "unknown macro '${nokey}'",
            id="api-key-unknown-macro",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                apiKey: "sk one"
                models: [m]
            """,
            "peers.gpu2.apiKey",
            4,
            "cannot contain spaces",
            id="api-key-space",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: [m]
                filters:
                  setParamsByID:
                    "${MODEL_ID}:x": {a: 1}
            """,
            "peers.gpu2.filters.setParamsByID.${MODEL_ID}:x",
            7,
            "${MODEL_ID} is only available inside a model",
            id="model-id-in-peer-filters",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: [m]
                filters:
                  stripParams: "${MODEL_ID}"
            """,
            "peers.gpu2.filters.stripParams",
            6,
            "only available inside a model",
            id="model-id-in-strip-params",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: [m]
                filters:
                  sp: x
            """,
            "peers.gpu2.filters",
            5,
            "unknown field `sp`",
            id="filters-unknown-key",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: [m]
                timeouts:
                  connect: 0
            """,
            "peers.gpu2.timeouts.connect",
            6,
            "must be > 0 seconds (got 0)",
            id="connect-timeout-zero",
        ),
        pytest.param(
            """\
            peers:
              gpu2:
                proxy: http://h
                models: [m]
                timeouts: {responseHeader: -1}
            """,
            "peers.gpu2.timeouts.responseHeader",
            5,
            "must be >= 0 (got -1); 0 = no limit",
            id="response-header-timeout-negative",
        ),
    ],
)
def test_bad_peer_config(
    tmp_path: Path, text: str, key_path: str, line: int, fragment: str
) -> None:
    assert_error(fails(tmp_path, text), key_path, line, fragment)


# --- resolution --------------------------------------------------------------------------

RESOLUTION_CONFIG: Final = """\
models:
  qwen:
    cmd: s ${PORT}
    aliases: [fast]
peers:
  a:
    proxy: http://h1
    models: [qwen, llama, shared, b/c, fast, llama]
  x:
    proxy: http://h2
    models: [shared, a/b/c, solo]
"""


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        pytest.param("a/llama", ("a", "llama"), id="qualified"),
        pytest.param("llama", ("a", "llama"), id="bare-unique"),
        pytest.param("solo", ("x", "solo"), id="bare-unique-other-peer"),
        pytest.param("shared", None, id="bare-ambiguous"),
        pytest.param("a/shared", ("a", "shared"), id="qualified-of-ambiguous-a"),
        pytest.param("x/shared", ("x", "shared"), id="qualified-of-ambiguous-x"),
        pytest.param("qwen", None, id="local-model-wins"),
        pytest.param("fast", None, id="local-alias-wins"),
        pytest.param("a/qwen", ("a", "qwen"), id="qualified-of-local-name"),
        pytest.param("a/fast", ("a", "fast"), id="qualified-of-local-alias"),
        pytest.param("a/b/c", ("a", "b/c"), id="fqn-not-remapped-to-bare"),
        pytest.param("x/a/b/c", ("x", "a/b/c"), id="qualified-of-fqn-like-model"),
        pytest.param("b/c", ("a", "b/c"), id="bare-with-slash"),
        pytest.param("nope", None, id="unknown"),
        pytest.param("a/nope", None, id="unknown-qualified"),
        pytest.param("a/", None, id="peer-id-and-slash"),
    ],
)
def test_resolve_peer(name: str, expected: tuple[str, str] | None) -> None:
    config = load_config_text(RESOLUTION_CONFIG, "<string>")
    assert config.resolve_peer(name) == expected
    if expected is None:
        return
    assert config.resolve(name) is None  # callers try local names first; never both


def test_resolution_table_is_precomputed_and_follows_replace() -> None:
    config = load_config_text(RESOLUTION_CONFIG, "<string>")
    assert config.peers["a"].models == ("qwen", "llama", "shared", "b/c", "fast")
    assert config.peer_names == {
        "a/qwen": ("a", "qwen"),
        "a/llama": ("a", "llama"),
        "a/shared": ("a", "shared"),
        "a/b/c": ("a", "b/c"),
        "a/fast": ("a", "fast"),
        "x/shared": ("x", "shared"),
        "x/a/b/c": ("x", "a/b/c"),
        "x/solo": ("x", "solo"),
        "llama": ("a", "llama"),
        "b/c": ("a", "b/c"),
        "solo": ("x", "solo"),
    }
    # Built on construction, so a Config made in code or replaced stays consistent.
    local_llama = ModelConfig(id="llama", cmd=("s",), proxy="http://127.0.0.1:1")
    changed = msgspec.structs.replace(config, models={**config.models, "llama": local_llama})
    assert changed.resolve_peer("llama") is None
    assert changed.resolve_peer("a/llama") == ("a", "llama")
    direct = Config(
        source="<test>",
        models={},
        peers={"p": PeerConfig(id="p", proxy="http://h", models=("m",))},
    )
    assert direct.resolve_peer("m") == direct.resolve_peer("p/m") == ("p", "m")


# --- forwarder helpers ---------------------------------------------------------------------


class Collector:
    """A fake ASGI ``send`` that keeps every message; ``on_body`` runs after each body chunk."""

    def __init__(self, on_body: Callable[[bytes], Awaitable[None]] | None = None) -> None:
        self.messages: list[dict[str, Any]] = []
        self._on_body = on_body

    async def __call__(self, message: ASGISendEvent) -> None:
        self.messages.append(dict(message))
        if message["type"] == "http.response.body" and message.get("body") and self._on_body:
            await self._on_body(message["body"])

    @property
    def start(self) -> dict[str, Any]:
        assert self.messages[0]["type"] == "http.response.start"
        return self.messages[0]

    @property
    def status(self) -> int:
        status = self.start["status"]
        assert isinstance(status, int)
        return status

    @property
    def headers(self) -> dict[bytes, bytes]:
        return dict(self.start["headers"])

    @property
    def chunks(self) -> list[bytes]:
        return [m["body"] for m in self.messages[1:] if m.get("body")]

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def assert_complete(self) -> None:
        types = [m["type"] for m in self.messages]
        assert types[0] == "http.response.start"
        assert set(types[1:]) == {"http.response.body"}
        assert [m.get("more_body") for m in self.messages[1:]][-1] is False
        assert all(m.get("more_body") for m in self.messages[1:-1])


def peer_at(url: str, **fields: object) -> PeerConfig:
    return PeerConfig(id="gpu2", proxy=url, models=("m",), **fields)  # type: ignore[arg-type]


def chat_body(*, stream: bool = False) -> bytes:
    payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    return json.dumps(payload).encode()


async def forward(
    forwarder: PeerForwarder,
    peer: PeerConfig,
    send: ASGISendCallable,
    *,
    method: str = "POST",
    path: bytes = CHAT,
    query: bytes = b"",
    headers: list[tuple[bytes, bytes]] | None = None,
    body: bytes = b"",
) -> int:
    return await forwarder.forward(
        peer,
        method=method,
        raw_path=path,
        query=query,
        headers=[(b"content-type", b"application/json")] if headers is None else headers,
        body=body,
        send=send,
        style=error_style(path.decode()),
    )


async def last_request(responder: Responder) -> dict[str, object]:
    records = await responder.requests()
    assert records
    return records[-1]


def sse_events(body: bytes) -> list[str]:
    return [event for event in body.decode().split("\n\n") if event]


# --- forwarder -------------------------------------------------------------------------------

_PROXY_VARIABLES: Final = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


@pytest.fixture(autouse=True)
def no_proxy_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The forwarder honours proxy variables; the developer's own must not reroute these tests."""
    for name in _PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.upper(), raising=False)


async def test_proxy_environment_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--model", "m") as proxy:
            monkeypatch.setenv("HTTP_PROXY", proxy.url)
            async with PeerForwarder() as forwarder:  # reads the environment when created
                monkeypatch.delenv("HTTP_PROXY")  # test helpers below talk to it directly
                send = Collector()
                peer = peer_at("http://peer.invalid:8080")
                await forward(forwarder, peer, send, method="GET", path=b"/v1/models")
            record = await last_request(proxy)  # the request went to the proxy...
            headers = record["headers"]
            assert isinstance(headers, dict)
            assert headers["host"] == "peer.invalid:8080"  # ...addressed to the peer


async def test_forward_json_request_path_headers_and_body() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--model", "m") as responder, PeerForwarder() as forwarder:
            peer = peer_at(responder.url + "/v1")  # a base path, joined with the request path
            send = Collector()
            body = chat_body()
            status = await forward(
                forwarder,
                peer,
                send,
                path=b"/chat/completions",
                query=b"delay=0&x=%2F",
                headers=[
                    (b"host", b"trio-swap.local:8080"),
                    (b"connection", b"keep-alive, x-drop"),
                    (b"content-length", b"999"),
                    (b"content-type", b"application/json"),
                    (b"authorization", b"Bearer client-key"),
                    (b"x-custom", b"kept"),
                    (b"te", b"trailers"),
                ],
                body=body,
            )
            assert status == send.status == 200
            send.assert_complete()
            assert send.headers[b"content-type"] == b"application/json"
            assert send.headers[b"content-length"] == str(len(send.body)).encode()
            assert b"date" not in send.headers and b"server" not in send.headers
            assert b"x-accel-buffering" not in send.headers
            assert json.loads(send.body)["object"] == "chat.completion"
            record = await last_request(responder)
            assert (record["method"], record["path"], record["query"]) == (
                "POST",
                "/v1/chat/completions",
                "delay=0&x=%2F",
            )
            assert record["body"] == body.decode()
            headers = record["headers"]
            assert isinstance(headers, dict)
            assert headers["host"] == responder.url.removeprefix("http://")
            assert headers["content-length"] == str(len(body))
            assert headers["authorization"] == "Bearer client-key"  # no apiKey: passed on
            assert headers["x-custom"] == "kept"
            assert "te" not in headers
            assert "accept-encoding" not in headers  # the client sent none


async def test_forward_get_and_error_status_are_relayed() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--model", "m") as responder, PeerForwarder() as forwarder:
            peer = peer_at(responder.url)
            models = Collector()
            assert await forward(forwarder, peer, models, method="GET", path=b"/v1/models") == 200
            assert json.loads(models.body)["data"][0]["id"] == "m"
            missing = Collector()
            assert await forward(forwarder, peer, missing, method="GET", path=b"/nope") == 404
            missing.assert_complete()


async def test_sse_streams_chunk_by_chunk() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--model", "m", "--tokens", "4", "--token-delay", "0.05") as responder,
            PeerForwarder() as forwarder,
        ):
            seen_in_flight: list[object] = []

            async def on_body(chunk: bytes) -> None:
                if not seen_in_flight:  # the first chunk arrived: the peer is still generating
                    seen_in_flight.append((await last_request(responder))["status"])

            send = Collector(on_body)
            status = await forward(
                forwarder, peer_at(responder.url), send, body=chat_body(stream=True)
            )
            assert status == 200
            send.assert_complete()
            assert seen_in_flight == ["in_flight"]
            assert send.headers[b"content-type"].startswith(b"text/event-stream")
            assert send.headers[b"x-accel-buffering"] == b"no"
            assert len(send.chunks) >= 4
            events = sse_events(send.body)
            assert events[-1] == "data: [DONE]"
            assert len(events) >= 6  # role, 4 tokens, final, [DONE]


async def test_api_key_replaces_client_keys() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--model", "m") as responder, PeerForwarder() as forwarder:
            peer = peer_at(responder.url, api_key="sk-peer")
            send = Collector()
            headers = [
                (b"content-type", b"application/json"),
                (b"authorization", b"Bearer client-key"),
                (b"x-api-key", b"client-key"),
            ]
            await forward(forwarder, peer, send, headers=headers, body=chat_body())
            assert send.status == 200
            record_headers = (await last_request(responder))["headers"]
            assert isinstance(record_headers, dict)
            assert record_headers["authorization"] == "Bearer sk-peer"
            assert record_headers["x-api-key"] == "sk-peer"
            # Also added when the client sent none.
            await forward(forwarder, peer, Collector(), body=chat_body())
            record_headers = (await last_request(responder))["headers"]
            assert isinstance(record_headers, dict)
            assert record_headers["authorization"] == "Bearer sk-peer"
            assert record_headers["x-api-key"] == "sk-peer"


@pytest.mark.parametrize("path", [CHAT, b"/v1/messages"])
async def test_peer_down_is_a_502(path: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerForwarder() as forwarder:
            send = Collector()
            url = f"http://127.0.0.1:{free_port()}"
            status = await forward(forwarder, peer_at(url), send, path=path, body=chat_body())
            assert status == send.status == 502
            send.assert_complete()
            assert send.headers[b"content-type"] == b"application/json"
            payload = json.loads(send.body)
            if path == CHAT:
                assert payload["error"]["type"] == "server_error"
                assert payload["error"]["code"] == "bad_gateway"
                message = payload["error"]["message"]
            else:
                assert payload["type"] == "error"
                assert payload["error"]["type"] == "api_error"
                message = payload["error"]["message"]
            assert message.startswith("peer proxy error: peer 'gpu2': ")
            assert url + path.decode() in message
            assert "ConnectError" in message


async def test_peer_password_is_not_shown_to_clients() -> None:
    with trio.fail_after(TIMEOUT):
        async with PeerForwarder() as forwarder:
            send = Collector()
            url = f"http://user:s3cret@127.0.0.1:{free_port()}"
            assert await forward(forwarder, peer_at(url), send, body=chat_body()) == 502
            message = json.loads(send.body)["error"]["message"]
            assert "user:xxxxx@127.0.0.1" in message
            assert "s3cret" not in message


async def test_response_header_timeout_is_a_502() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--model", "m") as responder, PeerForwarder() as forwarder:
            peer = peer_at(responder.url, response_header_timeout=0.2)
            send = Collector()
            status = await forward(forwarder, peer, send, query=b"delay=60", body=chat_body())
            assert status == 502
            message = json.loads(send.body)["error"]["message"]
            assert "peer proxy error" in message
            assert "no response headers within 0.2s" in message
            while (await last_request(responder))["status"] != "cancelled":
                await trio.sleep(0.02)  # the peer sees the request go away


@pytest.mark.parametrize("path", [CHAT, b"/v1/messages"])
async def test_sse_cut_off_ends_with_an_error_event(path: bytes) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder(
                "--model", "m", "--tokens", "8", "--crash-after-tokens", "2"
            ) as responder,
            PeerForwarder() as forwarder,
        ):
            send = Collector()
            # The responder serves any path's chat; /v1/messages only picks the error style.
            peer = peer_at(responder.url)
            status = await forwarder.forward(
                peer,
                method="POST",
                raw_path=CHAT,
                query=b"",
                headers=[(b"content-type", b"application/json")],
                body=chat_body(stream=True),
                send=send,
                style=error_style(path.decode()),
            )
            assert status == 200
            send.assert_complete()
            last = sse_events(send.body)[-1]
            if path == CHAT:
                assert last.startswith("data: {")
                error = json.loads(last.removeprefix("data: "))["error"]
            else:
                assert last.startswith("event: error\ndata: {")
                payload = json.loads(last.removeprefix("event: error\ndata: "))
                assert payload["type"] == "error"
                error = payload["error"]
            assert error["message"].startswith("peer proxy error: peer 'gpu2': response cut off")


@asynccontextmanager
async def scripted_peer(answer: bytes) -> AsyncIterator[str]:
    """A peer that reads a request head, writes ``answer`` verbatim and hangs up; yields its URL."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def handle(stream: trio.SocketStream) -> None:
        request = b""
        while b"\r\n\r\n" not in request:
            request += await stream.receive_some()
        await stream.send_all(answer)
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(partial(trio.serve_listeners, handle, listeners))
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            nursery.cancel_scope.cancel()


async def test_response_headers_are_filtered() -> None:
    body = b"data: [DONE]\n\n"
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nX-Accel-Buffering: no\r\n"
        b"Date: Thu, 01 Jan 2026 00:00:00 GMT\r\nServer: peer\r\nConnection: close\r\n"
        b"Keep-Alive: timeout=5\r\nSet-Cookie: s=1\r\nX-Request-Id: r1\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    with trio.fail_after(TIMEOUT):
        async with scripted_peer(answer) as url, PeerForwarder() as forwarder:
            send = Collector()
            assert await forward(forwarder, peer_at(url), send, body=chat_body()) == 200
            send.assert_complete()
            assert sorted(send.start["headers"]) == [
                (b"content-length", b"%d" % len(body)),
                (b"content-type", b"text/event-stream"),
                (b"set-cookie", b"s=1"),
                (b"x-accel-buffering", b"no"),  # once, though the peer sent it too
                (b"x-request-id", b"r1"),
            ]
            assert send.body == body


async def test_non_sse_body_cut_off_raises_after_the_start() -> None:
    """A truncated JSON body must not look complete: forward raises so the server aborts."""
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n"
    with trio.fail_after(TIMEOUT):
        async with scripted_peer(head + b'{"partial": ') as url, PeerForwarder() as forwarder:
            send = Collector()
            with pytest.raises(PeerFailed, match="response cut off"):
                await forward(forwarder, peer_at(url), send, body=chat_body())
            assert send.status == 200
            assert send.body == b'{"partial": '
            assert send.messages[-1].get("more_body") is True  # never ended cleanly


async def test_cancellation_closes_the_peer_response() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--model", "m", "--tokens", "1000", "--token-delay", "1") as responder,
            PeerForwarder() as forwarder,
        ):
            with trio.CancelScope() as client:

                async def on_body(chunk: bytes) -> None:
                    client.cancel()  # the client goes away mid-stream

                await forward(
                    forwarder,
                    peer_at(responder.url),
                    Collector(on_body),
                    body=chat_body(stream=True),
                )
            assert client.cancelled_caught
            while (await last_request(responder))["status"] != "cancelled":
                await trio.sleep(0.02)
            tokens_sent = (await last_request(responder))["tokens_sent"]
            assert isinstance(tokens_sent, int) and tokens_sent < 1000


async def test_served_by_hypercorn() -> None:
    """Real ASGI: hypercorn accepts the messages forward() sends; SSE arrives as a stream."""
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--model", "m", "--tokens", "3", "--token-delay", "0.05") as responder,
            PeerForwarder() as forwarder,
            trio.open_nursery() as nursery,
        ):
            peer = peer_at(responder.url, api_key="sk-peer")

            async def app(
                scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
            ) -> None:
                if scope["type"] == "lifespan":
                    while (await receive())["type"] == "lifespan.startup":
                        await send({"type": "lifespan.startup.complete"})
                    await send({"type": "lifespan.shutdown.complete"})
                    return
                assert scope["type"] == "http"
                body = b""
                while True:
                    message = await receive()
                    assert message["type"] == "http.request"
                    body += message.get("body", b"")
                    if not message.get("more_body"):
                        break
                await forwarder.forward(
                    peer,
                    method=scope["method"],
                    raw_path=scope["raw_path"],
                    query=scope["query_string"],
                    headers=list(scope["headers"]),
                    body=body,
                    send=send,
                    style=error_style(scope["path"]),
                )

            config = HypercornConfig()
            config.bind = ["127.0.0.1:0"]
            config.accesslog = None
            stop = trio.Event()
            binds = await nursery.start(
                partial(hypercorn_serve, app, config, shutdown_trigger=stop.wait)
            )
            async with httpx.AsyncClient(base_url=binds[0]) as client:
                async with client.stream(
                    "POST", "/v1/chat/completions", content=chat_body(stream=True)
                ) as response:
                    assert response.status_code == 200
                    assert response.headers["x-accel-buffering"] == "no"
                    chunks: list[bytes] = []
                    async for chunk in response.aiter_raw():
                        if not chunks:  # the first bytes came while the peer still generates
                            assert (await last_request(responder))["status"] == "in_flight"
                        chunks.append(chunk)
                assert sse_events(b"".join(chunks))[-1] == "data: [DONE]"
                models = await client.get("/v1/models")
                assert models.json()["data"][0]["id"] == "m"
            record_headers = (await last_request(responder))["headers"]
            assert isinstance(record_headers, dict)
            assert record_headers["x-api-key"] == "sk-peer"
            stop.set()
