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

import functools
import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Final, final

import httpx
import pytest
import trio

import trio_swap
from trio_swap.responder import build_parser, parse_options
from trio_swap.responder.payloads import (
    StreamTemplate,
    embedding_vector,
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
            while True:  # poll, as a supervisor's readiness check does
                health = await client.get("/health")
                if health.status_code != 503:
                    break
                await trio.sleep(0.05)
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


# --- process behaviour ----------------------------------------------------------------


async def test_fail_start_exits_1_with_error_line() -> None:
    with trio.fail_after(TIMEOUT):
        async with run_responder("--fail-start", "--model", "q", listening=False) as responder:
            assert await responder.process.wait() == 1
            line = await responder.wait_for_line("error:", stderr=True)
    assert line == "error: failed to load model 'q': simulated failure"
    assert not any("listening" in out for out in responder.stdout)


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
