"""Tests for the built-in responder (`trio_swap.responder`).

Rules of this module:

* The responder runs as a real subprocess (`python -m trio_swap.responder`) in
  its own session, on 127.0.0.1 port 0; the port comes from its first stdout
  line. `run_responder` always SIGKILLs the process group and waits, then checks
  the group is gone.
* Every test that talks to a process has an absolute limit, `with
  trio.fail_after(TIMEOUT)`, on trio's real clock. No assert depends on timing:
  where a test must hold a request, it uses `?delay=` far longer than the test
  and ends it by disconnecting.
* Pure payload code is tested in-process, without a server.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Final, final

import anthropic
import httpx
import openai
import pytest
import trio

import trio_swap
from tests.conftest import wait_for
from trio_swap.responder import build_parser, parse_options
from trio_swap.responder.anthropic import MessageStreamTemplate
from trio_swap.responder.llama import NativeStreamTemplate
from trio_swap.responder.media import PNG, parse_multipart
from trio_swap.responder.payloads import (
    BadRequest,
    StreamTemplate,
    embedding_vector,
    rerank_body,
    token_text,
)

TIMEOUT: Final = 10.0
KILL_TIMEOUT: Final = 5.0
# The directory that holds the trio_swap package this test imported, so the
# child runs the same code whether or not the project is installed.
_IMPORT_ROOT: Final = str(Path(trio_swap.__file__).resolve().parents[1])

CHAT: Final = "/v1/chat/completions"


@final
class Responder:
    """A responder subprocess and everything it printed so far."""

    def __init__(self, process: trio.Process) -> None:
        self.process = process
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self.url = ""
        self._open_pipes = 2
        self._changed = trio.Event()

    async def pump(self, stream: trio.abc.ReceiveStream, lines: list[str]) -> None:
        """Split `stream` into `lines` until EOF, waking line waiters on each line."""
        buffer = b""
        while chunk := await stream.receive_some():
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines.extend(line.decode() for line in complete)
            self._changed.set()
            self._changed = trio.Event()
        if buffer:
            lines.append(buffer.decode())
        self._open_pipes -= 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for_eof(self) -> None:
        """Wait until stdout and stderr are both closed, so the line lists are final."""
        while self._open_pipes:
            await self._changed.wait()

    async def wait_for_line(self, text: str, *, stderr: bool = False) -> str:
        """The first line containing `text`, waiting for it to be printed."""
        lines = self.stderr if stderr else self.stdout
        while True:
            for line in lines:
                if text in line:
                    return line
            await self._changed.wait()

    async def requests(self) -> list[dict[str, object]]:
        """GET /debug/requests."""
        async with httpx.AsyncClient(base_url=self.url) as client:
            response = await client.get("/debug/requests")
        response.raise_for_status()
        records: list[dict[str, object]] = response.json()
        return records


@asynccontextmanager
async def run_responder(*args: str, listening: bool = True) -> AsyncIterator[Responder]:
    """Start `python -m trio_swap.responder --port 0 *args` in its own session.

    Yields once the listening line is printed (unless `listening` is False).
    Always SIGKILLs the whole process group and waits for it.
    """
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (_IMPORT_ROOT, env.get("PYTHONPATH")) if p)
    command = [sys.executable, "-m", "trio_swap.responder", "--port", "0", *args]
    process = await trio.lowlevel.open_process(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env=env,
    )
    responder = Responder(process)
    try:
        async with trio.open_nursery() as nursery:
            assert process.stdout is not None
            assert process.stderr is not None
            nursery.start_soon(responder.pump, process.stdout, responder.stdout)
            nursery.start_soon(responder.pump, process.stderr, responder.stderr)
            try:
                if listening:
                    line = await responder.wait_for_line(" listening on ")
                    responder.url = line.split(" listening on ")[1].split()[0]
                yield responder
            finally:
                await _kill_group(process)
    finally:
        with trio.CancelScope(shield=True):
            await _kill_group(process)  # also when the pumps failed to start
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    await pipe.aclose()
    with pytest.raises(ProcessLookupError):
        os.killpg(process.pid, 0)


async def _kill_group(process: trio.Process) -> None:
    """SIGKILL the process group (it may be gone already) and reap the leader."""
    with trio.CancelScope(shield=True), trio.move_on_after(KILL_TIMEOUT):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def sse_data(text: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order."""
    events = [event for event in text.split("\n\n") if event]
    assert all(event.startswith("data: ") for event in events), events
    return [event.removeprefix("data: ") for event in events]


# --- health and models ---------------------------------------------------------


async def test_listening_line_health_models_and_pid() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--model", "alpha") as responder:
            line = responder.stdout[0]
            pid = responder.process.pid
            assert line == f"responder alpha listening on {responder.url} pid={pid}"
            async with httpx.AsyncClient(base_url=responder.url) as client:
                health = await client.get("/health")
                models = await client.get("/v1/models")
                debug_pid = await client.get("/debug/pid")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            assert models.json() == {
                "object": "list",
                "data": [{"id": "alpha", "object": "model", "owned_by": "responder"}],
            }
            assert debug_pid.json() == {"pid": pid}
            await responder.wait_for_line("request GET /v1/models")


