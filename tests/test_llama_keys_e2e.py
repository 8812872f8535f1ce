"""The last llama-swap keys, served: ignorePaths' 409, the response-header 504, the
TLS handshake limit, session ids in the activity log, logRequests and logTimeFormat
in the proxy log. Real trio-swap, real HTTP, responder models or silent sockets."""

from __future__ import annotations

import re
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial

import msgspec
import trio

from tests.conftest import Harness, chat, make_config, responder_model, running, wait_for
from trio_swap.config.model import Config, ModelConfig, UpstreamTimeouts

CHAT = "/v1/chat/completions"


@asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP port that accepts connections, reads what comes and never answers."""

    async def hold(stream: trio.SocketStream) -> None:
        async with stream:
            while await stream.receive_some(65536):
                pass

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, hold, 0, host="127.0.0.1"))
        try:
            yield listeners[0].socket.getsockname()[1]
        finally:
            nursery.cancel_scope.cancel()


def sleeper(model_id: str, proxy: str, timeouts: UpstreamTimeouts) -> ModelConfig:
    """A model whose process does nothing and whose proxy is ``proxy`` (no health check)."""
    return ModelConfig(
        id=model_id,
        cmd=(sys.executable, "-c", "import time; time.sleep(600)"),
        proxy=proxy,
        check_endpoint=None,
        timeouts=timeouts,
    )


def with_settings(config: Config, **settings: object) -> Config:
    return msgspec.structs.replace(config, **settings)


async def activity_rows(h: Harness, count: int) -> list[dict[str, object]]:
    async def enough() -> list[dict[str, object]] | None:
        rows: list[dict[str, object]] = (await h.client.get("/api/activity")).json()["data"]
        return rows if len(rows) >= count else None

    return await wait_for(enough, what=f"{count} activity rows")


# --- upstream.ignorePaths -----------------------------------------------------------


async def test_an_ignored_path_gets_409_and_does_not_load_the_model() -> None:
    config = make_config(responder_model("m"))
    async with running(config) as h:
        icon = await h.client.get("/upstream/m/favicon.ico")
        assert icon.status_code == 409
        error = icon.json()["error"]
        assert error["code"] == "conflict"
        assert "upstream.ignorePaths" in error["message"]
        assert (await h.models())["m"]["state"] == "stopped"
        assert h.pid("m") is None
        # Any other path loads it, as llama-swap's UI "Load" button does.
        assert (await h.client.get("/upstream/m/health")).status_code == 200
        await h.wait_for_state("m", "ready")
        # Ready: the same path goes to the model (the responder has no favicon).
        assert (await h.client.get("/upstream/m/favicon.ico")).status_code == 404


async def test_configured_ignore_paths_replace_the_default() -> None:
    config = with_settings(make_config(responder_model("m")), ignore_paths=(r"^/props$",))
    async with running(config) as h:
        assert (await h.client.get("/upstream/m/props")).status_code == 409
        assert (await h.models())["m"]["state"] == "stopped"
        # The default pattern no longer applies: a .ico path loads the model.
        assert (await h.client.get("/upstream/m/favicon.ico")).status_code == 404
        assert (await h.models())["m"]["state"] == "ready"


# --- timeouts -------------------------------------------------------------------------


async def test_no_response_head_within_response_header_is_a_504() -> None:
    async with silent_server() as port:
        timeouts = UpstreamTimeouts(response_header=1)
        config = make_config(sleeper("slow", f"http://127.0.0.1:{port}", timeouts))
        async with running(config) as h:
            response = await h.client.post(CHAT, json=chat("slow"))
            assert response.status_code == 504
            error = response.json()["error"]
            assert error["code"] == "gateway_timeout"
            assert "no response headers within 1s (timeouts.responseHeader)" in error["message"]
            # Anthropic's clients read their own error shape.
            messages = await h.client.post(
                "/v1/messages", json={"model": "slow", "max_tokens": 4, "messages": []}
            )
            assert messages.status_code == 504
            assert messages.json()["type"] == "error"


async def test_a_tls_handshake_that_never_ends_fails_after_tls_handshake() -> None:
    async with silent_server() as port:
        timeouts = UpstreamTimeouts(tls_handshake=1)
        config = make_config(sleeper("tls", f"https://127.0.0.1:{port}", timeouts))
        async with running(config) as h:
            response = await h.client.post(CHAT, json=chat("tls"))
            assert response.status_code == 502
            assert "TLS handshake timed out after 1s" in response.json()["error"]["message"]


async def test_a_server_that_does_not_speak_tls_is_a_502() -> None:
    async def plain_http(stream: trio.SocketStream) -> None:
        async with stream:
            await stream.receive_some(65536)  # the TLS ClientHello
            await stream.send_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, plain_http, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        config = make_config(sleeper("tls", f"https://127.0.0.1:{port}", UpstreamTimeouts()))
        async with running(config) as h:
            response = await h.client.post(CHAT, json=chat("tls"))
            assert response.status_code == 502
            message = response.json()["error"]["message"]
            assert f"cannot connect to 127.0.0.1:{port}: SSLError" in message
        nursery.cancel_scope.cancel()


async def test_default_timeouts_leave_a_normal_request_alone() -> None:
    config = make_config(responder_model("m", timeouts=UpstreamTimeouts(response_header=30)))
    async with running(config) as h:
        for _ in range(3):  # fresh and pooled connections alike
            assert (await h.client.post(CHAT, json=chat("m"))).status_code == 200


# --- ui.activity.session_id -----------------------------------------------------------


async def test_the_activity_log_records_the_first_session_header_present() -> None:
    config = make_config(responder_model("m"))
    async with running(config) as h:
        headers = {"X-Litellm-Session-Id": "lite-1", "X-Session-ID": "conv-42"}
        assert (await h.client.post(CHAT, json=chat("m"), headers=headers)).status_code == 200
        lite = {"X-Litellm-Session-Id": "lite-1"}
        assert (await h.client.post(CHAT, json=chat("m"), headers=lite)).status_code == 200
        assert (await h.client.post(CHAT, json=chat("m"))).status_code == 200
        rows = await activity_rows(h, 3)
        assert [row["session_id"] for row in rows] == [None, "lite-1", "conv-42"]


async def test_session_headers_are_configurable_and_follow_a_reload() -> None:
    config = with_settings(make_config(responder_model("m")), session_id_headers=("X-Conv",))
    async with running(config) as h:
        headers = {"X-Conv": "c1", "X-Session-ID": "ignored"}
        assert (await h.client.post(CHAT, json=chat("m"), headers=headers)).status_code == 200
        assert (await activity_rows(h, 1))[0]["session_id"] == "c1"
        await h.server.reload(with_settings(config, session_id_headers=()))
        assert (await h.client.post(CHAT, json=chat("m"), headers=headers)).status_code == 200
        assert (await activity_rows(h, 2))[0]["session_id"] is None


# --- logRequests and logTimeFormat ----------------------------------------------------


async def test_log_requests_writes_one_proxy_line_per_request() -> None:
    quiet = make_config(responder_model("m"))
    async with running(with_settings(quiet, log_requests=True)) as h:
        headers = {"X-Session-ID": "s-9"}
        assert (await h.client.post(CHAT, json=chat("m"), headers=headers)).status_code == 200

        async def logged() -> str | None:
            text = (await h.client.get("/logs")).text
            found = re.search(r"request POST /v1/chat/completions -> 200 in \d+ms.*", text)
            return found[0] if found else None

        line = await wait_for(logged, what="the request's log line")
        assert line.endswith("(model m, session s-9)")
    async with running(quiet) as h:
        assert (await h.client.post(CHAT, json=chat("m"))).status_code == 200
        await h.wait_for_state("m", "ready")
        assert "request POST /v1/chat/completions ->" not in (await h.client.get("/logs")).text


async def test_log_time_format_stamps_the_proxy_log() -> None:
    config = with_settings(make_config(responder_model("m")), log_time_format="rfc3339")
    async with running(config) as h:
        assert (await h.client.post(CHAT, json=chat("m"))).status_code == 200
        text = (await h.client.get("/logs")).text
        stamped = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|[+-]\d\d:\d\d) \[INFO\] ")
        ready = [line for line in text.splitlines() if "model m: ready in" in line]
        assert ready and stamped.match(ready[0]), ready
