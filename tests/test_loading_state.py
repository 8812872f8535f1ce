"""Loading progress (``sendLoadingState``): what a streaming chat client sees while it waits.

Real responder processes behind a real trio-swap, real HTTP. No test asserts
on timing; the delays only make each stage (queued, loading) last long enough
to produce at least one progress update.
"""

from __future__ import annotations

import json
import socket

import h11
import openai
import trio

from tests.conftest import Harness, chat, make_config, responder_model, running, sse_data
from tests.test_responder import run_responder
from trio_swap.config.model import ModelConfig

LOADING_ID_PREFIX = "trio-swap-loading-"


async def stream_events(h: Harness, model: str, path: str = "/v1/chat/completions") -> list[str]:
    """POST a streaming chat request and return its SSE ``data:`` payloads (status must be 200)."""
    async with h.client.stream("POST", path, json=chat(model, stream=True)) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line async for line in response.aiter_lines()]
    return sse_data(lines)


def progress_of(events: list[str]) -> list[str]:
    """The ``reasoning_content`` texts of trio-swap's loading chunks, in order."""
    texts = []
    for event in events:
        if event == "[DONE]":
            continue
        chunk = json.loads(event)
        if str(chunk.get("id", "")).startswith(LOADING_ID_PREFIX):
            texts.append(chunk["choices"][0]["delta"]["reasoning_content"])
    return texts


def content_of(events: list[str]) -> list[str]:
    """The ``content`` pieces of the upstream's own chunks."""
    pieces = []
    for event in events:
        if event == "[DONE]":
            continue
        chunk = json.loads(event)
        if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
            pieces.append(chunk["choices"][0]["delta"]["content"])
    return pieces


async def test_cold_model_streams_progress_then_the_answer() -> None:
    config = make_config(
        responder_model("A", "--load-delay", "1.5", "--tokens", "5", send_loading_state=True)
    )
    with trio.fail_after(30):
        async with running(config) as h:
            events = await stream_events(h, "A")
    progress = progress_of(events)
    assert progress[0] == "trio-swap: loading model A\n"
    assert any(text.startswith("loading A… ") for text in progress)
    assert progress[-1].startswith("done in ")
    first = json.loads(events[0])
    assert first["object"] == "chat.completion.chunk"
    assert first["model"] == "A"
    assert first["choices"] == [
        {"index": 0, "delta": {"reasoning_content": progress[0]}, "finish_reason": None}
    ]
    # every progress chunk comes before the upstream's first chunk, then [DONE] ends it
    assert all(LOADING_ID_PREFIX in e for e in events[: len(progress)])
    assert len(content_of(events[len(progress) :])) == 5
    assert events[-1] == "[DONE]"


async def test_openai_sdk_sees_progress_as_reasoning_then_content() -> None:
    config = make_config(
        responder_model("A", "--load-delay", "1.5", "--tokens", "6", send_loading_state=True)
    )
    with trio.fail_after(30):
        async with running(config) as h:
            client = openai.OpenAI(base_url=h.server.url + "/v1", api_key="unused")

            def story() -> list[tuple[str, str]]:
                seen: list[tuple[str, str]] = []
                stream = client.chat.completions.create(
                    model="A", messages=[{"role": "user", "content": "hello"}], stream=True
                )
                for chunk in stream:
                    if not chunk.choices:
                        continue
                    delta = chunk.choices[0].delta
                    reasoning = (delta.model_extra or {}).get("reasoning_content")
                    if reasoning:
                        seen.append(("reasoning", str(reasoning)))
                    if delta.content:
                        seen.append(("content", delta.content))
                return seen

            try:
                seen = await trio.to_thread.run_sync(story)
            finally:
                client.close()
    kinds = [kind for kind, _ in seen]
    assert kinds[0] == "reasoning"
    assert "A" in seen[0][1]
    first_content = kinds.index("content")
    assert set(kinds[:first_content]) == {"reasoning"}
    assert set(kinds[first_content:]) == {"content"}
    assert len(kinds[first_content:]) == 6


async def test_ready_model_streams_no_progress() -> None:
    config = make_config(responder_model("A", "--tokens", "4", send_loading_state=True))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).status_code == 200
            events = await stream_events(h, "A")
    assert progress_of(events) == []
    assert not any("reasoning_content" in e for e in events)
    assert len(content_of(events)) == 4
    assert events[-1] == "[DONE]"


async def test_non_streaming_request_to_a_cold_model_just_waits() -> None:
    config = make_config(responder_model("A", "--load-delay", "1.5", send_loading_state=True))
    with trio.fail_after(30):
        async with running(config) as h:
            response = await h.client.post("/v1/chat/completions", json=chat("A"))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"]


async def test_failed_load_ends_the_stream_with_an_error_event_quoting_the_output() -> None:
    # the startup delay only makes the load last long enough for a progress update
    config = make_config(
        responder_model("bad", "--startup-delay", "0.5", "--fail-start", send_loading_state=True)
    )
    with trio.fail_after(30):
        async with running(config) as h:
            events = await stream_events(h, "bad")
            assert h.pid("bad") is None
    assert progress_of(events)[0] == "trio-swap: loading model bad\n"
    error = json.loads(events[-1])["error"]
    assert error["code"] == "model_start_failed"
    assert "simulated failure" in error["message"]  # the process's own stderr line
    assert "[DONE]" not in events