async def test_load_delay_answers_loading_then_ok() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--load-delay", "1.5") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            first = await client.get("/health")
            assert (first.status_code, first.json()) == (503, {"status": "loading"})
            chat = await client.post(CHAT, json={"model": "m", "messages": []})
            assert chat.status_code == 503
            assert chat.json()["error"]["message"] == "Loading model"

            async def loaded() -> httpx.Response | None:  # as a supervisor's readiness check does
                health = await client.get("/health")
                return health if health.status_code != 503 else None

            health = await wait_for(loaded, what="/health to stop answering 503")
            assert (health.status_code, health.json()) == (200, {"status": "ok"})
            chat = await client.post(CHAT, json={"model": "m", "messages": []})
            assert chat.status_code == 200


async def test_never_healthy() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--never-healthy") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            for _ in range(3):
                health = await client.get("/health")
                assert (health.status_code, health.json()) == (503, {"status": "loading"})
            chat = await client.post(CHAT, json={"model": "m"})
            assert chat.status_code == 503


async def test_startup_delay_still_listens() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--startup-delay", "0.2") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            assert (await client.get("/health")).status_code == 200


# --- completions and embeddings ---------------------------------------------------


async def test_chat_non_streaming() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "5") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            response = await client.post(
                CHAT,
                json={"model": "sent-name", "messages": [{"role": "user", "content": "a b c"}]},
            )
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["model"] == "sent-name"  # echoed, so tests can see useModelName rewriting
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "tok0 tok1 tok2 tok3 tok4 "}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert body["timings"]["prompt_n"] == 3
    assert body["timings"]["predicted_n"] == 5
    assert body["timings"]["predicted_per_second"] > 0


async def test_chat_streaming() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "7", "--token-delay", "0.001") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            response = await client.post(CHAT, json={"model": "m", "stream": True, "messages": []})
    assert response.headers["content-type"] == "text/event-stream"
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant"}
    tokens = [chunk["choices"][0]["delta"]["content"] for chunk in chunks[1:-1]]
    assert tokens == [token_text(i) for i in range(7)]
    final = chunks[-1]
    assert final["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "stop"}
    assert final["usage"]["completion_tokens"] == 7
    assert final["timings"]["predicted_n"] == 7


async def test_max_tokens_overrides_tokens() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "50") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            whole = await client.post(CHAT, json={"model": "m", "max_tokens": 3})
            streamed = await client.post(CHAT, json={"model": "m", "max_tokens": 2, "stream": True})
            zero = await client.post("/v1/completions", json={"model": "m", "max_tokens": 0})
            bad = await client.post(CHAT, json={"model": "m", "max_tokens": -1})
    assert whole.json()["choices"][0]["message"]["content"].split() == ["tok0", "tok1", "tok2"]
    assert len(sse_data(streamed.text)) == 1 + 2 + 1 + 1  # role, tokens, final, [DONE]
    assert zero.json()["choices"][0]["text"] == ""
    assert bad.status_code == 400


