"""trio-swap in front of real llama-server processes (the real-backend lane).

The fast suite uses the built-in responder as upstream; this lane checks the
same promises against the program users actually run: a real cold start, a
real swap (the old llama-server really dies), real SSE streaming, and no
orphaned llama-server after SIGTERM. Each test runs its own trio-swap process
(see conftest.py) and has an absolute time limit.
"""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import trio
from real_support import TrioSwapServer, cmdline, pid_alive, start_trio_swap

pytestmark = pytest.mark.real

#: Per-test wall-clock limit. A tiny model loads in well under a second; the
#: rest is trio-swap start-up and a few 16-token generations on one thread.
TEST_LIMIT = 90.0
MESSAGES: list[Any] = [{"role": "user", "content": "Say something."}]


async def get_json(client: httpx.AsyncClient, path: str) -> Any:
    """GET an admin endpoint and decode it, failing with the body if not 200."""
    resp = await client.get(path)
    assert resp.status_code == 200, f"GET {path}: {resp.status_code} {resp.text}"
    return resp.json()


async def chat(client: httpx.AsyncClient, model: str) -> dict[str, Any]:
    """One short non-streaming chat completion through trio-swap."""
    resp = await client.post(
        "/v1/chat/completions", json={"model": model, "messages": MESSAGES, "max_tokens": 16}
    )
    assert resp.status_code == 200, f"{model}: {resp.status_code} {resp.text}"
    body: dict[str, Any] = resp.json()
    return body


async def model_pid(client: httpx.AsyncClient, model: str) -> int:
    """The upstream pid trio-swap reports for ``model`` in /api/models."""
    models = (await get_json(client, "/api/models"))["models"]
    entry = next(m for m in models if m["id"] == model)
    assert entry["state"] == "ready", entry
    assert isinstance(entry["pid"], int), entry
    return int(entry["pid"])


async def wait_until(predicate: Callable[[], bool], *, timeout: float, what: str) -> None:
    """Poll ``predicate()`` every 20 ms (a /proc state has no event); fail after ``timeout``."""
    deadline = trio.current_time() + timeout
    while trio.current_time() < deadline:
        if predicate():
            return
        await trio.sleep(0.02)
    pytest.fail(f"timed out after {timeout}s waiting for {what}")


def http(server: TrioSwapServer) -> httpx.AsyncClient:
    """A client for trio-swap's own endpoints (admin API and raw inference)."""
    return httpx.AsyncClient(base_url=server.base_url, timeout=60.0)


async def test_cold_start_with_openai_sdk(trio_swap: TrioSwapServer) -> None:
    """The first request to a stopped model starts llama-server and gets real tokens."""
    with trio.fail_after(TEST_LIMIT):
        assert trio_swap.upstream_pids() == [], "an upstream ran before any request"
        client = openai.AsyncOpenAI(
            base_url=f"{trio_swap.base_url}/v1", api_key="unused", max_retries=0, timeout=60.0
        )
        async with client:
            completion = await client.chat.completions.create(
                model="tiny-a", messages=MESSAGES, max_tokens=16
            )
        content = completion.choices[0].message.content
        assert content, f"empty completion: {completion}\n{trio_swap.log_tail()}"
        assert completion.usage is not None and completion.usage.completion_tokens > 0

        async with http(trio_swap) as h:
            running = (await get_json(h, "/running"))["running"]
            assert [(r["model"], r["state"]) for r in running] == [("tiny-a", "ready")]
            pid = await model_pid(h, "tiny-a")
        assert pid_alive(pid)
        assert trio_swap.upstream_pids(), "no llama-server process with tiny-a's model file"


async def test_swap_stops_the_previous_llama_server(trio_swap: TrioSwapServer) -> None:
    """Asking for tiny-b stops tiny-a's llama-server (the default group swaps)."""
    with trio.fail_after(TEST_LIMIT):
        async with http(trio_swap) as h:
            assert (await chat(h, "tiny-a"))["choices"][0]["message"]["content"]
            pid_a = await model_pid(h, "tiny-a")
            a_procs = [
                p
                for p in trio_swap.upstream_pids()
                if str(trio_swap.models["tiny-a"]) in cmdline(p)
            ]
            assert a_procs, "tiny-a's llama-server is not running"

            assert (await chat(h, "tiny-b"))["choices"][0]["message"]["content"]
            running = (await get_json(h, "/running"))["running"]
            assert [r["model"] for r in running] == ["tiny-b"], running
            pid_b = await model_pid(h, "tiny-b")
            assert pid_b != pid_a

        # The swap finishes stopping tiny-a before tiny-b serves; allow only
        # /proc bookkeeping slack, not a lazy background kill.
        await wait_until(
            lambda: not any(pid_alive(p) for p in [pid_a, *a_procs]),
            timeout=2.0,
            what=f"tiny-a's llama-server ({pid_a}, {a_procs}) to exit",
        )
        assert pid_alive(pid_b)


async def test_streaming_sse_ends_with_done(trio_swap: TrioSwapServer) -> None:
    """Streamed chunks arrive as SSE events with content, then ``data: [DONE]``."""
    with trio.fail_after(TEST_LIMIT):
        events: list[str] = []
        async with (
            http(trio_swap) as h,
            h.stream(
                "POST",
                "/v1/chat/completions",
                json={"model": "tiny-b", "messages": MESSAGES, "max_tokens": 16, "stream": True},
            ) as resp,
        ):
            assert resp.status_code == 200, await resp.aread()
            assert resp.headers["content-type"].startswith("text/event-stream")
            async for line in resp.aiter_lines():
                if line.startswith("data:"):
                    events.append(line.removeprefix("data:").strip())

        assert events and events[-1] == "[DONE]", events[-3:]
        chunks = [json.loads(e) for e in events[:-1]]
        assert len(chunks) >= 2, chunks
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(
            c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]
        )
        assert text, f"no content in {len(chunks)} chunks"