async def test_openai_sdk_raises_the_error_event_of_a_failed_load() -> None:
    config = make_config(
        responder_model("bad", "--startup-delay", "0.5", "--fail-start", send_loading_state=True)
    )
    with trio.fail_after(30):
        async with running(config) as h:
            client = openai.OpenAI(base_url=h.server.url + "/v1", api_key="unused")

            def consume() -> str:
                stream = client.chat.completions.create(
                    model="bad", messages=[{"role": "user", "content": "hello"}], stream=True
                )
                try:
                    for _ in stream:
                        pass
                except openai.APIError as exc:
                    return str(exc)
                raise AssertionError("a failed load must raise")

            try:
                message = await trio.to_thread.run_sync(consume)
            finally:
                client.close()
    assert "simulated failure" in message


async def test_upstream_error_after_progress_becomes_an_error_event() -> None:
    """The 200 is already sent, so the upstream's 400 arrives as an event quoting its body."""
    config = make_config(responder_model("A", "--load-delay", "1.5", send_loading_state=True))
    with trio.fail_after(30):
        async with running(config) as h:
            events = await stream_events(h, "A", "/v1/chat/completions?delay=bogus")
            assert (await h.models())["A"]["in_flight"] == 0
    assert progress_of(events)[-1].startswith("done in ")
    error = json.loads(events[-1])["error"]
    assert error["code"] == "bad_gateway"
    assert "HTTP 400" in error["message"]
    assert "delay must be a number" in error["message"]  # the upstream's own words


async def test_queued_request_shows_its_queue_position_before_loading() -> None:
    config = make_config(
        responder_model("A", "--token-delay", "0.05", "--tokens", "60"),
        responder_model("B", "--load-delay", "1.5", "--tokens", "3", send_loading_state=True),
    )
    with trio.fail_after(30):
        async with running(config) as h:
            a_streaming = trio.Event()
            b_events: list[str] = []

            async def stream_a() -> None:
                async with h.client.stream(
                    "POST", "/v1/chat/completions", json=chat("A", stream=True)
                ) as response:
                    async for line in response.aiter_lines():
                        if '"content"' in line:
                            a_streaming.set()

            async def stream_b() -> None:
                b_events.extend(await stream_events(h, "B"))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream_a)
                await a_streaming.wait()
                nursery.start_soon(stream_b)  # needs A evicted; A is busy: B queues
    progress = progress_of(b_events)
    assert progress[0] == "trio-swap: loading model B\n"
    assert "queue position #1\n" in progress
    loading = [i for i, text in enumerate(progress) if text.startswith("loading B… ")]
    assert loading, progress
    assert progress.index("queue position #1\n") < loading[0]
    assert progress[-1].startswith("done in ")
    assert len(content_of(b_events)) == 3
    assert b_events[-1] == "[DONE]"


async def test_rate_limit_during_a_load_is_a_real_429() -> None:
    """The admission decision comes before the 200, so a rejection is never inside a stream."""
    config = make_config(
        responder_model("A", "--load-delay", "1.5", concurrency_limit=1, send_loading_state=True)
    )
    with trio.fail_after(30):
        async with running(config) as h:
            loading = trio.Event()
            first: list[str] = []

            async def first_request() -> None:
                async with h.client.stream(
                    "POST", "/v1/chat/completions", json=chat("A", stream=True)
                ) as response:
                    assert response.status_code == 200
                    async for line in response.aiter_lines():
                        first.append(line)
                        if LOADING_ID_PREFIX in line:
                            loading.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(first_request)
                await loading.wait()
                response = await h.client.post("/v1/chat/completions", json=chat("A", stream=True))
                assert response.status_code == 429
                assert response.headers["content-type"] == "application/json"
                assert response.headers["retry-after"] == "1"
                assert response.json()["error"]["type"] == "rate_limit_error"
            assert sse_data(first)[-1] == "[DONE]"


async def test_rate_limit_while_in_flight_is_a_real_429() -> None:
    config = make_config(responder_model("A", concurrency_limit=1, send_loading_state=True))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post("/v1/chat/completions", json=chat("A"))).status_code == 200

            async def hold() -> None:
                # ?delay keeps this request in flight upstream for a while
                async with h.client.stream(
                    "POST", "/v1/chat/completions?delay=1", json=chat("A")
                ) as response:
                    await response.aread()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(hold)
                with trio.fail_after(5):
                    while (await h.models())["A"]["in_flight"] == 0:
                        await trio.sleep(0.01)
                response = await h.client.post("/v1/chat/completions", json=chat("A", stream=True))
                assert response.status_code == 429
                assert response.json()["error"]["type"] == "rate_limit_error"