async def test_legacy_completions() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "3") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            whole = await client.post("/v1/completions", json={"model": "m", "prompt": "x y"})
            streamed = await client.post(
                "/v1/completions", json={"model": "m", "prompt": "x", "stream": True}
            )
    body = whole.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == "tok0 tok1 tok2 "
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5}
    data = sse_data(streamed.text)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(item) for item in data[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == ["tok0 ", "tok1 ", "tok2 ", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_embeddings() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            one = await client.post("/v1/embeddings", json={"model": "e", "input": "hello"})
            many = await client.post(
                "/v1/embeddings", json={"model": "e", "input": ["hello", "other words"]}
            )
            bad = await client.post("/v1/embeddings", json={"model": "e", "input": 5})
    assert one.json()["object"] == "list"
    assert one.json()["model"] == "e"
    [item] = one.json()["data"]
    assert item["object"] == "embedding"
    assert item["index"] == 0
    assert len(item["embedding"]) == 8
    vectors = [entry["embedding"] for entry in many.json()["data"]]
    assert vectors[0] == item["embedding"]  # deterministic
    assert vectors[1] != vectors[0]
    assert many.json()["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    assert bad.status_code == 400


async def test_bulk_stream_is_complete_and_in_order() -> None:
    """--token-delay 0 batches events per send; every event must still be whole."""
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "20000") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            response = await client.post("/v1/completions", json={"model": "m", "stream": True})
    data = sse_data(response.text)
    assert data[-1] == "[DONE]"
    texts = [json.loads(item)["choices"][0]["text"] for item in data[:-2]]
    assert texts == [token_text(i) for i in range(20000)]


# --- errors ------------------------------------------------------------------------


async def test_not_found_bad_method_and_invalid_json() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            missing = await client.get("/v2/nothing")
            wrong_method = await client.get(CHAT)
            invalid = await client.post(CHAT, content=b"{not json")
            not_object = await client.post(CHAT, content=b"[1, 2]")
            bad_delay = await client.post(CHAT + "?delay=soon", json={"model": "m"})
    assert missing.status_code == 404
    assert missing.json() == {
        "error": {
            "message": "no route for GET /v2/nothing",
            "type": "invalid_request_error",
            "code": "not_found",
        }
    }
    assert wrong_method.status_code == 405
    for response in (invalid, not_object):
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["code"] == "invalid_json"
    assert bad_delay.status_code == 400


# --- the request log ----------------------------------------------------------------


async def test_debug_requests_records_exact_request() -> None:
    body = '{"model": "m",\n  "messages": [{"role": "user", "content": "h\u00e9 \\u00e9"}]}  '
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            await client.post(
                CHAT + "?a=1&b=two%20words",
                content=body.encode(),
                headers={"X-Custom": "Value 1", "Authorization": "Bearer k"},
            )
            await client.post("/v1/embeddings", content=b'{"input": "\xff"}')
            await client.get("/debug/pid")  # /debug/* is not recorded
            records = await responder.requests()
    assert [(r["method"], r["path"]) for r in records] == [
        ("POST", CHAT),
        ("POST", "/v1/embeddings"),
    ]
    chat, embeddings = records
    assert chat["body"] == body
    assert chat["query"] == "a=1&b=two%20words"
    headers = chat["headers"]
    assert isinstance(headers, dict)
    assert headers["x-custom"] == "Value 1"
    assert headers["authorization"] == "Bearer k"
    assert headers["content-length"] == str(len(body.encode()))
    assert chat["status"] == "completed"
    assert chat["tokens_sent"] == 16
    assert chat["response_status"] == 200
    assert embeddings["body"] == '{"input": "\ufffd"}'  # invalid UTF-8, replaced
    assert embeddings["response_status"] == 400


async def test_client_disconnect_mid_stream_is_recorded_as_cancelled() -> None:
    # A raw socket, so "disconnect" means exactly one thing: the client closes
    # its TCP connection after three tokens.
    body = b'{"model": "m", "stream": true}'
    request = (
        b"POST %s HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (CHAT.encode(), len(body), body)
    )
    with trio.fail_after(TIMEOUT):
        async with run_responder("--tokens", "100000", "--token-delay", "0.01") as responder:
            host, port = responder.url.removeprefix("http://").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(request)
                received = b""
                while received.count(b"tok") < 3:
                    received += await stream.receive_some()
            line = await responder.wait_for_line("request cancelled")
            [record] = await responder.requests()
    assert line.startswith(f"request cancelled {CHAT} after ")
    tokens_sent = record["tokens_sent"]
    assert isinstance(tokens_sent, int)
    assert 3 <= tokens_sent < 100000
    assert line == f"request cancelled {CHAT} after {tokens_sent} tokens"
    assert record["status"] == "cancelled"


async def test_delay_query_holds_request_until_client_leaves() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            quick = await client.post(CHAT + "?delay=0.01", json={"model": "m"})
            assert quick.status_code == 200
            async with trio.open_nursery() as nursery:
                held = functools.partial(client.post, json={"input": "x"})
                nursery.start_soon(held, "/v1/embeddings?delay=60")
                # Logged once the responder has the request, before its body is read.
                await responder.wait_for_line("request POST /v1/embeddings")
                records = await responder.requests()
                assert records[1]["status"] == "in_flight"
                nursery.cancel_scope.cancel()  # the client goes away
            line = await responder.wait_for_line("request cancelled /v1/embeddings")
            records = await responder.requests()
    assert line == "request cancelled /v1/embeddings after 0 tokens"
    assert [r["status"] for r in records] == ["completed", "cancelled"]


# --- Anthropic messages ---------------------------------------------------------------


def anthropic_events(text: str) -> list[tuple[str, dict[str, object]]]:
    """The `(event name, data)` pairs of an Anthropic SSE body, in order."""
    pairs = []
    for frame in (frame for frame in text.split("\n\n") if frame):
        name_line, data_line = frame.split("\n")
        assert name_line.startswith("event: "), frame
        assert data_line.startswith("data: "), frame
        data = json.loads(data_line.removeprefix("data: "))
        assert data["type"] == name_line.removeprefix("event: ")
        pairs.append((data["type"], data))
    return pairs


async def test_anthropic_sdk_parses_messages_streams_and_token_counts() -> None:
    messages: list[anthropic.types.MessageParam] = [{"role": "user", "content": "one two three"}]
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "4", "--token-delay", "0.001") as responder,
            anthropic.AsyncAnthropic(base_url=responder.url, api_key="k", max_retries=0) as client,
        ):
            whole = await client.messages.create(
                model="claude-sent", max_tokens=100, messages=messages, system="be brief"
            )
            capped = await client.messages.create(model="c", max_tokens=2, messages=messages)
            async with client.messages.stream(
                model="claude-streamed", max_tokens=100, messages=messages
            ) as stream:
                texts = [text async for text in stream.text_stream]
                final = await stream.get_final_message()
            raw = await client.messages.create(
                model="c", max_tokens=100, messages=messages, stream=True
            )
            types = [event.type async for event in raw]
            count = await client.messages.count_tokens(
                model="c", messages=messages, system="be brief"
            )
    assert whole.model == "claude-sent"
    assert whole.id.startswith("msg_")
    assert (whole.type, whole.role) == ("message", "assistant")
    assert [block.type for block in whole.content] == ["text"]
    assert whole.content[0].text == "tok0 tok1 tok2 tok3 "  # type: ignore[union-attr]
    assert (whole.stop_reason, whole.stop_sequence) == ("end_turn", None)
    assert (whole.usage.input_tokens, whole.usage.output_tokens) == (5, 4)
    # max_tokens is a cap, not the length: below --tokens it cuts the answer.
    assert capped.content[0].text == "tok0 tok1 "  # type: ignore[union-attr]
    assert capped.stop_reason == "max_tokens"
    assert texts == [token_text(i) for i in range(4)]
    assert final.model == "claude-streamed"
    assert final.content[0].text == "tok0 tok1 tok2 tok3 "  # type: ignore[union-attr]
    assert final.stop_reason == "end_turn"
    assert (final.usage.input_tokens, final.usage.output_tokens) == (3, 4)
    assert types == [  # the SDK hides ping
        "message_start",
        "content_block_start",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    assert count.input_tokens == 5


async def test_anthropic_stream_frames_in_order() -> None:
    body = {"model": "m", "max_tokens": 10, "stream": True, "messages": []}
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "3") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            response = await client.post("/v1/messages", json=body)
            [record] = await responder.requests()
    assert response.headers["content-type"] == "text/event-stream"
    events = anthropic_events(response.text)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        "content_block_delta",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert deltas == [{"type": "text_delta", "text": token_text(i)} for i in range(3)]
    assert events[7][1]["usage"] == {"output_tokens": 3}
    assert record["tokens_sent"] == 3


