"""Log history and live log streams: the rings on their own, then over real HTTP.

The HTTP tests run real responder processes behind a real trio-swap; the
responder prints ``request POST /v1/chat/completions`` for each request, and
trio-swap logs ``model <id>: ready in ...`` when a model comes up.
"""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import AsyncIterator, Callable

import httpx
import msgspec
import pytest
import trio

from tests.conftest import Harness, chat, make_config, responder_model, running, wait_for
from trio_swap.config.model import ModelConfig
from trio_swap.upstream import logs as logs_module
from trio_swap.upstream.logs import (
    MAX_LINE_CHARS,
    LogBook,
    LogRing,
    dropped_marker,
    follow,
)
from trio_swap.upstream.proxy_log import ProxyLogCapture

CHAT_LINE = "request POST /v1/chat/completions"

# ---------------------------------------------------------------------------
# Rings and followers, no I/O


def test_ring_keeps_the_last_lines_and_cuts_long_ones() -> None:
    ring = LogRing("m", max_lines=3)
    ring.feed(b"one\ntwo\r\nthr")
    assert ring.lines() == ["one", "two"]
    ring.feed(b"ee\nfour\n")
    assert ring.lines() == ["two", "three", "four"]
    assert ring.tail(2) == ["three", "four"]
    ring.append("x" * (MAX_LINE_CHARS + 10))
    assert ring.lines()[-1] == "x" * MAX_LINE_CHARS + "…"


async def test_follower_gets_lines_appended_after_subscribing() -> None:
    ring = LogRing("m")
    ring.append("before")
    with ring.subscribe() as follower:
        assert ring.subscriber_count == 1
        ring.append("a")
        ring.append("b")
        assert await follower.receive_batch() == ["a", "b"]
        ring.append("c")
        assert await follower.receive_batch() == ["c"]
    assert ring.subscriber_count == 0
    ring.append("after")  # nobody to tell: no error
    assert ring.lines() == ["before", "a", "b", "c", "after"]


async def test_follower_waits_for_the_next_line() -> None:
    ring = LogRing("m")
    with ring.subscribe() as follower:
        got: list[str] = []

        async def reader() -> None:
            got.extend(await follower.receive_batch())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            await trio.testing.wait_all_tasks_blocked()
            assert got == []
            ring.append("late")
        assert got == ["late"]


async def test_slow_follower_misses_lines_and_reads_one_marker() -> None:
    ring = LogRing("m")
    with ring.subscribe(buffer=3) as follower:
        for i in range(10):
            ring.append(f"line {i}")  # never blocks, whatever the follower does
        assert follower.dropped == 7
        assert ring.dropped == 7
        assert ring.lines() == [f"line {i}" for i in range(10)]  # the ring keeps them all
        batch = await follower.receive_batch()
        assert batch == ["line 0", "line 1", "line 2", dropped_marker(7)]
        assert dropped_marker(7) == "[trio-swap: 7 lines dropped]"
        ring.append("line 10")
        assert await follower.receive_batch() == ["line 10"]


async def test_dropped_marker_sits_where_the_gap_is() -> None:
    ring = LogRing("m")
    with ring.subscribe(buffer=2) as follower:
        for line in "abcd":
            ring.append(line)  # c, d dropped
        assert await follower.receive_batch(limit=1) == ["a"]
        ring.append("e")  # room for the marker only: e dropped in turn
        ring.append("f")
        assert await follower.receive_batch() == ["b", dropped_marker(2), dropped_marker(2)]
        assert follower.dropped == 4
        ring.append("g")
        assert await follower.receive_batch() == ["g"]


async def test_blocked_follower_costs_the_writer_nothing() -> None:
    ring = LogRing("m", max_lines=100_000)
    with ring.subscribe(buffer=10) as stuck, ring.subscribe() as reading:
        for i in range(50_000):
            ring.append(f"{i}")
        assert len(ring) == 50_000
        assert stuck.dropped == 50_000 - 10
        assert reading.dropped == 50_000 - logs_module.SUBSCRIBER_BUFFER
    assert ring.subscriber_count == 0


async def test_follow_several_rings_in_write_order() -> None:
    book = LogBook()
    model = book.add_model("org/m")
    with follow([book.proxy, book.upstream]) as follower:
        book.proxy.append("p1")
        model.append("m1")
        book.proxy.append("p2")
        assert book.subscriber_count == 1
        assert await follower.receive_batch() == ["p1", "[org/m] m1", "p2"]
    assert book.subscriber_count == 0
    assert model.lines() == ["m1"]
    assert book.upstream.lines() == ["[org/m] m1"]
    assert book.history() == ["p1", "[org/m] m1", "p2"]


