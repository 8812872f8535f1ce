"""The web UI over HTTP: its static files, the /api/events feed and the load endpoint.

Real responder processes behind a real trio-swap, as in the other HTTP tests.
What a browser does with these is tested in tests/browser (``just test-browser``).
"""

from __future__ import annotations

import re
import socket
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager

import httpx
import msgspec
import pytest
import trio

from tests.conftest import Harness, chat, make_config, responder_model, running
from tests.test_logs import noisy_model
from trio_swap.http import ui as ui_module
from trio_swap.upstream import logs as logs_module

CHAT_LINE = "request POST /v1/chat/completions"
VOLATILE = ("in_flight", "queued")


class Event(msgspec.Struct):
    name: str
    data: object


async def read_events(response: httpx.Response) -> AsyncIterator[Event | str]:
    """SSE events of ``response``; comment lines (heartbeats) come through as strings."""
    name, data = "message", ""
    async for line in response.aiter_lines():
        if line.startswith(":"):
            yield line
        elif line.startswith("event: "):
            name = line[len("event: ") :]
        elif line.startswith("data: "):
            data = line[len("data: ") :]
        elif line == "" and data:
            yield Event(name, msgspec.json.decode(data))
            name, data = "message", ""


async def next_event(events: AsyncIterator[Event | str], name: str, **match: object) -> Event:
    """The next event called ``name`` whose data has the ``match`` items."""
    async for event in events:
        if isinstance(event, Event) and event.name == name:
            data = event.data
            assert isinstance(data, dict)
            if matches(data, match):
                return event
    raise AssertionError(f"the stream ended before a {name} event with {match}")


def matches(data: dict[str, object], match: dict[str, object]) -> bool:
    """Each item equal, or for a compiled pattern, found in the value."""
    return all(
        value.search(str(data.get(key)))
        if isinstance(value, re.Pattern)
        else data.get(key) == value
        for key, value in match.items()
    )


async def events_seen(
    events: AsyncIterator[Event | str], *wanted: tuple[str, dict[str, object]]
) -> list[Event]:
    """Read until each ``(name, match)`` was seen, in any order; the first match of each."""
    found: list[Event | None] = [None] * len(wanted)
    async for event in events:
        if not isinstance(event, Event) or not isinstance(event.data, dict):
            continue
        for index, (name, match) in enumerate(wanted):
            data = event.data
            if found[index] is None and event.name == name and matches(data, match):
                found[index] = event
        if all(event is not None for event in found):
            return [event for event in found if event is not None]
    raise AssertionError(f"the stream ended before {wanted}; found {found}")


@asynccontextmanager
async def event_stream(
    h: Harness, **headers: str
) -> AsyncIterator[tuple[httpx.Response, AsyncIterator[Event | str]]]:
    async with (
        h.client.stream("GET", "/api/events", headers=headers) as response,
        aclosing(read_events(response)) as events,
    ):
        yield response, events


async def wait_for_subscribers(h: Harness, count: int) -> None:
    while h.server.logs.subscriber_count != count:
        await trio.sleep(0.01)


# ---------------------------------------------------------------------------
# Static files


async def test_ui_files_are_served_with_their_types_and_revalidated() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            page = await h.client.get("/ui/")
            assert page.status_code == 200
            assert page.headers["content-type"] == "text/html; charset=utf-8"
            assert "script-src 'self'" in page.headers["content-security-policy"]
            assert '<script type="module" src="/ui/js/main.js">' in page.text
            for path, content_type in (
                ("/ui/style.css", "text/css; charset=utf-8"),
                ("/ui/js/main.js", "text/javascript; charset=utf-8"),
                ("/ui/favicon.svg", "image/svg+xml"),
            ):
                response = await h.client.get(path)
                assert response.status_code == 200, path
                assert response.headers["content-type"] == content_type
                assert response.headers["cache-control"] == "no-cache"
                assert response.headers["x-content-type-options"] == "nosniff"
                etag = response.headers["etag"]
                again = await h.client.get(path, headers={"If-None-Match": etag})
                assert again.status_code == 304
                assert again.content == b""


async def test_every_module_the_app_imports_is_served() -> None:
    """Follow the ES module graph from main.js as the browser would: no import is missing."""
    importer = re.compile(r'^import .*? from "(\.{1,2}/[^"]+)";$', re.MULTILINE)
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            seen: set[str] = set()
            todo = ["/ui/js/main.js"]
            while todo:
                path = todo.pop()
                if path in seen:
                    continue
                seen.add(path)
                response = await h.client.get(path)
                assert response.status_code == 200, path
                assert response.headers["content-type"].startswith("text/javascript")
                base = httpx.URL("http://ui" + path)
                todo.extend(base.join(spec).path for spec in importer.findall(response.text))
    assert {"/ui/js/pages/models.js", "/ui/js/pages/playground.js", "/ui/js/sse.js"} <= seen