async def test_anthropic_stream_crash_cuts_after_n_deltas() -> None:
    body = {"model": "m", "max_tokens": 1000, "stream": True, "messages": []}
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "1000", "--crash-after-tokens", "2") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            received = ""
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream("POST", "/v1/messages", json=body) as response:
                    async for text in response.aiter_text():
                        received += text
            assert await responder.process.wait() == 3
    names = [name for name, _ in anthropic_events(received)]
    assert names == ["message_start", "content_block_start", "ping", *["content_block_delta"] * 2]


# --- OpenAI SDK: responses, audio, images --------------------------------------------


async def test_openai_sdk_parses_responses_audio_and_images() -> None:
    audio = bytes(range(256)) * 4096  # 1 MiB, every byte value
    picture = b"\x89PNG fake upload" * 100
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "3") as responder,
            openai.AsyncOpenAI(
                base_url=responder.url + "/v1", api_key="k", max_retries=0
            ) as client,
        ):
            response = await client.responses.create(
                model="resp-model", input="say something", instructions="be brief"
            )
            transcript = await client.audio.transcriptions.create(
                model="whisper-sent", file=("speech.wav", audio, "audio/wav")
            )
            generated = await client.images.generate(model="img", prompt="a red fox")
            edited = await client.images.edit(
                model="img", image=("fox.png", picture, "image/png"), prompt="make it blue"
            )
            speech = await client.audio.speech.create(
                model="tts", voice="alloy", input="h\u00e9llo there"
            )
            records = await responder.requests()
    assert response.output_text == "tok0 tok1 tok2 "
    assert response.model == "resp-model"
    assert response.status == "completed"
    assert response.id.startswith("resp_")
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens) == (4, 3)
    assert response.usage.total_tokens == 7
    digest = hashlib.sha256(audio).hexdigest()[:16]
    expected = f"transcript of speech.wav ({len(audio)} bytes, sha256 {digest}) by whisper-sent"
    assert transcript.text == expected
    assert generated.data is not None
    [image] = generated.data
    assert image.b64_json is not None
    assert base64.b64decode(image.b64_json).startswith(b"\x89PNG\r\n\x1a\n")
    assert image.revised_prompt == "a red fox"
    assert edited.data is not None
    picture_digest = hashlib.sha256(picture).hexdigest()[:16]
    assert edited.data[0].revised_prompt == (
        f"make it blue (edited fox.png ({len(picture)} bytes, sha256 {picture_digest}))"
    )
    assert speech.content == b"ID3" + "h\u00e9llo there".encode()
    assert speech.response.headers["content-type"] == "audio/mpeg"
    assert [r["path"] for r in records] == [
        "/v1/responses",
        "/v1/audio/transcriptions",
        "/v1/images/generations",
        "/v1/images/edits",
        "/v1/audio/speech",
    ]
    assert all(r["response_status"] == 200 for r in records)