async def test_client_leaving_during_progress_releases_its_place() -> None:
    config = make_config(
        responder_model("A", "--load-delay", "1.5", concurrency_limit=1, send_loading_state=True)
    )
    with trio.fail_after(30):
        async with running(config) as h:
            async with h.client.stream(
                "POST", "/v1/chat/completions", json=chat("A", stream=True)
            ) as response:
                async for line in response.aiter_lines():
                    if LOADING_ID_PREFIX in line:
                        break  # leave after the first progress chunk
            # its place is given back, and the load nobody waits for any more is stopped
            with trio.fail_after(5):
                while (await h.models())["A"]["state"] != "stopped":
                    await trio.sleep(0.02)
            # the slot (concurrencyLimit 1) is free again: a new request is admitted and served
            events = await stream_events(h, "A")
            assert events[-1] == "[DONE]"


async def burst(url: str, body: bytes, count: int) -> list[tuple[int, bytes]]:
    """POST ``body`` to chat completions ``count`` times at once; (status, body) of each answer.

    All connections are open before the first request is written, and the
    requests are written in one loop with no checkpoint in between, so they
    reach trio-swap together and its router works through a backlog of them.
    """
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nhost: %s\r\nconnection: close\r\n"
        b"content-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
        % (host.encode(), len(body), body)
    )
    sockets = []
    for _ in range(count):
        sock = socket.socket()
        sock.setblocking(False)
        sock.connect_ex((host, int(port)))
        sockets.append(sock)
    answers: list[tuple[int, bytes]] = []

    async def read_answer(sock: socket.socket) -> None:
        parser = h11.Connection(h11.CLIENT)
        parser.send(h11.Request(method="POST", target="/", headers=[("host", host)]))
        status = 0
        data = b""
        while True:
            event = parser.next_event()
            if event is h11.NEED_DATA:
                await trio.lowlevel.wait_readable(sock)
                parser.receive_data(sock.recv(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                data += event.data
            elif isinstance(event, h11.EndOfMessage):
                break
        answers.append((status, data))

    try:
        for sock in sockets:
            await trio.lowlevel.wait_writable(sock)  # connected
        for sock in sockets:
            sock.send(request)  # small enough for the socket buffer: never blocks
        async with trio.open_nursery() as nursery:
            for sock in sockets:
                nursery.start_soon(read_answer, sock)
    finally:
        for sock in sockets:
            sock.close()
    return answers


async def test_rate_limit_under_a_burst_is_a_real_429_never_an_error_event() -> None:
    """The 200 waits for the router's own word that the request waits.

    A fixed 50 ms admission window used to commit the 200 for any request the
    router had not answered yet, so under a burst most rejections became an
    error event inside a 200 stream.
    """
    limit, count = 2, 120
    config = make_config(
        # the load outlasts the burst: the requests admitted first hold both slots
        responder_model(
            "A",
            "--load-delay",
            "1",
            "--tokens",
            "2",
            concurrency_limit=limit,
            send_loading_state=True,
        )
    )
    with trio.fail_after(60):
        async with running(config) as h:
            answers = await burst(h.server.url, json.dumps(chat("A", stream=True)).encode(), count)
            assert (await h.models())["A"]["in_flight"] == 0
    assert len(answers) == count
    streams = [sse_data(data.decode().splitlines()) for status, data in answers if status == 200]
    rejected = [data for status, data in answers if status != 200]
    for events in streams:  # served to the end, no error inside
        assert not any('"error"' in event for event in events)
        assert len(content_of(events)) == 2
        assert events[-1] == "[DONE]"
    assert any(progress_of(events) for events in streams)  # the load was waited for
    assert rejected  # the burst went over the limit...
    assert {status for status, _ in answers if status != 200} == {429}  # ...and heard so
    for data in rejected:
        assert json.loads(data)["error"]["type"] == "rate_limit_error"


async def test_a_load_of_a_few_milliseconds_shows_progress_too() -> None:
    """A request that waited for a load streams progress, however short the load.

    The model's "server" is already listening (a responder started here), and
    its command only sleeps: the load is one spawn and one health check.
    """
    with trio.fail_after(30):
        async with run_responder("--model", "A", "--tokens", "3") as responder:
            model = ModelConfig(
                id="A", cmd=("sleep", "600"), proxy=responder.url, send_loading_state=True
            )
            async with running(make_config(model)) as h:
                events = await stream_events(h, "A")
                again = await stream_events(h, "A")  # ready now: granted at once
    progress = progress_of(events)
    assert progress[0] == "trio-swap: loading model A\n"
    assert progress[-1].startswith("done in ")
    assert len(content_of(events)) == 3
    assert events[-1] == "[DONE]"
    assert progress_of(again) == []


async def test_a_stream_cut_off_after_progress_names_the_model_once() -> None:
    config = make_config(
        responder_model("A", "--tokens", "8", "--crash-after-tokens", "2", send_loading_state=True)
    )
    with trio.fail_after(30):
        async with running(config) as h:
            events = await stream_events(h, "A")
    assert progress_of(events)[-1].startswith("done in ")
    assert len(content_of(events)) == 2
    message = json.loads(events[-1])["error"]["message"]
    assert message.startswith("upstream for model 'A' failed: response cut off: ")
    assert message.count("upstream for model") == 1
    assert "[DONE]" not in events
