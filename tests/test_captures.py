"""Request captures (``captureBuffer``) as a user reads them: ``GET /api/captures/<id>``
after real requests through trio-swap to the responder, and the buffer's own
byte count (``GET /api/captures``), which must never pass its limit."""

from __future__ import annotations

import base64
import json
from typing import Any

import msgspec
import pytest
import trio

from tests.conftest import Harness, chat, make_config, responder_model, running, wait_for
from tests.test_ui import event_stream, next_event
from trio_swap.config import ConfigError
from trio_swap.config.load import load_config_text
from trio_swap.config.model import Config, ScopedKey
from trio_swap.observe.captures import (
    CAPTURE_OVERHEAD,
    PIECE_OVERHEAD,
    REDACTED,
    CaptureStore,
)

CHAT = "/v1/chat/completions"
MB = 1024 * 1024
Json = dict[str, Any]


def config_with(buffer: int, *args: str) -> Config:
    """One responder model ``A``; ``buffer``: the capture buffer in bytes."""
    return msgspec.structs.replace(make_config(responder_model("A", *args)), capture_buffer=buffer)


async def newest_row(h: Harness, after: int = 0) -> Json:
    """The newest activity row, once there is one newer than ``after``."""

    async def fresh() -> Json | None:
        rows: list[Json] = (await h.client.get("/api/activity", params={"limit": 1})).json()["data"]
        return rows[0] if rows and rows[0]["id"] > after else None

    return await wait_for(fresh, what="a new activity row")


async def capture_of(h: Harness, row: Json) -> Json:
    response = await h.client.get(f"/api/captures/{row['id']}")
    assert response.status_code == 200, response.text
    found: Json = response.json()
    return found


async def buffer_stats(h: Harness) -> Json:
    response = await h.client.get("/api/captures")
    assert response.status_code == 200, response.text
    stats: Json = response.json()
    return stats


def body_of(capture: Json, side: str) -> bytes:
    return base64.b64decode(capture[f"{side}_body"])


# --- what a capture holds ---------------------------------------------------------------


async def test_a_json_request_and_its_answer_are_captured_with_secrets_redacted() -> None:
    secrets = {
        "Authorization": "Bearer sk-very-secret",
        "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
        "Cookie": "session=cookie-secret",
        "X-Api-Key": "key-secret",
    }
    sent = chat("A", "what is trio")
    with trio.fail_after(30):
        async with running(config_with(MB)) as h:
            answer = await h.client.post(
                CHAT, json=sent, params={"trace": "1"}, headers={**secrets, "X-Trace": "t-7"}
            )
            assert answer.status_code == 200
            row = await newest_row(h)
            capture = await capture_of(h, row)
    assert row["has_capture"] is True
    assert capture["id"] == row["id"]
    assert (capture["method"], capture["req_path"], capture["req_query"]) == (
        "POST",
        CHAT,
        "trace=1",
    )
    headers = capture["req_headers"]
    for name in secrets:
        assert headers[name.lower()] == REDACTED
    assert headers["x-trace"] == "t-7"
    assert headers["content-type"] == "application/json"
    assert json.loads(body_of(capture, "req")) == sent
    assert capture["req_body_size"] == capture["req_body_kept"] == len(body_of(capture, "req"))
    assert capture["req_body_truncated"] is False and capture["req_body_omitted"] is None
    assert capture["resp_status"] == 200
    assert capture["resp_headers"]["content-type"].startswith("application/json")
    assert body_of(capture, "resp") == answer.content
    assert capture["resp_body_truncated"] is False and capture["resp_body_omitted"] is None
    text = json.dumps(capture)
    for value in secrets.values():
        assert value not in text  # no secret anywhere, base64 bodies aside (none carry one)


async def test_a_streamed_answer_is_captured_as_the_sse_bytes_the_client_got() -> None:
    with trio.fail_after(30):
        async with running(config_with(MB, "--tokens", "12")) as h:
            async with h.client.stream("POST", CHAT, json=chat("A", stream=True)) as response:
                assert response.status_code == 200
                received = b"".join([chunk async for chunk in response.aiter_raw()])
            row = await newest_row(h)
            capture = await capture_of(h, row)
    assert row["stream"] is True and row["has_capture"] is True
    assert capture["resp_headers"]["content-type"].startswith("text/event-stream")
    kept = body_of(capture, "resp")
    assert kept == received
    assert kept.rstrip().endswith(b"data: [DONE]")
    assert capture["resp_body_size"] == len(received)