async def test_multipart_without_file_or_not_multipart_is_400() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            no_file = await client.post(
                "/v1/audio/transcriptions", data={"model": "w"}, files={"other": ("a", b"x")}
            )
            no_image = await client.post(
                "/v1/images/edits", data={"prompt": "p"}, files={"mask": ("m.png", b"x")}
            )
            not_multipart = await client.post("/v1/audio/transcriptions", json={"model": "w"})
            truncated = await client.post(
                "/v1/audio/transcriptions",
                content=b"--b\r\ncontent-disposition: form-data; name=file; filename=a",
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
            speech_without_input = await client.post("/v1/audio/speech", json={"model": "t"})
    for response in (no_file, no_image):
        assert response.status_code == 400
        assert response.json()["error"]["type"] == "invalid_request_error"
        assert response.json()["error"]["code"] == "missing_file"
    assert no_file.json()["error"]["message"] == "the form has no 'file' file part"
    for response in (not_multipart, truncated):
        assert response.status_code == 400
        assert response.json()["error"]["code"] == "invalid_multipart"
    assert speech_without_input.status_code == 400


async def test_transcription_model_falls_back_to_option() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--model", "whisper-opt") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            response = await client.post(
                "/v1/audio/transcriptions", files={"file": ("a.mp3", b"12345")}
            )
    digest = hashlib.sha256(b"12345").hexdigest()[:16]
    assert response.json() == {
        "text": f"transcript of a.mp3 (5 bytes, sha256 {digest}) by whisper-opt"
    }


# --- reranking, llama-server's native API, stable diffusion ------------------------------


async def test_rerank_scores_word_overlap_best_first() -> None:
    request = {
        "model": "rr",
        "query": "red apple",
        "documents": ["green pear", "a red apple pie", "Red wine"],
    }
    paths = ["/v1/rerank", "/v1/reranking", "/rerank", "/reranking"]
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            responses = [await client.post(path, json=request) for path in paths]
            bad = await client.post("/v1/rerank", json={"query": "q"})
    for response in responses:
        body = response.json()
        assert body["model"] == "rr"
        assert body["results"] == [
            {"index": 1, "relevance_score": 1.0},
            {"index": 2, "relevance_score": 0.5},
            {"index": 0, "relevance_score": 0.0},
        ]
    assert bad.status_code == 400


async def test_llama_native_completion_infill_and_props() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "3", "--model", "opt-model") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            whole = await client.post("/completion", json={"model": "n", "prompt": "a b"})
            predicted = await client.post("/completion", json={"prompt": "a", "n_predict": 5})
            streamed = await client.post(
                "/completion", json={"model": "n", "prompt": "a b", "stream": True}
            )
            infill = await client.post(
                "/infill",
                json={"model": "fim", "input_prefix": "def f(", "input_suffix": "return x"},
            )
            props = await client.get("/props", params={"model": "asked"})
            default_props = await client.get("/props")
    body = whole.json()
    assert body["content"] == "tok0 tok1 tok2 "
    assert (body["model"], body["stop"], body["tokens_predicted"]) == ("n", True, 3)
    assert body["timings"]["predicted_n"] == 3
    assert predicted.json()["tokens_predicted"] == 5
    assert predicted.json()["model"] == "opt-model"
    events = [json.loads(data) for data in sse_data(streamed.text)]  # no [DONE]
    assert events[:-1] == [{"content": token_text(i), "stop": False} for i in range(3)]
    assert events[-1]["stop"] is True
    assert events[-1]["content"] == ""
    assert events[-1]["tokens_predicted"] == 3
    assert infill.json()["model"] == "fim"
    assert infill.json()["tokens_evaluated"] == 4
    assert props.json() == {
        "model": "asked",
        "default_generation_settings": {"n_ctx": 4096},
        "total_slots": 1,
    }
    assert default_props.json()["model"] == "opt-model"


async def test_sdapi_voices_and_loras() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            txt2img = await client.post("/sdapi/v1/txt2img", json={"prompt": "fox", "steps": 4})
            img2img = await client.post(
                "/sdapi/v1/img2img", json={"prompt": "fox", "init_images": ["aGk="]}
            )
            voices = await client.get("/v1/audio/voices", params={"model": "tts"})
            loras = await client.get("/sdapi/v1/loras")
    for response, request in (
        (txt2img, {"prompt": "fox", "steps": 4}),
        (img2img, {"prompt": "fox", "init_images": ["aGk="]}),
    ):
        body = response.json()
        assert body["parameters"] == request
        assert body["info"] == "{}"
        [image] = body["images"]
        assert base64.b64decode(image) == PNG
    assert voices.json() == {"voices": ["alloy", "echo"]}
    assert (loras.status_code, loras.json()) == (200, [])