async def test_ending_followers_lets_them_finish_what_is_queued() -> None:
    book = LogBook()
    with book.proxy.subscribe() as follower:
        book.proxy.append("last")
        book.end_followers()
        book.proxy.append("too late")
        assert await follower.receive_batch() == ["last"]
        assert await follower.receive_batch() == []
    with book.proxy.subscribe() as late:
        assert await late.receive_batch() == []


async def test_proxy_capture_keeps_records_and_restores_the_logger() -> None:
    logger = logging.getLogger("trio_swap")
    level, propagate, handlers = logger.level, logger.propagate, list(logger.handlers)
    seen: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record)

    root = logging.getLogger()
    collect = Collect()
    root.addHandler(collect)
    root_level = root.level
    root.setLevel(logging.WARNING)
    ring = LogRing("proxy")
    try:
        with ProxyLogCapture(ring, "info"):
            logging.getLogger("trio_swap.test").info("hello %s", "there")
            logging.getLogger("trio_swap.test").warning("careful")
            logging.getLogger("trio_swap.test").debug("too detailed")
            await trio.to_thread.run_sync(logging.getLogger("trio_swap.test").error, "threaded")
            await trio.testing.wait_all_tasks_blocked()
        logging.getLogger("trio_swap.test").warning("not captured")
    finally:
        root.removeHandler(collect)
        root.setLevel(root_level)
    lines = ring.lines()
    assert [line.split(" ", 2)[2] for line in lines] == [
        "[INFO] hello there",
        "[WARNING] careful",
        "[ERROR] threaded",
    ]
    # The console (root handlers) saw what it saw before: WARNING and up only.
    assert [r.getMessage() for r in seen] == ["careful", "threaded", "not captured"]
    assert (logger.level, logger.propagate) == (level, propagate)
    assert logger.handlers == handlers


# ---------------------------------------------------------------------------
# Over HTTP


async def next_line_where(lines: AsyncIterator[str], predicate: Callable[[str], bool]) -> list[str]:
    """Lines read up to and including the first one ``predicate`` accepts."""
    read: list[str] = []
    async for line in lines:
        read.append(line)
        if predicate(line):
            return read
    raise AssertionError(f"stream ended before the line; read {read}")


async def post_chat(h: Harness, model: str) -> None:
    response = await h.client.post("/v1/chat/completions", json=chat(model))
    assert response.status_code == 200, response.text


async def wait_for_subscribers(h: Harness, count: int) -> None:
    await wait_for(
        lambda: h.server.logs.subscriber_count == count,
        what=f"{count} log stream subscribers",
        timeout=20,
    )


async def test_logs_history_has_proxy_and_model_lines_in_order() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(60):
            await post_chat(h, "m")
            response = await h.client.get("/logs")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    ready = next(i for i, line in enumerate(lines) if "[INFO] model m: ready in" in line)
    chat_line = lines.index(f"[m] {CHAT_LINE}")
    assert ready < chat_line  # merged in the order written
    assert any(line.startswith("[m] responder m listening") for line in lines)


async def test_model_stream_gives_history_then_live_lines_by_id_or_alias() -> None:
    model = responder_model("org/m", aliases=("short",))
    async with running(make_config(model)) as h:
        with trio.fail_after(60):
            await post_chat(h, "org/m")
            for name in ("org/m", "short"):
                async with h.client.stream("GET", f"/logs/stream/{name}") as response:
                    assert response.status_code == 200
                    assert response.headers["content-type"] == "text/plain; charset=utf-8"
                    assert response.headers["x-accel-buffering"] == "no"
                    assert response.headers["cache-control"] == "no-cache"
                    lines = response.aiter_lines()
                    history = await next_line_where(lines, lambda line: line == CHAT_LINE)
                    assert history[0].startswith("responder org/m listening")
                    await post_chat(h, "short")
                    live = await next_line_where(lines, lambda line: line == CHAT_LINE)
                    assert not any("listening" in line for line in live)
            await wait_for_subscribers(h, 0)


async def test_no_history_gives_only_live_lines() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(60):
            await post_chat(h, "m")
            async with h.client.stream("GET", "/logs/stream/m?no-history") as response:
                assert response.status_code == 200
                lines = response.aiter_lines()
                await post_chat(h, "m")
                live = await next_line_where(lines, lambda line: line == CHAT_LINE)
        assert not any("listening" in line or "GET /health" in line for line in live)


async def test_unknown_model_stream_is_a_400_naming_it() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            response = await h.client.get("/logs/stream/no/such-model")
    assert response.status_code == 400
    error = response.json()["error"]
    assert "'no/such-model'" in error["message"]
    assert error["type"] == "invalid_request_error"


