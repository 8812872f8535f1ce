"""trio-swap end to end: real responder processes, real HTTP, what a client sees."""

from __future__ import annotations

import json
import sys
from contextlib import aclosing
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import (
    alive,
    chat,
    free_port,
    make_config,
    responder_model,
    running,
    sse_data,
    wait_for,
)
from trio_swap.config.model import ModelConfig
from trio_swap.server import RunningServer, serve


async def test_cold_start_then_swaps_keep_exactly_one_upstream_alive() -> None:
    config = make_config(responder_model("A"), responder_model("B"))
    with trio.fail_after(30):
        async with running(config) as h:
            for model in ["A", "B", "A"]:
                response = await h.client.post("/v1/chat/completions", json=chat(model))
                assert response.status_code == 200, response.text
                assert response.json()["model"] == model
                other = "B" if model == "A" else "A"
                assert alive(h.pid(model))
                assert h.pid(other) is None
                running_rows = (await h.client.get("/running")).json()["running"]
                assert [row["model"] for row in running_rows] == [model]
            models = await h.models()
            assert models["A"]["start_count"] == 2
            assert models["B"]["start_count"] == 1


async def test_two_requests_for_one_cold_model_share_one_load() -> None:
    config = make_config(responder_model("A", "--load-delay", "0.5"))
    with trio.fail_after(30):
        async with running(config) as h:
            statuses: list[int] = []

            async def ask() -> None:
                response = await h.client.post("/v1/chat/completions", json=chat("A"))
                statuses.append(response.status_code)

            async with trio.open_nursery() as nursery:
                for _ in range(5):
                    nursery.start_soon(ask)
            assert statuses == [200] * 5
            assert (await h.models())["A"]["start_count"] == 1


async def test_streaming_relays_every_event_then_done() -> None:
    config = make_config(responder_model("A", "--tokens", "20"))
    with trio.fail_after(30):
        async with running(config) as h:
            async with h.client.stream(
                "POST", "/v1/chat/completions", json=chat("A", stream=True)
            ) as response:
                assert response.status_code == 200
                assert response.headers["content-type"].startswith("text/event-stream")
                lines = [line async for line in response.aiter_lines()]
            events = sse_data(lines)
            assert events[-1] == "[DONE]"
            content = "".join(
                json.loads(e)["choices"][0]["delta"].get("content") or ""
                for e in events[:-1]
                if json.loads(e)["choices"]
            )
            assert len(content.split()) == 20


async def test_swap_waits_for_streams_in_flight_on_its_victim() -> None:
    """Invariant 3: a swap never cuts a running stream; it waits for it."""
    config = make_config(
        responder_model("A", "--token-delay", "0.05", "--tokens", "20"), responder_model("B")
    )
    with trio.fail_after(30):
        async with running(config) as h:
            finished: list[str] = []
            streams: dict[int, list[str]] = {}
            streaming = {1: trio.Event(), 2: trio.Event()}

            async def stream_a(index: int) -> None:
                async with h.client.stream(
                    "POST", "/v1/chat/completions", json=chat("A", stream=True)
                ) as response:
                    assert response.status_code == 200
                    lines = []
                    async for line in response.aiter_lines():
                        lines.append(line)
                        streaming[index].set()
                    streams[index] = sse_data(lines)
                finished.append(f"A{index}")

            async def ask_b() -> None:
                response = await h.client.post("/v1/chat/completions", json=chat("B"))
                assert response.status_code == 200
                finished.append("B")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream_a, 1)
                await streaming[1].wait()
                nursery.start_soon(stream_a, 2)  # same model, mid-stream: joins at once
                await streaming[2].wait()
                nursery.start_soon(ask_b)  # needs A evicted: must wait for both streams
            assert finished[-1] == "B"
            for events in streams.values():
                assert events[-1] == "[DONE]"
                tokens = [e for e in events[:-1] if '"content"' in e]
                assert len(tokens) == 20
            assert (await h.models())["A"]["start_count"] == 1


async def test_client_disconnect_mid_stream_cancels_the_upstream_request() -> None:
    config = make_config(responder_model("A", "--token-delay", "0.05", "--tokens", "200"))
    with trio.fail_after(30):
        async with running(config) as h:
            async with (
                h.client.stream(
                    "POST", "/v1/chat/completions", json=chat("A", stream=True)
                ) as response,
                aclosing(response.aiter_lines()) as lines,
            ):
                async for line in lines:
                    if '"content"' in line:
                        break  # leave after the first token
            port = (await h.models())["A"]["port"]

            async def upstream_saw_the_cancel() -> bool:
                records = (await h.client.get(f"http://127.0.0.1:{port}/debug/requests")).json()
                chats = [r for r in records if r["path"] == "/v1/chat/completions"]
                return bool(chats) and chats[-1]["status"] == "cancelled"

            # Left alone the stream would end by itself after 10 s and count as
            # completed, not cancelled: the condition tells the two apart.
            await wait_for(upstream_saw_the_cancel, what="the upstream request to be cancelled")
            # the slot was released: the model is idle and serves again
            assert (await h.models())["A"]["in_flight"] == 0
            response = await h.client.post("/v1/chat/completions", json=chat("A", max_tokens=2))
            assert response.status_code == 200


async def test_upstream_that_fails_to_start_gives_503_quoting_its_output() -> None:
    config = make_config(responder_model("bad", "--fail-start"), responder_model("good"))
    with trio.fail_after(30):
        async with running(config) as h:
            response = await h.client.post("/v1/chat/completions", json=chat("bad"))
            assert response.status_code == 503
            error = response.json()["error"]
            assert error["code"] == "model_start_failed"
            assert "exit status 1" in error["message"]
            assert "simulated failure" in error["message"]  # the process's own stderr line
            assert h.pid("bad") is None
            response = await h.client.post("/v1/chat/completions", json=chat("good"))
            assert response.status_code == 200