# --- echo, versionless paths, loading and routing errors of the new routes -------------


async def test_echo_reflects_any_method() -> None:
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "PROPFIND"]
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            responses = [
                await client.request(
                    method, "/echo/a/b%20c?x=1&y=%C3%A9", content="h\u00e9 body".encode()
                )
                for method in methods
            ]
            head = await client.head("/echo/head")
    for method, response in zip(methods, responses, strict=True):
        assert response.status_code == 200
        assert response.json() == {
            "method": method,
            "path": "/echo/a/b c",
            "query": "x=1&y=%C3%A9",
            "body": "h\u00e9 body",
        }
    assert head.status_code == 200
    assert head.content == b""
    assert int(head.headers["content-length"]) > 0


async def test_versionless_paths_answer_like_v1() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--tokens", "2") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            chat = await client.post("/chat/completions", json={"model": "a"})
            legacy = await client.post("/completions", json={"model": "b"})
            embeddings = await client.post("/embeddings", json={"model": "c", "input": "x"})
            responses = await client.post("/responses", json={"model": "d", "input": "x"})
            messages = await client.post("/messages", json={"model": "e", "messages": []})
            count = await client.post("/messages/count_tokens", json={"messages": []})
    assert chat.json()["object"] == "chat.completion"
    assert legacy.json()["object"] == "text_completion"
    assert embeddings.json()["model"] == "c"
    assert responses.json()["output"][0]["content"][0]["text"] == "tok0 tok1 "
    assert messages.json()["content"] == [{"type": "text", "text": "tok0 tok1 "}]
    assert count.json() == {"input_tokens": 0}


NEW_ROUTES: Final = [
    ("POST", "/v1/messages"),
    ("POST", "/v1/messages/count_tokens"),
    ("POST", "/v1/responses"),
    ("POST", "/v1/rerank"),
    ("POST", "/reranking"),
    ("POST", "/completion"),
    ("POST", "/infill"),
    ("POST", "/v1/audio/transcriptions"),
    ("POST", "/v1/audio/speech"),
    ("GET", "/v1/audio/voices"),
    ("POST", "/v1/images/generations"),
    ("POST", "/v1/images/edits"),
    ("POST", "/sdapi/v1/txt2img"),
    ("POST", "/sdapi/v1/img2img"),
    ("GET", "/sdapi/v1/loras"),
    ("GET", "/props"),
    ("PUT", "/echo/x"),
]


async def test_new_routes_answer_loading_while_the_model_loads() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--never-healthy") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            for method, path in NEW_ROUTES:
                response = await client.request(method, path, json={"model": "m"})
                assert response.status_code == 503, (method, path)
                assert response.json()["error"]["message"] == "Loading model"


async def test_new_routes_wrong_method_405_and_unknown_404() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            for method, path in NEW_ROUTES:
                if path.startswith("/echo/"):
                    continue  # echo takes every method
                wrong = "PUT" if method == "GET" else "GET"
                response = await client.request(wrong, path)
                assert response.status_code == 405, (wrong, path)
            missing = await client.post("/v1/messages/other")
            echo_like = await client.get("/echoes")
            responses_stream = await client.post(
                "/v1/responses", json={"model": "m", "stream": True}
            )
            delay = await client.post("/v1/messages?delay=-1", json={"model": "m"})
    assert missing.status_code == 404
    assert echo_like.status_code == 404
    assert responses_stream.status_code == 400
    assert delay.status_code == 400


async def test_delay_query_holds_new_routes_until_client_leaves() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder() as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            async with trio.open_nursery() as nursery:
                held = functools.partial(client.post, json={"query": "q", "documents": []})
                nursery.start_soon(held, "/v1/rerank?delay=60")
                await responder.wait_for_line("request POST /v1/rerank")
                nursery.cancel_scope.cancel()
            line = await responder.wait_for_line("request cancelled /v1/rerank")
    assert line == "request cancelled /v1/rerank after 0 tokens"


# --- process behaviour ----------------------------------------------------------------


async def test_fail_start_exits_1_with_error_line() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--fail-start", "--model", "q", listening=False) as responder:
            assert await responder.process.wait() == 1
            line = await responder.wait_for_line("error:", stderr=True)
    assert line == "error: failed to load model 'q': simulated failure"
    assert not any("listening" in out for out in responder.stdout)


async def test_fail_start_message_is_printed_before_the_error_line() -> None:
    """Issue 10: tests stage an out-of-memory start in the server's own words."""
    message = "CUDA error: out of memory"
    with trio.fail_after(TIMEOUT):
        async with run_responder(
            "--fail-start", "--fail-start-message", message, "--model", "q", listening=False
        ) as responder:
            assert await responder.process.wait() == 1
            await responder.wait_for_eof()
    assert responder.stderr == [message, "error: failed to load model 'q': simulated failure"]
    assert not any("listening" in out for out in responder.stdout)


