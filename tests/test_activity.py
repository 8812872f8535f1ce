"""The activity log as a user reads it: ``GET /api/activity`` after real requests."""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
import trio

from tests.conftest import (
    Harness,
    chat,
    make_config,
    responder_model,
    running,
    sse_data,
    wait_for,
)
from tests.test_cli import trio_swap as run_cli
from tests.test_cli import write_config
from trio_swap.config import ConfigError
from trio_swap.config.load import load_config_text
from trio_swap.config.model import Config, PeerConfig
from trio_swap.observe import activity as activity_module
from trio_swap.observe.activity import ActivityLog, ActivityRow

CHAT = "/v1/chat/completions"
Row = dict[str, Any]


async def activity(h: Harness, **params: object) -> dict[str, Any]:
    response = await h.client.get("/api/activity", params=params)  # type: ignore[arg-type]
    assert response.status_code == 200, response.text
    page: dict[str, Any] = response.json()
    return page


async def rows_once(h: Harness, count: int, **params: object) -> list[Row]:
    """The rows, once ``count`` are there (a row lands just after its response)."""

    async def enough() -> list[Row] | None:
        rows: list[Row] = (await activity(h, **params))["data"]
        return rows if len(rows) >= count else None

    return await wait_for(enough, what=f"{count} activity rows")


async def stream_events(h: Harness, path: str, body: dict[str, object]) -> list[str]:
    async with h.client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        return sse_data([line async for line in response.aiter_lines()])


async def test_plain_and_streamed_requests_log_tokens_speed_and_wait() -> None:
    config = make_config(responder_model("A"))
    with trio.fail_after(30):
        async with running(config) as h:
            cold = await h.client.post(CHAT, json=chat("A", "one two three"))
            assert cold.status_code == 200
            events = await stream_events(h, CHAT, chat("A", "four five", stream=True))
            final = json.loads(events[-2])  # the event before [DONE] carries usage

            warm_row, cold_row = await rows_once(h, 2)
            for row in (warm_row, cold_row):
                assert row["model"] == "A"
                assert row["endpoint"] == CHAT and row["method"] == "POST"
                assert row["status"] == 200
                assert row["error"] is None
                assert row["tokens_per_second"] > 0
                assert row["duration_ms"] >= row["wait_ms"] >= 0
                assert row["upstream_ms"] >= 0
            assert warm_row["id"] > cold_row["id"] and warm_row["time"] >= cold_row["time"]
            assert cold_row["stream"] is False and warm_row["stream"] is True
            usage = cold.json()["usage"]
            assert cold_row["prompt_tokens"] == usage["prompt_tokens"] == 3
            assert cold_row["completion_tokens"] == usage["completion_tokens"]
            assert warm_row["prompt_tokens"] == final["usage"]["prompt_tokens"] == 2
            assert warm_row["completion_tokens"] == final["usage"]["completion_tokens"]
            # The reported speed is kept as the upstream (llama.cpp timings) gave it.
            assert warm_row["tokens_per_second"] == final["timings"]["predicted_per_second"]
            # The first request waited for the model to load; the second found it ready.
            assert cold_row["wait_ms"] > warm_row["wait_ms"]


async def test_tokens_are_read_from_every_api_family_streamed_or_not() -> None:
    config = make_config(responder_model("A", "--tokens", "7"))
    messages = {"model": "A", "max_tokens": 7, "messages": [{"role": "user", "content": "a b"}]}
    native = {"model": "A", "prompt": "a b"}
    requests: list[tuple[str, dict[str, object]]] = [
        ("/v1/completions", {"model": "A", "prompt": "a b"}),
        ("/v1/completions", {"model": "A", "prompt": "a b", "stream": True}),
        ("/v1/messages", messages),
        ("/v1/messages", {**messages, "stream": True}),
        ("/v1/responses", {"model": "A", "input": "a b"}),
        ("/completion", native),
        ("/completion", {**native, "stream": True}),
    ]
    with trio.fail_after(30):
        async with running(config) as h:
            for path, body in requests:
                response = await h.client.post(path, json=body)
                assert response.status_code == 200, (path, response.text)
            rows = await rows_once(h, len(requests))
    for row, (path, body) in zip(reversed(rows), requests, strict=True):
        assert row["endpoint"] == path
        assert row["stream"] is bool(body.get("stream"))
        assert row["completion_tokens"] == 7, row
        assert row["prompt_tokens"] == 2, row