async def test_upstream_stream_prefixes_each_line_with_the_model() -> None:
    config = make_config(responder_model("a"), responder_model("b"))
    async with running(config) as h:
        with trio.fail_after(60):
            await post_chat(h, "a")
            async with h.client.stream("GET", "/logs/stream/upstream?no-history") as response:
                lines = response.aiter_lines()
                await post_chat(h, "a")
                live = await next_line_where(lines, lambda line: CHAT_LINE in line)
                assert live[-1] == f"[a] {CHAT_LINE}"
                await post_chat(h, "b")  # swaps: a stops, b starts
                live = await next_line_where(lines, lambda line: CHAT_LINE in line)
                assert live[-1] == f"[b] {CHAT_LINE}"
                assert any(line.startswith("[b] responder b listening") for line in live)
                assert all(line.startswith(("[a] ", "[b] ")) for line in live)


async def test_combined_stream_has_proxy_and_upstream_lines() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(60):
            async with h.client.stream("GET", "/logs/stream?no-history") as response:
                lines = response.aiter_lines()
                await post_chat(h, "m")  # starts the model: trio-swap logs, m prints
                live = await next_line_where(lines, lambda line: line == f"[m] {CHAT_LINE}")
        assert any("[INFO] model m: ready in" in line for line in live)
        assert any(line.startswith("[m] responder m listening") for line in live)


async def test_proxy_stream_has_only_trio_swap_lines() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(60):
            async with h.client.stream("GET", "/logs/stream/proxy") as response:
                lines = response.aiter_lines()
                await post_chat(h, "m")
                live = await next_line_where(lines, lambda line: "model m: ready in" in line)
        assert all(" [" in line and not line.startswith("[m]") for line in live)


async def test_disconnected_follower_is_unsubscribed() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(60):
            await post_chat(h, "m")
            for path in ("/logs/stream", "/logs/stream/m?no-history", "/logs/stream/upstream"):
                async with h.client.stream("GET", path) as response:
                    assert response.status_code == 200
                    assert h.server.logs.subscriber_count == 1
                # The client closed the connection while the stream waited for a line.
                await wait_for_subscribers(h, 0)
            await post_chat(h, "m")  # and nothing is left to feed
            assert all(ring.subscriber_count == 0 for ring in h.server.logs.rings())


async def test_shutdown_ends_open_streams() -> None:
    async with running(make_config(responder_model("m"))) as h:
        with trio.fail_after(30):
            async with h.client.stream("GET", "/logs/stream/proxy") as response:
                h.server.stop()
                body = [line async for line in response.aiter_lines()]  # ends: no hang
    assert body == [] or all(" [" in line for line in body)


def noisy_model(model_id: str, lines: int, width: int) -> ModelConfig:
    """A responder whose process first prints ``lines`` long lines ``bulk <i> xxx...``."""
    model = responder_model(model_id)
    script = (
        "import os, sys\n"
        f"for i in range({lines}):\n"
        f"    sys.stdout.write(f'bulk {{i}} ' + 'x' * {width} + '\\n')\n"
        "sys.stdout.flush()\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    return msgspec.structs.replace(model, cmd=(sys.executable, "-c", script, *model.cmd))


async def test_blocked_follower_does_not_slow_the_model(monkeypatch: pytest.MonkeyPatch) -> None:
    # A small follower buffer and a reader that never reads: once the socket buffers
    # are full, the stream's writer blocks and the follower must drop lines.
    monkeypatch.setattr(logs_module, "SUBSCRIBER_BUFFER", 16)
    bulk, width = 1800, 4000  # ~7 MB: more than the socket buffers hold (4 MB by default)
    async with running(make_config(noisy_model("m", bulk, width))) as h:
        ring = h.server.logs.models["m"]
        url = httpx.URL(h.server.url)
        sock = trio.socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        with sock, trio.fail_after(120):
            await sock.connect((url.host, url.port))
            await sock.send(b"GET /logs/stream/m HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await wait_for_subscribers(h, 1)
            for _ in range(3):
                await post_chat(h, "m")  # starts m (the bulk output), then plain requests
            assert ring.dropped > 0
            bulk_lines = [line for line in ring.lines() if line.startswith("bulk ")]
            assert [line.split(" ", 2)[1] for line in bulk_lines] == [str(i) for i in range(bulk)]
            assert ring.lines().count(CHAT_LINE) == 3
        with trio.fail_after(30):
            await wait_for_subscribers(h, 0)  # the stuck client left: its follower is gone