def _resident_bytes(pid: int) -> int:
    """VmRSS from /proc/<pid>/status: the plain kernel view, independent of footprint.py."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def test_hold_memory_is_resident_before_listening() -> None:
    """Issue 10: once the listening line is out, the held memory is already resident."""
    with trio.fail_after(TIMEOUT):
        async with run_responder("--hold-memory", "64MiB") as responder:
            assert _resident_bytes(responder.process.pid) >= 64 << 20
            assert responder.stdout[0] == "holding 64 MiB (--hold-memory)"
            assert " listening on " in responder.stdout[1]
            async with httpx.AsyncClient(base_url=responder.url) as client:
                assert (await client.get("/health")).status_code == 200


async def test_hold_memory_refused_by_the_kernel_exits_1() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--hold-memory", "4096TiB", listening=False) as responder:
            assert await responder.process.wait() == 1
            line = await responder.wait_for_line("error:", stderr=True)
    assert line.startswith("error: cannot hold 4294967296 MiB: ")


@pytest.mark.parametrize("token_delay", ["0", "0.001"])
async def test_crash_after_tokens_cuts_stream_and_exits_3(token_delay: str) -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder(
                "--tokens", "1000", "--crash-after-tokens", "5", "--token-delay", token_delay
            ) as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            received = ""
            with pytest.raises(httpx.RemoteProtocolError):
                async with client.stream(
                    "POST", CHAT, json={"model": "m", "stream": True}
                ) as response:
                    async for text in response.aiter_text():
                        received += text
            assert await responder.process.wait() == 3
            await responder.wait_for_line("fatal: simulated crash", stderr=True)
    data = sse_data(received)
    contents = [json.loads(item)["choices"][0]["delta"].get("content") for item in data]
    assert contents == [None, *(token_text(i) for i in range(5))]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_signal_exits_0(signum: signal.Signals) -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder() as responder:
            responder.process.send_signal(signum)
            assert await responder.process.wait() == 0
            await responder.wait_for_eof()
            assert f"received {signum.name}, exiting" in responder.stdout
            assert responder.stderr == []  # a clean exit: no traceback, no hypercorn errors


async def test_sigterm_exits_0_even_while_a_client_stalls_a_stream() -> None:
    """hypercorn writes under a shield, so a client that stops reading could pin the run."""
    body = b'{"model": "m", "stream": true, "max_tokens": 100000000}'
    request = b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-length: %d\r\n\r\n%s" % (
        len(body),
        body,
    )
    with trio.fail_after(TIMEOUT):
        async with run_responder() as responder:
            host, port = responder.url.removeprefix("http://").rsplit(":", 1)
            async with await trio.open_tcp_stream(host, int(port)) as stream:
                await stream.send_all(request)
                await stream.receive_some()  # streaming has begun; now stop reading
                await responder.wait_for_line("request POST /v1/completions")
                responder.process.send_signal(signal.SIGTERM)
                assert await responder.process.wait() == 0
            await responder.wait_for_line("received SIGTERM, exiting")


async def test_ignore_sigterm_survives_sigterm() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--ignore-sigterm") as responder:
            responder.process.send_signal(signal.SIGTERM)
            await responder.wait_for_line("ignoring SIGTERM")
            async with httpx.AsyncClient(base_url=responder.url) as client:
                assert (await client.get("/health")).status_code == 200
            assert responder.process.returncode is None
        # run_responder's SIGKILL is what ends it.
        assert responder.process.returncode == -signal.SIGKILL


async def test_exit_after_exits_0() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--exit-after", "0.3") as responder:
            assert await responder.process.wait() == 0
            await responder.wait_for_line("exiting after 0.3 s")


# --- in-process: payloads and options ------------------------------------------------


@pytest.mark.parametrize("kind", ["chat", "text"])
@pytest.mark.parametrize("model", ["plain", 'quo"te \\ tok\n', "\x00responder-token-index\x00"])
def test_stream_template_events_are_valid_json(kind: str, model: str) -> None:
    assert kind in ("chat", "text")
    template = StreamTemplate(
        kind="chat" if kind == "chat" else "text", completion_id="id-1", created=1, model=model
    )
    encoded = template.head + template.tokens(0, 3) + template.tokens(3, 4)
    encoded += template.tail(prompt_n=1, predicted_n=4, elapsed_s=0.0)
    events = sse_data(encoded.decode())
    assert template.tokens(2, 2) == b""
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["model"] for chunk in chunks} == {model}
    if kind == "chat":
        texts = [c["choices"][0]["delta"].get("content", "") for c in chunks]
    else:
        texts = [c["choices"][0]["text"] for c in chunks]
    assert "".join(texts) == "tok0 tok1 tok2 tok3 "


def test_embedding_vector_is_deterministic_and_bounded() -> None:
    vector = embedding_vector("some text")
    assert vector == embedding_vector("some text")
    assert vector != embedding_vector("some text!")
    assert len(vector) == 8
    assert all(-1.0 <= value < 1.0 for value in vector)


def test_options_defaults_and_validation() -> None:
    options = parse_options(["--port", "0"])
    assert (options.host, options.model, options.tokens, options.token_delay) == (
        "127.0.0.1",
        "responder",
        16,
        0.0,
    )
    assert options.crash_after_tokens is None
    assert build_parser().prog == "trio-swap responder"
    for bad in (["--port", "0", "--token-delay", "-1"], ["--port", "70000"], []):
        with pytest.raises(SystemExit) as excinfo:
            parse_options(bad)
        assert excinfo.value.code == 2


def test_hold_memory_and_fail_start_message_options() -> None:
    defaults = parse_options(["--port", "0"])
    assert (defaults.hold_memory, defaults.fail_start_message) == (0, None)
    options = parse_options(
        ["--port", "0", "--hold-memory", "1.5GiB", "--fail-start", "--fail-start-message", "x"]
    )
    assert (options.hold_memory, options.fail_start_message) == (3 << 29, "x")
    assert parse_options(["--port", "0", "--hold-memory", "1048576"]).hold_memory == 1 << 20
    for bad in (
        ["--port", "0", "--hold-memory", "12XB"],
        ["--port", "0", "--hold-memory", "-1"],
        ["--port", "0", "--fail-start-message", "x"],  # without --fail-start
    ):
        with pytest.raises(SystemExit) as excinfo:
            parse_options(bad)
        assert excinfo.value.code == 2


@pytest.mark.parametrize("model", ["plain", 'quo"te \\ tok\n', "\x00responder-token-index\x00"])
def test_message_stream_template_events_are_valid(model: str) -> None:
    template = MessageStreamTemplate(message_id="msg_1", model=model, prompt_n=2, stop="end_turn")
    encoded = template.head + template.tokens(0, 2) + template.tokens(2, 3)
    encoded += template.tail(prompt_n=2, predicted_n=3, elapsed_s=0.0)
    events = anthropic_events(encoded.decode())
    assert events[0][1]["message"]["model"] == model  # type: ignore[index]
    texts = [data["delta"]["text"] for name, data in events if name == "content_block_delta"]  # type: ignore[index]
    assert "".join(texts) == "tok0 tok1 tok2 "
    assert events[-2][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}


def test_native_stream_template_events_are_valid() -> None:
    template = NativeStreamTemplate(model="m")
    encoded = template.head + template.tokens(0, 2)
    encoded += template.tail(prompt_n=1, predicted_n=2, elapsed_s=0.0)
    events = [json.loads(event) for event in sse_data(encoded.decode())]
    assert [event["content"] for event in events] == ["tok0 ", "tok1 ", ""]
    assert [event["stop"] for event in events] == [False, False, True]


def test_rerank_body_top_n_and_text_objects() -> None:
    request: dict[str, object] = {
        "query": "a b",
        "documents": [{"text": "a"}, "a b", "c"],
        "top_n": 2,
    }
    body = json.loads(rerank_body(request, default_model="fallback"))
    assert body["model"] == "fallback"
    assert [r["index"] for r in body["results"]] == [1, 0]
    with pytest.raises(BadRequest):
        rerank_body({"query": "a", "documents": [3]}, default_model="m")


def test_parse_multipart_fields_files_and_errors() -> None:
    request = httpx.Request(
        "POST",
        "http://x/",
        data={"model": "w\u00e9", "n": "2"},
        files={"file": ("s.wav", b"\r\n--not-a-boundary\r\n" * 3, "audio/wav")},
    )
    form = parse_multipart(request.headers["content-type"], request.read())
    assert form.fields == {"model": "w\u00e9", "n": "2"}
    [upload] = form.files
    assert (upload.field, upload.filename, upload.content_type) == ("file", "s.wav", "audio/wav")
    assert upload.data == b"\r\n--not-a-boundary\r\n" * 3
    assert form.model("default") == "w\u00e9"
    for content_type in ("application/json", "multipart/form-data"):
        with pytest.raises(BadRequest):
            parse_multipart(content_type, b"")


def test_png_is_a_valid_png() -> None:
    assert PNG.startswith(b"\x89PNG\r\n\x1a\n")
    # Every chunk's CRC covers its type and data; a decoder checks them.
    offset = 8
    kinds = []
    while offset < len(PNG):
        (length,) = struct.unpack(">I", PNG[offset : offset + 4])
        kind = PNG[offset + 4 : offset + 8]
        data = PNG[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", PNG[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + data)
        kinds.append(kind)
        offset += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