async def test_failed_requests_are_logged_with_status_and_message() -> None:
    config = make_config(responder_model("broken", "--fail-start"))
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.post(CHAT, json=chat("nope"))).status_code == 404
            assert (await h.client.post(CHAT, content=b"{not json")).status_code == 400
            assert (await h.client.post(CHAT, json=chat("broken"))).status_code == 503
            start_failed, bad_json, unknown = await rows_once(h, 3)
    assert (unknown["status"], unknown["model"]) == (404, "")
    assert "nope" in unknown["error"]
    assert unknown["wait_ms"] is None and unknown["upstream_ms"] is None
    assert bad_json["status"] == 400 and "JSON" in bad_json["error"]
    assert (start_failed["status"], start_failed["model"]) == (503, "broken")
    assert "failed to start" in start_failed["error"]
    assert start_failed["upstream_ms"] is None  # it never got as far as the upstream


async def test_pages_newest_first_with_a_cursor_and_a_model_filter() -> None:
    config = make_config(responder_model("A"), responder_model("B", aliases=("bee",)))
    with trio.fail_after(30):
        async with running(config) as h:
            for model in ("A", "A", "B", "A", "B"):
                assert (await h.client.post(CHAT, json=chat(model))).status_code == 200
            everything = await rows_once(h, 5)
            ids = [row["id"] for row in everything]
            assert ids == sorted(ids, reverse=True)
            assert [row["model"] for row in everything] == ["B", "A", "B", "A", "A"]

            paged: list[int] = []
            page = await activity(h, limit=2)
            while True:
                assert len(page["data"]) <= 2
                paged.extend(row["id"] for row in page["data"])
                if page["next"] is None:
                    break
                page = await activity(h, limit=2, before=page["next"])
            assert paged == ids

            only_b = (await activity(h, model="bee"))["data"]  # an alias names its model
            assert [row["id"] for row in only_b] == [ids[0], ids[2]]
            older_b = await activity(h, model="B", limit=1, before=ids[0])
            assert [row["id"] for row in older_b["data"]] == [ids[2]]
            assert older_b["next"] is None

            for bad in ({"limit": 0}, {"limit": 5000}, {"before": "x"}):
                response = await h.client.get("/api/activity", params=bad)
                assert response.status_code == 400
                assert response.json()["error"]["type"] == "invalid_request_error"


async def test_the_in_memory_log_keeps_only_the_newest_rows() -> None:
    config = msgspec.structs.replace(make_config(responder_model("A")), metrics_max_in_memory=3)
    with trio.fail_after(30):
        async with running(config) as h:
            for words in range(1, 6):
                prompt = " ".join(["w"] * words)
                assert (await h.client.post(CHAT, json=chat("A", prompt))).status_code == 200

            async def fifth_logged() -> list[Row] | None:
                rows: list[Row] = (await activity(h))["data"]
                return rows if rows[0]["prompt_tokens"] == 5 else None

            rows = await wait_for(fifth_logged, what="the fifth request's row")
    assert [row["prompt_tokens"] for row in rows] == [5, 4, 3]


async def test_a_file_log_survives_a_restart_and_keeps_its_row_limit(tmp_path: Path) -> None:
    path = tmp_path / "activity.sqlite"
    with trio.fail_after(60):
        async with running(make_config(responder_model("A")), activity_db=str(path)) as h:
            for _ in range(3):
                assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            before = await rows_once(h, 3)
        # The same file through the config (store.path), now keeping two rows.
        config = msgspec.structs.replace(
            make_config(responder_model("A")), store_path=str(path), store_max_rows=2
        )
        async with running(config) as h:
            # Nothing asked yet: all from the file; captures live in memory, so none survived.
            assert all(row["has_capture"] for row in before)
            stored = [{**row, "has_capture": False} for row in before]
            assert (await activity(h))["data"] == stored
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200

            async def new_row_logged() -> list[Row] | None:
                rows: list[Row] = (await activity(h))["data"]
                return rows if rows[0]["id"] != before[0]["id"] else None

            rows = await wait_for(new_row_logged, what="the new request's row")
    assert [row["id"] for row in rows] == [before[0]["id"] + 1, before[0]["id"]]


async def test_peer_requests_are_logged_under_the_peer_qualified_name() -> None:
    remote = make_config(responder_model("big", "--tokens", "4"))
    with trio.fail_after(60):
        async with running(remote) as far:
            peer = PeerConfig(id="gpu2", proxy=far.server.url, models=("big",))
            near = Config(source="<test>", models={}, log_to_stdout="none", peers={"gpu2": peer})
            async with running(near) as h:
                events = await stream_events(h, CHAT, chat("gpu2/big", stream=True))
                assert events[-1] == "[DONE]"
                (row,) = await rows_once(h, 1)
                far_rows = await rows_once(far, 1)
    assert (row["model"], row["status"], row["stream"]) == ("gpu2/big", 200, True)
    assert row["completion_tokens"] == 4
    assert row["wait_ms"] is None  # no lease here: the peer schedules its own models
    assert far_rows[0]["model"] == "big"