async def test_pages_get_the_app_and_missing_files_are_404() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            index = (await h.client.get("/ui/")).text
            for path in ("/ui/models", "/ui/logs?source=m", "/ui/some/deeper/page"):
                response = await h.client.get(path)
                assert response.status_code == 200, path
                assert response.text == index
            missing = await h.client.get("/ui/js/missing.js")
            assert missing.status_code == 404
            assert missing.json()["error"]["code"] == "not_found"
            bare = await h.client.get("/ui")
            assert (bare.status_code, bare.headers["location"]) == (302, "/ui/")


async def test_root_redirects_to_the_ui() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            response = await h.client.get("/")
    assert response.status_code == 302
    assert response.headers["location"] == "/ui/"


# ---------------------------------------------------------------------------
# /api/events


async def test_events_begin_with_a_snapshot_of_api_models() -> None:
    config = make_config(responder_model("a", aliases=("first",)), responder_model("b"))
    async with running(config) as h:
        with trio.fail_after(30):
            listed = (await h.client.get("/api/models")).json()
            async with event_stream(h) as (response, events):
                assert response.status_code == 200
                assert response.headers["content-type"] == "text/event-stream"
                assert response.headers["x-accel-buffering"] == "no"
                assert response.headers["cache-control"] == "no-cache"
                snapshot = await anext(events)
    assert isinstance(snapshot, Event)
    assert snapshot.name == "snapshot"
    assert snapshot.data == {**listed, "profile": None}  # the same rows, swaps and version


async def test_events_follow_a_load_live() -> None:
    async with running(make_config(responder_model("m", "--load-delay", "0.5"))) as h:
        with trio.fail_after(60):
            async with event_stream(h) as (_, events):
                snapshot = await next_event(events, "snapshot")
                assert isinstance(snapshot.data, dict)
                assert snapshot.data["models"][0]["state"] == "stopped"
                loaded = await h.client.post("/api/models/load/m")
                assert loaded.status_code == 200
                # The state changes come from polling, the log lines as written: any order.
                _, ready, _, model_log = await events_seen(
                    events,
                    ("model", {"id": "m", "state": "starting"}),
                    ("model", {"id": "m", "state": "ready"}),
                    ("log", {"source": "proxy", "line": re.compile(r"\[INFO\] model m: ready in")}),
                    ("log", {"source": "m"}),
                )
                assert isinstance(ready.data, dict)
                assert isinstance(ready.data["pid"], int)
                assert ready.data["start_count"] == 1
                assert isinstance(ready.data["last_ready_seconds"], float)
                assert isinstance(model_log.data, dict)
                assert str(model_log.data["line"]).startswith("responder m listening")
                await h.client.post("/api/models/unload/m")
                await next_event(events, "model", id="m", state="stopped", pid=None)


async def test_events_carry_model_log_lines_live_and_as_history() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(60):
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                response = await h.client.post("/v1/chat/completions", json=chat("m"))
                assert response.status_code == 200
                listening = await next_event(events, "log", source="m")
                assert isinstance(listening.data, dict)
                assert str(listening.data["line"]).startswith("responder m listening")
                await next_event(events, "log", source="m", line=CHAT_LINE)
            # A new client gets the recent lines first, in the order written.
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                history = await next_event(events, "log", source="m", line=CHAT_LINE)
    assert history.data == {"source": "m", "line": CHAT_LINE}


async def test_events_announce_each_finished_request_once() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(60):
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                response = await h.client.post("/v1/chat/completions", json=chat("m"))
                assert response.status_code == 200
                first = await next_event(events, "activity", model="m")
            listed = (await h.client.get("/api/activity")).json()["data"]
            # A new client is told only about requests that finish after it connected.
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                response = await h.client.post("/v1/chat/completions", json=chat("m", stream=True))
                assert response.status_code == 200
                second = await next_event(events, "activity")
    assert first.data == listed[0]  # the row GET /api/activity lists
    assert isinstance(first.data, dict)
    assert (first.data["endpoint"], first.data["status"]) == ("/v1/chat/completions", 200)
    assert isinstance(second.data, dict)
    assert second.data["id"] > first.data["id"]
    assert second.data["stream"] is True


async def test_events_stream_lets_go_when_the_client_leaves() -> None:
    config = make_config(responder_model("a"), responder_model("b"))
    async with running(config) as h:
        with trio.fail_after(30):
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                # One follower each for the proxy log and every model's log.
                assert h.server.logs.subscriber_count == 3
            await wait_for_subscribers(h, 0)
            assert all(ring.subscriber_count == 0 for ring in h.server.logs.rings())
            # Nothing is left behind that a model's output could still feed.
            assert (await h.client.post("/v1/chat/completions", json=chat("a"))).status_code == 200
            assert h.server.logs.subscriber_count == 0


