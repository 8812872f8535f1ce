"""Websocket proxying (issue 13): a websocket to ``/upstream/<model>/...`` or a model route
reaches the model's server through trio-swap, and ``compat.ignoreWebsockets``.

End to end: trio-swap in-process (``serve``) in front of real responders, whose
``/ws/echo`` route echoes text and binary messages and closes on request
(``close <code> <reason>``), and ``/debug/websockets`` counts its open sockets.
The client is trio-websocket, as the proxy's upstream side is.
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
from trio_websocket import (
    ConnectionClosed,
    ConnectionRejected,
    WebSocketConnection,
    wrap_client_stream,
)

from tests.conftest import (
    Harness,
    chat,
    free_port,
    make_config,
    responder_model,
    running,
    wait_for,
)
from trio_swap.config import ConfigError, load_config
from trio_swap.config.compat import COMFYUI_MIN_CONCURRENCY
from trio_swap.config.model import Compat, Config
from trio_swap.http.websocket import GOING_AWAY

RESPONDER = f"{sys.executable} -m trio_swap responder --port ${{PORT}}"
ECHO = "/upstream/m/ws/echo"


@asynccontextmanager
async def socket(
    harness: Harness,
    path: str = ECHO,
    *,
    subprotocols: list[str] | None = None,
    extra_headers: list[tuple[bytes, bytes]] | None = None,
) -> AsyncIterator[WebSocketConnection]:
    """A websocket to trio-swap, its TCP stream closed after (trio-websocket's
    ``open_websocket`` leaves it open after a server's close or refusal)."""
    port = int(harness.server.url.rsplit(":", 1)[1])
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    refusal: ConnectionRejected | None = None
    try:
        try:
            async with trio.open_nursery() as reader:
                ws = await wrap_client_stream(
                    reader,
                    stream,
                    f"127.0.0.1:{port}",
                    path,
                    subprotocols=subprotocols,
                    extra_headers=extra_headers,
                )
                try:
                    yield ws
                finally:
                    await ws.aclose()
                reader.cancel_scope.cancel()
        except* ConnectionRejected as group:
            refusal = group.exceptions[0]  # type: ignore[assignment]
    finally:
        await stream.aclose()
    if refusal is not None:
        raise refusal


async def rejected(
    harness: Harness, path: str, extra_headers: list[tuple[bytes, bytes]] | None = None
) -> ConnectionRejected:
    """The handshake's refusal (the test fails if the socket opens)."""
    with pytest.raises(ConnectionRejected) as info:
        async with socket(harness, path, extra_headers=extra_headers):
            pass
    return info.value


async def in_flight(harness: Harness, model: str = "m") -> int:
    return int((await harness.models())[model]["in_flight"])  # type: ignore[call-overload]


async def upstream_sockets(harness: Harness, model: str = "m") -> dict[str, object]:
    """The responder's own count of its /ws/echo sockets."""
    url = harness.server.processes[model].model.proxy + "/debug/websockets"
    async with httpx.AsyncClient() as client:
        answer: dict[str, object] = (await client.get(url)).json()
    return answer


def config_of(tmp_path: Path, text: str) -> Config:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return load_config(path)


# --- relaying -------------------------------------------------------------------------


async def test_an_echo_through_upstream_loads_the_model_and_counts_in_flight() -> None:
    async with running(make_config(responder_model("m"))) as harness:
        assert (await harness.models())["m"]["state"] == "stopped"
        async with socket(
            harness,
            ECHO + "?x=1&y=%2F",
            subprotocols=["first", "second"],
            extra_headers=[(b"x-custom", b"kept"), (b"authorization", b"Bearer up")],
        ) as ws:
            assert (await harness.models())["m"]["state"] == "ready"  # the connect loaded it
            assert await in_flight(harness) == 1
            await ws.send_message("hello")
            assert await ws.get_message() == "hello"
            await ws.send_message(b"\x00\xffbinary")
            assert await ws.get_message() == b"\x00\xffbinary"
            big = "x" * 300_000  # many frames and receive buffers each way
            await ws.send_message(big)
            assert await ws.get_message() == big
            assert ws.subprotocol == "first"  # the upstream's choice, passed back
            await ws.send_message("request")
            seen = msgspec.json.decode(await ws.get_message())
            assert seen["path"] == "/ws/echo" and seen["query"] == "x=1&y=%2F"
            assert seen["subprotocols"] == ["first", "second"]
            assert seen["headers"]["x-custom"] == "kept"
            assert seen["headers"]["authorization"] == "Bearer up"
            assert (await upstream_sockets(harness))["open"] == 1
        # The client closed: the relay ends, the upstream socket closes, the lease goes.
        await wait_for(lambda: _is(in_flight(harness), 0), what="the lease released")
        await wait_for(lambda: _open_upstream(harness, 0), what="the upstream socket closed")
        counts = await upstream_sockets(harness)
        assert counts["accepted"] == 1 and str(counts["last_close"]).startswith("client")


async def test_an_upstream_close_reaches_the_client_with_its_code() -> None:
    async with running(make_config(responder_model("m"))) as harness:
        async with socket(harness) as ws:
            await ws.send_message("before")
            assert await ws.get_message() == "before"
            await ws.send_message("close 4001 upstream says bye")
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason is not None
            assert info.value.reason.code == 4001
            assert info.value.reason.reason == "upstream says bye"
        await wait_for(lambda: _is(in_flight(harness), 0), what="the lease released")
        assert (await upstream_sockets(harness))["last_close"] == "server 4001"


async def test_an_upstream_that_goes_away_closes_the_client_with_1011() -> None:
    async with running(make_config(responder_model("m"))) as harness:
        async with socket(harness) as ws:
            await ws.send_message("ping")
            assert await ws.get_message() == "ping"
            (await harness.client.post("/api/models/unload/m")).raise_for_status()
            with pytest.raises(ConnectionClosed) as info:
                await ws.get_message()
            assert info.value.reason is not None
            # Lost without a close frame (1006) or closed with 1011 as the server stopped.
            assert info.value.reason.code == 1011
        await wait_for(lambda: _is(in_flight(harness), 0), what="the lease released")


async def test_handshake_refusals_are_http_answers() -> None:
    failing = responder_model("bad", "--fail-start")
    async with running(make_config(responder_model("m"), failing)) as harness:
        # The upstream's own refusal, relayed with its status and body.
        refused = await rejected(harness, "/upstream/m/ws/nowhere")
        assert refused.status_code == 404
        assert b"no websocket route for /ws/nowhere" in (refused.body or b"")
        # A model that cannot start: the router's error, as for HTTP.
        refused = await rejected(harness, "/upstream/bad/ws/echo")
        assert refused.status_code == 503
        assert b"failed to start" in (refused.body or b"")
        # Unknown model, and /upstream/<model> without its slash.
        assert (await rejected(harness, "/upstream/nope/ws")).status_code == 404
        redirect = await rejected(harness, "/upstream/m")
        assert redirect.status_code == 301
        assert dict(redirect.headers)[b"location"] == b"/upstream/m/"
        # A model route names the model in ?model= (400 without); the path goes upstream.
        refused = await rejected(harness, "/v1/realtime")
        assert refused.status_code == 400 and b"?model=" in (refused.body or b"")
        refused = await rejected(harness, "/v1/completions?model=m")
        assert refused.status_code == 404 and b"/v1/completions" in (refused.body or b"")
        # Paths that are not model routes take no websocket.
        assert (await rejected(harness, "/logs/stream")).status_code == 400
        assert (await rejected(harness, "/api/events")).status_code == 400
        assert await in_flight(harness) == 0


async def test_another_origins_page_cannot_open_an_upstream_websocket() -> None:
    async with running(make_config(responder_model("m"))) as harness:
        port = harness.server.url.rsplit(":", 1)[1]
        foreign = [(b"origin", b"http://evil.example")]
        assert (await rejected(harness, ECHO, extra_headers=foreign)).status_code == 403
        fetch = [(b"sec-fetch-site", b"cross-site")]
        assert (await rejected(harness, ECHO, extra_headers=fetch)).status_code == 403
        assert (await harness.models())["m"]["state"] == "stopped"
        same = [(b"origin", f"http://127.0.0.1:{port}".encode())]
        async with socket(harness, extra_headers=same) as ws:
            await ws.send_message("same origin")
            assert await ws.get_message() == "same origin"


async def test_websockets_pass_the_key_check(tmp_path: Path) -> None:
    config = config_of(
        tmp_path,
        f"apiKeys: [secret, {{key: only-n, models: [n]}}]\n"
        f"models:\n  m:\n    cmd: {RESPONDER} --model m\n  n:\n    cmd: {RESPONDER} --model n\n",
    )
    async with running(config) as harness:
        missing = await rejected(harness, ECHO)
        assert missing.status_code == 401
        wrong = await rejected(harness, ECHO, extra_headers=[(b"x-api-key", b"nope")])
        assert wrong.status_code == 401 and b"invalid API key" in (wrong.body or b"")
        scoped = await rejected(harness, ECHO, extra_headers=[(b"x-api-key", b"only-n")])
        assert scoped.status_code == 403  # a scoped key, a model outside its scope
        harness.client.headers["x-api-key"] = "secret"  # for /api/models
        assert (await harness.models())["m"]["state"] == "stopped"
        async with socket(harness, extra_headers=[(b"authorization", b"Bearer secret")]) as ws:
            await ws.send_message("let in")
            assert await ws.get_message() == "let in"
            await ws.send_message("request")
            seen = msgspec.json.decode(await ws.get_message())
            assert seen["headers"]["authorization"] == "Bearer secret"  # as for HTTP


async def test_a_peer_models_websocket_goes_to_the_peer_with_its_key(tmp_path: Path) -> None:
    """The peer here is m's own server, named as a peer: no lease, the peer's apiKey."""
    port = free_port()
    config = config_of(
        tmp_path,
        f"models:\n  m:\n    cmd: {sys.executable} -m trio_swap responder --port {port}"
        f" --model m\n    proxy: http://127.0.0.1:{port}\n"
        f"peers:\n  far:\n    proxy: http://127.0.0.1:{port}\n    apiKey: peer-key\n"
        "    models: [remote]\n",
    )
    async with running(config) as harness:
        assert (await harness.client.post("/v1/chat/completions", json=chat("m"))).is_success
        headers = [(b"x-api-key", b"client-key")]
        async with socket(harness, "/upstream/far/remote/ws/echo", extra_headers=headers) as ws:
            await ws.send_message("request")
            seen = msgspec.json.decode(await ws.get_message())
            assert seen["headers"]["authorization"] == "Bearer peer-key"
            assert seen["headers"]["x-api-key"] == "peer-key"
            assert await in_flight(harness) == 0  # a peer's socket takes no lease here


# --- compat.ignoreWebsockets ------------------------------------------------------------


async def test_an_ignored_websocket_never_loads_its_model_nor_holds_it(tmp_path: Path) -> None:
    config = config_of(
        tmp_path,
        f"models:\n  m:\n    cmd: {RESPONDER} --model m\n    compat:\n"
        "      ignoreWebsockets: true\n",
    )
    assert config.models["m"].compat == Compat(ignore_websockets=True)
    async with running(config) as harness:
        refused = await rejected(harness, ECHO)
        assert refused.status_code == 409
        assert b"ignoreWebsockets" in (refused.body or b"")
        assert (await harness.models())["m"]["state"] == "stopped"  # never loaded
        answer = await harness.client.post("/v1/chat/completions", json=chat("m"))
        assert answer.status_code == 200
        async with socket(harness) as ws:
            await ws.send_message(b"while ready")
            assert await ws.get_message() == b"while ready"
            assert await in_flight(harness) == 0  # no lease: not in flight
            # Nor does it block a swap: an unload goes ahead at once and cuts it.
            (await harness.client.post("/api/models/unload/m")).raise_for_status()
            with pytest.raises(ConnectionClosed):
                await ws.get_message()
        assert (await harness.models())["m"]["state"] == "stopped"


async def test_a_websocket_waits_for_its_model_like_any_request() -> None:
    slow = responder_model("m", "--startup-delay", "0.5")
    async with running(make_config(slow)) as harness:
        async with trio.open_nursery() as nursery:

            async def connect() -> None:
                async with socket(harness) as ws:
                    await ws.send_message("after the load")
                    assert await ws.get_message() == "after the load"

            nursery.start_soon(connect)
            await harness.wait_for_state("m", "starting")
        await wait_for(lambda: _is(in_flight(harness), 0), what="the lease released")


async def test_a_client_that_leaves_during_the_load_withdraws_its_request() -> None:
    slow = responder_model("m", "--startup-delay", "0.5")
    async with running(make_config(slow)) as harness:
        port = int(harness.server.url.rsplit(":", 1)[1])
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(
            b"GET /upstream/m/ws/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            b"Sec-WebSocket-Version: 13\r\n\r\n"
        )
        await harness.wait_for_state("m", "starting")
        await stream.aclose()  # gone before the model is ready
        # Its request is withdrawn, like an HTTP client's: nobody wants the load any
        # more, so it is stopped (llama-swap #727), and no lease was ever held.
        await harness.wait_for_state("m", "stopped")
        assert await in_flight(harness) == 0


# --- config -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("block", "words"),
    [
        ("compat: [ignoreWebsockets]", "expected mapping"),
        ("compat: {ignoreWebsockets: 'yes'}", "must be true or false (got string 'yes')"),
        ("compat: {ignoreWebsockets: 1}", "must be true or false (got int 1)"),
    ],
)
def test_a_bad_compat_block_is_a_located_error(tmp_path: Path, block: str, words: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_of(tmp_path, f"models:\n  m:\n    cmd: s ${{PORT}}\n    {block}\n")
    assert words in str(info.value)
    assert info.value.key_path is not None and info.value.key_path.startswith("models.m.compat")
    assert info.value.line == 4


def test_compat_is_supported_and_unknown_keys_in_it_are_warnings(tmp_path: Path) -> None:
    config = config_of(
        tmp_path,
        "models:\n  m:\n    cmd: s ${PORT}\n    compat: {ignoreWebsockets: false, later: 1}\n"
        "  n:\n    cmd: s ${PORT}\n",
    )
    assert config.models["m"].compat == Compat() == config.models["n"].compat
    assert not any("not supported" in warning for warning in config.warnings)
    assert any("models.m.compat.later: unknown key" in w for w in config.warnings)


def test_comfyui_auto_ignores_websockets_and_takes_50_requests(tmp_path: Path) -> None:
    config = config_of(
        tmp_path,
        "models:\n  comfyui_auto:\n    cmd: s ${PORT}\n    compat: {ignoreWebsockets: false}\n"
        "    concurrencyLimit: 4\n  big:\n    cmd: s ${PORT}\n    concurrencyLimit: 80\n",
    )
    comfy = config.models["comfyui_auto"]
    assert comfy.compat.ignore_websockets
    assert comfy.concurrency_limit == COMFYUI_MIN_CONCURRENCY
    assert config.models["big"].concurrency_limit == 80
    assert not config.models["big"].compat.ignore_websockets


# --- helpers ----------------------------------------------------------------------------


async def _is(value: object, expected: int) -> bool:
    return await value == expected  # type: ignore[misc]


async def _open_upstream(harness: Harness, expected: int) -> bool:
    return (await upstream_sockets(harness))["open"] == expected


async def test_a_spillover_reservation_lasts_a_socket_unless_its_model_ignores_websockets(
    tmp_path: Path,
) -> None:
    """Reference §5.8: the reservation lasts the request, "released at once for ignored
    websockets" (an ignored socket takes no lease, so it must not look like load)."""
    config = config_of(
        tmp_path,
        f"models:\n  a:\n    cmd: {RESPONDER} --model a\n"
        "    compat: {ignoreWebsockets: true}\n"
        f"  b:\n    cmd: {RESPONDER} --model b\n"
        "groups:\n  g: {swap: false, members: [a, b]}\n"
        "selectors:\n"
        "  ignored: {strategy: spillover, targets: [a]}\n"
        "  counted: {strategy: spillover, targets: [b]}\n",
    )
    async with running(config) as harness:
        selection = harness.server.selection
        assert selection is not None
        for model in ("a", "b"):  # both ready (a: an ignored socket never loads it)
            answer = await harness.client.post("/v1/chat/completions", json=chat(model))
            assert answer.status_code == 200
        async with socket(harness, "/v1/realtime?model=ignored") as ws:
            await ws.send_message("to a")
            assert await ws.get_message() == "to a"
            assert selection.reservations() == {}  # released at once
        async with socket(harness, "/v1/realtime?model=counted") as ws:
            await ws.send_message("to b")
            assert await ws.get_message() == "to b"
            assert selection.reservations() == {"b": 1}  # for as long as the socket
        await wait_for(lambda: not selection.reservations(), what="b's reservation to end")


async def test_shutdown_closes_open_websockets_with_going_away() -> None:
    """Without it, an open socket held the drain until its deadline cut it (no close frame)."""
    async with running(make_config(responder_model("m"))) as harness, socket(harness) as ws:
        await ws.send_message("before")
        assert await ws.get_message() == "before"
        harness.server.stop()  # what SIGTERM does
        with pytest.raises(ConnectionClosed) as closed:
            await ws.get_message()
        assert closed.value.reason.code == GOING_AWAY
        assert closed.value.reason.reason == "trio-swap is shutting down"