# openai's AsyncStream breaks out of its own SSE async generators at [DONE]
# without aclose(); under trio their finalizer then warns (an SDK quirk, not
# ours). Only those two generators' warnings are ignored.
@pytest.mark.filterwarnings(
    r"ignore:Exception ignored in. <async_generator object "
    r"(SSEDecoder\.aiter_bytes|AsyncStream\._iter_events) "
    ":pytest.PytestUnraisableExceptionWarning"
)
async def test_openai_sdk_streaming(trio_swap: TrioSwapServer) -> None:
    """The official SDK's streaming iterator works through trio-swap end to end."""
    with trio.fail_after(TEST_LIMIT):
        client = openai.AsyncOpenAI(
            base_url=f"{trio_swap.base_url}/v1", api_key="unused", max_retries=0, timeout=60.0
        )
        async with client:
            stream = await client.chat.completions.create(
                model="tiny-a", messages=MESSAGES, max_tokens=16, stream=True
            )
            async with stream:
                pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        assert "".join(pieces), pieces


async def test_sigterm_stops_every_llama_server(trio_swap: TrioSwapServer) -> None:
    """SIGTERM to trio-swap stops its upstreams and exits 0: nothing is orphaned."""
    with trio.fail_after(TEST_LIMIT):
        async with http(trio_swap) as h:
            await chat(h, "tiny-a")
            pid_a = await model_pid(h, "tiny-a")
        upstreams = trio_swap.upstream_pids()
        assert upstreams, "no llama-server was running before SIGTERM"

        trio_swap.proc.send_signal(signal.SIGTERM)
        try:
            rc = await trio.to_thread.run_sync(lambda: trio_swap.proc.wait(timeout=30))
        except subprocess.TimeoutExpired:
            pytest.fail(f"trio-swap did not exit within 30s of SIGTERM:\n{trio_swap.log_tail()}")
        assert rc == 0, f"exit code {rc}:\n{trio_swap.log_tail()}"

        left = [p for p in [pid_a, *upstreams] if pid_alive(p)] + trio_swap.upstream_pids()
        assert not left, f"llama-server processes left behind: {sorted(set(left))}"


async def test_sigkill_of_trio_swap_still_leaves_no_llama_server(trio_swap: TrioSwapServer) -> None:
    """Even a SIGKILLed trio-swap takes its upstreams with it (DESIGN invariant 5)."""
    with trio.fail_after(TEST_LIMIT):
        async with http(trio_swap) as h:
            await chat(h, "tiny-a")
        upstreams = trio_swap.upstream_pids()
        assert upstreams, "no llama-server was running before SIGKILL"

        trio_swap.proc.send_signal(signal.SIGKILL)
        await trio.to_thread.run_sync(trio_swap.proc.wait)
        await wait_until(
            lambda: not trio_swap.upstream_pids(),
            timeout=5.0,
            what=f"llama-server {trio_swap.upstream_pids()} to die with its trio-swap",
        )


@pytest.fixture
def fit_trio_swap(
    tmp_path: Path, llama_server_bin: Path, tiny_models: dict[str, Path]
) -> Iterator[TrioSwapServer]:
    """trio-swap serving tiny-a and tiny-b with fit by memory (4 GiB of RAM, no groups)."""
    handle = start_trio_swap(
        tmp_path, llama_server_bin, tiny_models, top=("resources:", "  ram: 4GiB")
    )
    try:
        yield handle
    finally:
        if handle.proc.poll() is None:
            handle.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                handle.proc.wait(timeout=15)
        handle.kill_everything()


async def test_fit_estimates_from_the_gguf_then_measures_the_real_server(
    fit_trio_swap: TrioSwapServer,
) -> None:
    """Before a load the need comes from the -m file; after, from the server's own memory;
    two small llama-servers then run side by side (no groups: fit decides)."""
    server = fit_trio_swap
    with trio.fail_after(TEST_LIMIT):
        async with http(server) as h:
            fit = await get_json(h, "/api/fit")
            assert fit["enabled"] is True
            rows = {row["id"]: row for row in fit["models"]}
            size = server.models["tiny-a"].stat().st_size
            assert rows["tiny-a"]["basis"] == {"ram": "estimated"}
            assert rows["tiny-a"]["needs"]["ram"] == size + -(-size * 10 // 100)

            await chat(h, "tiny-a")
            pid_a = await model_pid(h, "tiny-a")

            async def measured(model: str) -> dict[str, Any]:
                while True:
                    row = next(
                        r for r in (await get_json(h, "/api/fit"))["models"] if r["id"] == model
                    )
                    if row["footprint"]:
                        return dict(row)
                    await trio.sleep(0.05)

            row_a = await measured("tiny-a")
            assert row_a["basis"] == {"ram": "measured"}
            assert row_a["footprint"]["ram"] > 1 << 20  # a real server holds megabytes
            assert row_a["load_seconds"] is not None

            await chat(h, "tiny-b")
            assert pid_alive(pid_a), "tiny-a was evicted though both fit in 4 GiB"
            running = sorted(r["model"] for r in (await get_json(h, "/running"))["running"])
            assert running == ["tiny-a", "tiny-b"]
            row_b = await measured("tiny-b")
            use = (await get_json(h, "/api/fit"))["resources"]["ram"]
            assert use["used"] >= row_a["footprint"]["ram"] // 2 + row_b["footprint"]["ram"] // 2
            assert use["reserved"] <= use["capacity"]