async def test_cli_activity_db_is_an_sqlite_file_written_by_shutdown(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    database = tmp_path / "log.db"
    with trio.fail_after(60):
        async with run_cli("--config", str(config), "--activity-db", str(database)) as (
            process,
            url,
        ):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                assert (await client.post(CHAT, json=chat("alpha"))).status_code == 200
            process.send_signal(signal.SIGTERM)  # at once: the row may still be in memory
            assert await process.wait() == 0
    with sqlite3.connect(database) as db:
        rows = db.execute("SELECT model, endpoint, status FROM activity").fetchall()
    assert rows == [("alpha", CHAT, 200)]


def test_config_keys_for_the_activity_store(tmp_path: Path) -> None:
    def load(text: str) -> Config:
        return load_config_text(text, "config.yaml")

    config = load("metricsMaxInMemory: 50\nstore: {path: /tmp/a.db, maxRows: 10}\n")
    assert (config.metrics_max_in_memory, config.store_path, config.store_max_rows) == (
        50,
        "/tmp/a.db",
        10,
    )
    assert config.warnings == ()
    defaults = load("metricsMaxInMemory: 0\n")  # as in llama-swap: <= 0 means the default
    assert (defaults.metrics_max_in_memory, defaults.store_path) == (1000, None)
    with pytest.raises(ConfigError, match=r"store\.path"):
        load("store: {maxRows: 5}\n")
    with pytest.raises(ConfigError, match="directory"):
        load(f"store: {{path: {tmp_path}}}\n")
    with pytest.raises(ConfigError, match="maxRows"):
        load("store: {path: x.db, maxRows: -1}\n")


def _row(n: int) -> ActivityRow:
    return ActivityRow(
        time=float(n), model="m", endpoint="/v1/x", method="POST", status=200, duration_ms=1.0
    )


async def test_a_reader_cancelled_while_the_database_is_busy_loses_no_rows(
    tmp_path: Path,
) -> None:
    store = ActivityLog(str(tmp_path / "a.db"))
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            await nursery.start(store.run)
            release = trio.Event()

            async def busy(task_status: trio.TaskStatus[None]) -> None:
                async with store._lock:  # another write, a slow disk
                    task_status.started()
                    await release.wait()

            await nursery.start(busy)
            for n in range(5):
                store.add(_row(n))
            async with trio.open_nursery() as reader:
                reader.start_soon(partial(store.page, limit=10))
                await trio.testing.wait_all_tasks_blocked()  # it waits for the busy disk
                reader.cancel_scope.cancel()  # an /api/events client leaves meanwhile
            release.set()
            page = await store.page(limit=10)
            assert [row.time for row in page.data] == [4.0, 3.0, 2.0, 1.0, 0.0]
            nursery.cancel_scope.cancel()


async def test_a_hung_disk_does_not_hang_shutdown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(activity_module, "SHUTDOWN_SECONDS", 0.2)
    store = ActivityLog(str(tmp_path / "a.db"))
    hung = threading.Event()
    disk_back = threading.Event()

    def write_forever(rows: list[ActivityRow]) -> None:
        hung.set()
        disk_back.wait(60)  # an NFS mount gone away (back when the test ends)

    try:
        with trio.fail_after(20):  # the disk would hold shutdown for 60 s
            async with trio.open_nursery() as nursery:
                await nursery.start(store.run)
                monkeypatch.setattr(store, "_write", write_forever)
                store.add(_row(1))
                nursery.cancel_scope.cancel()
        # The shutdown's write was handed to a worker thread (which may start only
        # after shutdown gave up on it): the hung disk was really in the way.
        assert hung.wait(10)
    finally:
        disk_back.set()  # let the abandoned worker thread finish


def test_nonsense_token_counts_from_an_upstream_count_as_not_reported() -> None:
    from trio_swap.observe import usage

    parsed = usage.from_json(b'{"usage": {"prompt_tokens": -1, "completion_tokens": 3}}')
    assert parsed is not None
    assert (parsed.prompt_tokens, parsed.completion_tokens) == (None, 3)
    parsed = usage.from_json(b'{"usage": {"prompt_tokens": 1e30, "completion_tokens": 2}}')
    assert parsed is not None and parsed.prompt_tokens is None