async def test_a_reload_that_changes_the_models_ends_the_stream_to_start_afresh() -> None:
    first = responder_model("a")
    async with running(make_config(first)) as h:
        with trio.fail_after(60):
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                await h.server.reload(make_config(first, responder_model("b")))
                rest = [event async for event in events]  # the stream ends by itself
            assert not any(isinstance(event, Event) and event.name == "snapshot" for event in rest)
            # The client connects again: the new model is listed and its log followed.
            async with event_stream(h) as (_, events):
                snapshot = await next_event(events, "snapshot")
                response = await h.client.post("/v1/chat/completions", json=chat("b"))
                assert response.status_code == 200
                await next_event(events, "log", source="b", line=CHAT_LINE)
    assert isinstance(snapshot.data, dict)
    assert [row["id"] for row in snapshot.data["models"]] == ["a", "b"]


async def test_a_client_that_does_not_read_costs_the_models_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A small follower buffer and a client that never reads: once the socket
    # buffers and the feed's queue are full, its followers must drop lines.
    monkeypatch.setattr(logs_module, "SUBSCRIBER_BUFFER", 16)
    bulk, width = 1800, 4000  # ~7 MB: more than the socket buffers hold
    async with running(make_config(noisy_model("m", bulk, width))) as h:
        ring = h.server.logs.models["m"]
        url = httpx.URL(h.server.url)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with sock, trio.fail_after(120):
            await sock.connect((url.host, url.port))
            await sock.send(b"GET /api/events HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await wait_for_subscribers(h, 2)  # the proxy log and m's
            for _ in range(3):
                response = await h.client.post("/v1/chat/completions", json=chat("m"))
                assert response.status_code == 200
            assert ring.dropped > 0
            bulk_lines = [line for line in ring.lines() if line.startswith("bulk ")]
            assert len(bulk_lines) == bulk  # the model's own log lost nothing
            assert ring.lines().count(CHAT_LINE) == 3
        with trio.fail_after(30):
            await wait_for_subscribers(h, 0)  # the stuck client left: its feed is gone


async def test_idle_stream_gets_heartbeats(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ui_module, "HEARTBEAT_INTERVAL", 0.05)
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                async for event in events:
                    if event == ": keep-alive":
                        break


async def test_shutdown_ends_the_event_stream() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            async with event_stream(h) as (_, events):
                await next_event(events, "snapshot")
                h.server.stop()
                rest = [event async for event in events]  # ends: no hang
    assert all(isinstance(event, Event) and event.name == "log" for event in rest)


# ---------------------------------------------------------------------------
# POST /api/models/load/<model>


async def test_load_answers_once_the_model_is_ready() -> None:
    config = make_config(responder_model("org/m", "--load-delay", "0.3", aliases=("short",)))
    async with running(config) as h:
        with trio.fail_after(60):
            response = await h.client.post("/api/models/load/short")
            assert response.status_code == 200
            assert response.json() == {"msg": "ok", "model": "org/m"}
            row = (await h.models())["org/m"]
            assert (row["state"], row["in_flight"], row["start_count"]) == ("ready", 0, 1)
            again = await h.client.post("/api/models/load/org/m")  # already ready: no new start
            assert again.status_code == 200
            assert (await h.models())["org/m"]["start_count"] == 1


async def test_load_of_an_unknown_model_is_a_404() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            response = await h.client.post("/api/models/load/nope")
            wrong_method = await h.client.get("/api/models/load/m")
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "model_not_found"
    assert "'nope'" in response.json()["error"]["message"]
    assert wrong_method.status_code == 405


async def test_load_that_fails_quotes_the_model_output() -> None:
    async with running(make_config(responder_model("m", "--fail-start"))) as h:
        with trio.fail_after(60):
            response = await h.client.post("/api/models/load/m")
    assert response.status_code == 503
    assert "m" in response.json()["error"]["message"]


# ---------------------------------------------------------------------------
# apiKeys


async def test_with_api_keys_the_ui_loads_but_its_data_needs_the_key() -> None:
    config = msgspec.structs.replace(make_config(responder_model("m")), api_keys=("sesame",))
    async with running(config) as h:
        with trio.fail_after(30):
            for path in ("/", "/ui", "/ui/", "/ui/models", "/ui/js/main.js", "/ui/style.css"):
                response = await h.client.get(path)
                assert response.status_code in (200, 302), path
            for method, path in (
                ("GET", "/api/events"),
                ("POST", "/api/models/load/m"),
                ("GET", "/api/models"),
                ("POST", "/v1/chat/completions"),
                # A path that climbs out of /ui is not a UI file.
                ("GET", "/ui/%2e%2e/api/models"),
                ("GET", "/ui/../api/events"),
            ):
                response = await h.client.request(method, path)
                assert response.status_code == 401, path
            key = {"Authorization": "Bearer sesame"}
            async with event_stream(h, **key) as (response, events):
                assert response.status_code == 200
                await next_event(events, "snapshot")
            loaded = await h.client.post("/api/models/load/m", headers={"x-api-key": "sesame"})
            assert loaded.status_code == 200