async def test_an_error_answer_is_captured_too() -> None:
    with trio.fail_after(30):
        async with running(config_with(MB)) as h:
            missing = await h.client.post(CHAT, json=chat("no-such-model"))
            assert missing.status_code == 404
            row = await newest_row(h)
            capture = await capture_of(h, row)
    assert capture["resp_status"] == 404
    assert json.loads(body_of(capture, "resp")) == missing.json()


async def test_uploads_and_audio_are_not_kept_only_their_size() -> None:
    audio = b"RIFF" + bytes(range(256)) * 64
    with trio.fail_after(30):
        async with running(config_with(MB)) as h:
            upload = await h.client.post(
                "/v1/audio/transcriptions",
                data={"model": "A"},
                files={"file": ("a.wav", audio, "audio/wav")},
            )
            assert upload.status_code == 200
            first = await newest_row(h)
            speech = await h.client.post(
                "/v1/audio/speech", json={"model": "A", "input": "hello", "voice": "x"}
            )
            assert speech.status_code == 200
            second = await newest_row(h, after=first["id"])
            transcription, spoken = await capture_of(h, first), await capture_of(h, second)
    assert transcription["req_headers"]["content-type"].startswith("multipart/form-data")
    assert transcription["req_body_omitted"] == "binary"
    assert body_of(transcription, "req") == b"" and transcription["req_body_kept"] == 0
    assert transcription["req_body_size"] > len(audio)
    assert json.loads(body_of(transcription, "resp")) == upload.json()  # the JSON answer
    assert json.loads(body_of(spoken, "req"))["input"] == "hello"
    assert spoken["resp_body_omitted"] == "binary"
    assert spoken["resp_body_size"] == len(speech.content) > 0
    assert body_of(spoken, "resp") == b""


async def test_activity_events_say_has_capture() -> None:
    with trio.fail_after(30):
        async with running(config_with(MB)) as h, event_stream(h) as (_, events):
            await next_event(events, "snapshot")
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            event = await next_event(events, "activity", model="A")
    assert isinstance(event.data, dict)
    assert event.data["has_capture"] is True


# --- ids ---------------------------------------------------------------------------------


async def test_a_bad_capture_id_is_400_and_a_capture_never_made_is_404() -> None:
    with trio.fail_after(30):
        async with running(config_with(MB)) as h:
            for bad in ("abc", "0", "-1", "1.5", "+3", "%C2%B2", "9" * 20, "00"):
                response = await h.client.get(f"/api/captures/{bad}")
                assert response.status_code == 400, (bad, response.text)
                assert "positive integer" in response.json()["error"]["message"]
            missing = await h.client.get("/api/captures/12345")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "capture_not_found"


async def test_captures_are_admin_routes_for_scoped_keys() -> None:
    keys = (
        ScopedKey(key="use-key", name="user", models=("*",)),
        ScopedKey(key="ops", name="ops", admin=True),
    )
    config = msgspec.structs.replace(config_with(MB), api_keys=keys)
    with trio.fail_after(30):
        async with running(config) as h:
            user = {"Authorization": "Bearer use-key"}
            ops = {"Authorization": "Bearer ops"}
            assert (await h.client.post(CHAT, json=chat("A"), headers=user)).status_code == 200

            async def row_id() -> int | None:
                answer = await h.client.get("/api/activity", headers=ops)
                rows = answer.json()["data"]
                return int(rows[0]["id"]) if rows else None

            found = await wait_for(row_id, what="the row")
            refused = await h.client.get(f"/api/captures/{found}", headers=user)
            stats_refused = await h.client.get("/api/captures", headers=user)
            allowed = await h.client.get(f"/api/captures/{found}", headers=ops)
    assert refused.status_code == stats_refused.status_code == 403
    assert allowed.status_code == 200
    assert allowed.json()["req_headers"]["authorization"] == REDACTED