async def test_upstream_that_never_becomes_healthy_times_out_and_is_killed() -> None:
    config = make_config(responder_model("stuck", "--never-healthy"), health_check_timeout=1.0)
    with trio.fail_after(30):
        async with running(config) as h:
            response = await h.client.post("/v1/chat/completions", json=chat("stuck"))
            assert response.status_code == 503
            assert "not ready after 1s" in response.json()["error"]["message"]
            assert h.pid("stuck") is None
            assert (await h.models())["stuck"]["state"] == "stopped"


async def test_crash_mid_stream_reports_an_error_event_and_next_request_restarts() -> None:
    config = make_config(responder_model("A", "--crash-after-tokens", "3", "--tokens", "10"))
    with trio.fail_after(30):
        async with running(config) as h:
            async with h.client.stream(
                "POST", "/v1/chat/completions", json=chat("A", stream=True)
            ) as response:
                assert response.status_code == 200
                events = sse_data([line async for line in response.aiter_lines()])
            assert "[DONE]" not in events
            assert json.loads(events[-1])["error"]["code"] == "bad_gateway"
            await h.wait_for_state("A", "stopped")
            response = await h.client.post("/v1/chat/completions", json=chat("A", max_tokens=2))
            assert response.status_code == 200
            assert (await h.models())["A"]["start_count"] == 2


async def test_upstream_ignoring_sigterm_is_killed_after_the_grace_period() -> None:
    config = make_config(responder_model("A", "--ignore-sigterm", unload_timeout=0.5))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).status_code == 200
            pid = h.pid("A")
            started = trio.current_time()
            response = await h.client.post("/api/models/unload/A")
            assert response.status_code == 200
            assert trio.current_time() - started >= 0.5  # it really waited out the grace
            assert not alive(pid)
            tail = h.server.processes["A"].log.lines()
            assert any("ignoring SIGTERM" in line for line in tail)
            assert any("SIGKILL" in line for line in tail)


async def test_ttl_unloads_an_idle_model() -> None:
    config = make_config(responder_model("A", ttl=0.5))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).status_code == 200
            assert h.pid("A") is not None
            await wait_for(lambda: h.pid("A") is None, what="the TTL to unload A")


async def test_unload_all_stops_every_model() -> None:
    config = make_config(responder_model("A"))
    with trio.fail_after(30):
        async with running(config) as h:
            await h.client.post("/v1/chat/completions", json=chat("A"))
            pid = h.pid("A")
            response = await h.client.post("/api/models/unload")
            assert response.json() == {"msg": "ok"}
            assert not alive(pid)
            assert (await h.client.get("/running")).json() == {"running": []}


async def test_a_body_cut_off_upstream_is_not_passed_off_as_complete() -> None:
    port = free_port()
    script = Path(__file__).parent / "upstreams" / "cut_body.py"
    model = ModelConfig(
        id="cut",
        cmd=(sys.executable, str(script), str(port)),
        proxy=f"http://127.0.0.1:{port}",
    )
    with trio.fail_after(30):
        async with running(make_config(model)) as h:
            with pytest.raises(httpx.RemoteProtocolError):
                await h.client.post("/v1/chat/completions", json=chat("cut"))
            # trio-swap itself is fine
            assert (await h.client.get("/health")).status_code == 200


async def test_shutdown_answers_requests_still_waiting_for_a_model_with_503() -> None:
    """Invariant 4 at shutdown: a queued or loading request gets an answer, not a reset."""
    config = make_config(responder_model("slow", "--load-delay", "5"))
    with trio.fail_after(30):
        async with running(config) as h:
            answers: list[httpx.Response] = []

            async def ask() -> None:
                answers.append(await h.client.post("/v1/chat/completions", json=chat("slow")))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask)
                await h.wait_for_state("slow", "starting")
                h.server.stop()
            (answer,) = answers
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "shutting_down"


async def test_shutdown_does_not_wait_for_idle_keep_alive_connections() -> None:
    """A browser tab or a probe holding a connection open after an admin request must not
    hold up SIGTERM for the whole drain timeout (quart-trio + hypercorn did: see quart_shim)."""
    config = make_config(responder_model("A"))
    with trio.fail_after(60):  # the drain timeout below is far longer
        async with trio.open_nursery() as nursery:
            server: RunningServer = await nursery.start(
                partial(serve, config, port=0, handle_signals=False, shutdown_timeout=3600)
            )
            port = int(server.url.rsplit(":", 1)[1])
            idle = []
            requests = [
                b"GET " + path + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
                for path in (b"/health", b"/api/models", b"/v1/models", b"/no-such-route")
            ]
            # model-routed: answered, streamed, and refused (their disconnect watcher
            # used to cancel hypercorn's keep-alive bookkeeping in the last send)
            for body in (chat("A"), chat("A", stream=True), chat("nope")):
                payload = json.dumps(body).encode()
                requests.append(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\n"
                    b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                    % (len(payload), payload)
                )
            for request in requests:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(request)
                head = await stream.receive_some(65536)
                assert head.startswith(b"HTTP/1.1 "), head
                if b"text/event-stream" in head:  # read the stream to its end
                    while not head.endswith(b"0\r\n\r\n"):
                        head += await stream.receive_some(65536)
                idle.append(stream)
            server.stop()
        for stream in idle:  # the server closed each of them: reading reaches the end
            while await stream.receive_some(65536):
                pass
            await stream.aclose()