# --- the buffer's bounds -------------------------------------------------------------------


async def test_the_oldest_captures_are_evicted_first() -> None:
    limit = 64 * 1024
    with trio.fail_after(60):
        async with running(config_with(limit)) as h:
            ids: list[int] = []
            for n in range(8):  # each ~12 KiB of prompt: about five fit
                response = await h.client.post(CHAT, json=chat("A", f"{n} " + "x" * 12_000))
                assert response.status_code == 200
                ids.append((await newest_row(h, after=ids[-1] if ids else 0))["id"])
                stats = await buffer_stats(h)
                assert stats["used_bytes"] <= stats["limit_bytes"] == limit
            rows = (await h.client.get("/api/activity")).json()["data"]
            kept = [row["id"] for row in reversed(rows) if row["has_capture"]]
            gone = [row["id"] for row in reversed(rows) if not row["has_capture"]]
            stats = await buffer_stats(h)
            first = await h.client.get(f"/api/captures/{ids[0]}")
            last = await capture_of(h, {"id": ids[-1]})
    assert gone and kept  # some evicted, some kept
    assert gone == ids[: len(gone)] and kept == ids[len(gone) :]  # the oldest went first
    assert first.status_code == 404
    assert json.loads(body_of(last, "req"))["messages"][0]["content"].startswith("7 ")
    assert stats["count"] == len(kept) and stats["evicted"] == len(gone)
    assert stats["oldest_id"] == kept[0] and stats["newest_id"] == kept[-1]
    assert stats["peak_bytes"] <= limit


async def test_capture_buffer_0_turns_captures_off() -> None:
    with trio.fail_after(30):
        async with running(config_with(0)) as h:
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            row = await newest_row(h)
            response = await h.client.get(f"/api/captures/{row['id']}")
            stats = await buffer_stats(h)
    assert row["has_capture"] is False
    assert response.status_code == 404
    assert stats["enabled"] is False and stats["count"] == 0 and stats["peak_bytes"] == 0


async def test_a_100_mb_body_never_grows_the_buffer_past_its_limit() -> None:
    limit = MB
    content = "x" * (100 * MB)
    with trio.fail_after(120):
        async with running(config_with(limit), max_body_bytes=200 * MB) as h:
            response = await h.client.post(CHAT, json=chat("A", content))
            assert response.status_code == 200
            row = await newest_row(h)
            capture = await capture_of(h, row)
            stats = await buffer_stats(h)
    del content
    # The store's own count, at its highest (while the request was in flight too).
    assert stats["peak_bytes"] <= limit and stats["used_bytes"] <= limit
    assert capture["bytes"] <= limit
    assert capture["req_body_size"] > 100 * MB  # every byte counted...
    assert capture["req_body_truncated"] is True
    kept = body_of(capture, "req")
    assert len(kept) == capture["req_body_kept"] < limit // 2  # ...only the first ones kept
    assert kept.startswith(b'{"model":"A"')
    # The answer still fits: it is kept whole.
    assert capture["resp_body_truncated"] is False
    assert body_of(capture, "resp") == response.content


async def test_a_reload_resizes_the_buffer() -> None:
    config = config_with(MB)
    with trio.fail_after(60):
        async with running(config) as h:
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            before = await newest_row(h)
            assert before["has_capture"] is True
            await h.server.reload(msgspec.structs.replace(config, capture_buffer=0))
            after_off = (await h.client.get("/api/activity")).json()["data"][0]
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            off_row = await newest_row(h, after=before["id"])
            await h.server.reload(msgspec.structs.replace(config, capture_buffer=2 * MB))
            assert (await h.client.post(CHAT, json=chat("A"))).status_code == 200
            on_row = await newest_row(h, after=off_row["id"])
            stats = await buffer_stats(h)
    assert after_off["has_capture"] is False  # 0: every capture dropped
    assert off_row["has_capture"] is False
    assert on_row["has_capture"] is True
    assert stats["limit_bytes"] == 2 * MB and stats["count"] == 1


# --- the store alone (accounting, no processes) ------------------------------------------


SCOPE: Any = {"method": "POST", "path": CHAT, "query_string": b"", "headers": []}


def test_a_body_larger_than_the_buffer_keeps_what_fits_and_counts_the_rest() -> None:
    limit = 10_000
    store = CaptureStore(limit)
    draft = store.begin(SCOPE)
    assert draft is not None
    draft.request_body(b"a" * 50_000, b"application/json")
    assert store.used == CAPTURE_OVERHEAD + len(CHAT) + limit // 2  # one body: half the buffer
    draft.response_start(200, [(b"content-type", b"text/event-stream")])
    for _ in range(1000):
        draft.response_body(b"data: 1\n\n")  # kept while there is room, then only counted
        assert store.used <= limit
    draft.finish(1)
    capture = store.get(1)
    assert capture is not None
    kept: Json = capture.to_json()
    assert kept["req_body_size"] == 50_000 and kept["req_body_truncated"] is True
    assert kept["req_body_kept"] == limit // 2 - PIECE_OVERHEAD
    assert body_of(kept, "req") == b"a" * kept["req_body_kept"]
    assert kept["resp_body_size"] == 9000 and 0 < kept["resp_body_kept"] < 9000
    assert kept["resp_body_truncated"] is True
    assert store.used == capture.cost <= limit and store.peak <= limit


def test_requests_in_flight_together_never_pass_the_limit() -> None:
    limit = 20_000
    store = CaptureStore(limit)
    drafts = [store.begin(SCOPE) for _ in range(4)]
    for round_ in range(10):
        for draft in drafts:
            assert draft is not None
            draft.response_body(bytes([round_]) * 1_000)
            assert store.used <= limit
    for n, draft in enumerate(drafts, 1):
        assert draft is not None
        draft.finish(n)
    assert store.peak <= limit and store.used <= limit
    kept = [capture for n in range(1, 5) if (capture := store.get(n)) is not None]
    assert sum(capture.cost for capture in kept) == store.used


def test_set_cookie_in_an_answer_is_redacted() -> None:
    store = CaptureStore(100_000)
    draft = store.begin(SCOPE)
    assert draft is not None
    draft.response_start(200, [(b"Set-Cookie", b"a=1"), (b"set-cookie", b"b=2"), (b"x", b"y")])
    draft.finish(1)
    capture = store.get(1)
    assert capture is not None
    assert capture.to_json()["resp_headers"] == {"set-cookie": f"{REDACTED}, {REDACTED}", "x": "y"}


def test_a_discarded_draft_gives_its_bytes_back_and_a_shrink_evicts_the_oldest() -> None:
    store = CaptureStore(100_000)
    for n in (1, 2, 3):
        draft = store.begin(SCOPE)
        assert draft is not None
        draft.request_body(b"b" * 10_000, b"")
        draft.finish(n)
    lost = store.begin(SCOPE)
    assert lost is not None
    lost.request_body(b"c" * 10_000, b"text/plain")
    held = store.used
    lost.discard()
    assert store.used < held
    one = store.get(3)
    assert one is not None
    store.resize(one.cost)
    assert [n for n in (1, 2, 3) if n in store] == [3]
    store.resize(0)
    assert len(store) == 0 and store.used == 0 and store.begin(SCOPE) is None


# --- config --------------------------------------------------------------------------------


def test_capture_buffer_config_default_zero_and_errors() -> None:
    base = "models:\n  m:\n    cmd: s ${PORT}\n"

    def load_config(text: str) -> Config:
        return load_config_text(text, "config.yaml")

    assert load_config(base).capture_buffer == 5 * MB  # llama-swap's code's default
    zero = load_config("captureBuffer: 0\n" + base)
    assert zero.capture_buffer == 0 and zero.warnings == ()
    assert load_config("captureBuffer: 12\n" + base).capture_buffer == 12 * MB
    for bad, message in (
        ("-1", r"captureBuffer: must be >= 0 MB \(got -1\)"),
        ("2.5", r"captureBuffer: expected int, got float 2.5"),
        ('"5"', r"captureBuffer: expected int, got string '5'"),
        ("true", r"captureBuffer: expected int, got bool"),
    ):
        with pytest.raises(ConfigError, match=message) as error:
            load_config(f"startPort: 6000\ncaptureBuffer: {bad}\n" + base)
        assert error.value.line == 2
