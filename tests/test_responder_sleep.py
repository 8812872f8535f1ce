"""The responder's sleep mode (``--sleep-api vllm|sglang``): a real process, real HTTP.

RSS is read from /proc, as in tests/test_responder.py. No assert depends on
timing except the delays' lower bounds (a call with ``--sleep-delay S`` cannot
answer sooner than S), which hold on any machine.
"""

from __future__ import annotations

from typing import Final

import httpx
import pytest
import trio

from tests.conftest import wait_for
from tests.test_responder import TIMEOUT, _resident_bytes, run_responder
from trio_swap.responder import parse_options

CHAT: Final = "/v1/chat/completions"
PING: Final = {"model": "m", "messages": [{"role": "user", "content": "ping"}], "max_tokens": 1}
HELD: Final = 64 << 20
#: How much RSS must move on a sleep or wake: most of the block (the rest of the
#: process, ~40 MiB of Python, is resident either way).
MOVED: Final = HELD * 3 // 4


async def _chat(client: httpx.AsyncClient) -> httpx.Response:
    return await client.post(CHAT, json=PING)


async def test_vllm_level_1_sleep_releases_ram_and_wake_takes_it_back() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--sleep-api", "vllm", "--hold-memory", "64MiB") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            pid = responder.process.pid
            awake_rss = _resident_bytes(pid)
            assert awake_rss >= HELD
            assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}

            asleep = await client.post("/sleep", params={"level": "1"})
            assert (asleep.status_code, asleep.content) == (200, b"")
            assert _resident_bytes(pid) <= awake_rss - MOVED
            assert (await client.get("/is_sleeping")).json() == {"is_sleeping": True}
            assert (await client.get("/health")).status_code == 200
            refused = await _chat(client)
            assert refused.status_code == 503
            assert refused.json()["error"]["message"] == "the model is sleeping"
            await responder.wait_for_line("sleeping (level 1)")

            awake = await client.post("/wake_up", params={"tags": "weights"})
            assert (awake.status_code, awake.content) == (200, b"")
            assert _resident_bytes(pid) >= awake_rss - HELD // 8
            assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}
            assert (await _chat(client)).status_code == 200
            reset = await client.post("/reset_prefix_cache")
            assert (reset.status_code, reset.content) == (200, b"")
            await responder.wait_for_line("awake")


async def test_vllm_level_2_needs_reload_weights_after_wake() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--sleep-api", "vllm", "--hold-memory", "64MiB") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            pid = responder.process.pid
            awake_rss = _resident_bytes(pid)
            assert (await client.post("/sleep?level=2")).status_code == 200
            assert _resident_bytes(pid) <= awake_rss - MOVED
            early = await client.post("/collective_rpc", json={"method": "reload_weights"})
            assert early.status_code == 503  # nothing to reload into while asleep
            assert (await client.post("/wake_up")).status_code == 200
            assert _resident_bytes(pid) >= awake_rss - HELD // 8
            unloaded = await _chat(client)
            assert unloaded.status_code == 500
            assert unloaded.json()["error"]["message"].startswith("weights not loaded")
            other = await client.post("/collective_rpc", json={"method": "other"})
            assert other.status_code == 400
            reload = await client.post("/collective_rpc", json={"method": "reload_weights"})
            assert (reload.status_code, reload.json()) == (200, {"results": [None]})
            assert (await client.post("/reset_prefix_cache")).status_code == 200
            assert (await _chat(client)).status_code == 200


async def test_vllm_bad_level_and_methods() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--sleep-api", "vllm") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            assert (await client.post("/sleep?level=3")).status_code == 400
            assert (await client.get("/sleep")).status_code == 405
            assert (await client.post("/is_sleeping")).status_code == 405
            # The other flavour's routes do not exist.
            assert (await client.post("/release_memory_occupation")).status_code == 404
            # A sleep without ?level is level 1; a wake while awake changes nothing.
            assert (await client.post("/wake_up")).status_code == 200
            assert (await _chat(client)).status_code == 200
            assert (await client.post("/sleep")).status_code == 200
            assert (await client.post("/wake_up")).status_code == 200
            assert (await _chat(client)).status_code == 200


async def test_sglang_release_and_resume() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--sleep-api", "sglang", "--hold-memory", "64MiB") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            pid = responder.process.pid
            awake_rss = _resident_bytes(pid)
            released = await client.post("/release_memory_occupation", json={})
            assert released.status_code == 200
            assert released.json()["success"] is True
            assert _resident_bytes(pid) <= awake_rss - MOVED
            assert (await _chat(client)).status_code == 503
            assert (await client.get("/health")).status_code == 200
            resumed = await client.post("/resume_memory_occupation", content=b"")
            assert (resumed.status_code, resumed.json()["success"]) == (200, True)
            assert _resident_bytes(pid) >= awake_rss - HELD // 8
            assert (await _chat(client)).status_code == 200
            bad = await client.post("/release_memory_occupation", content=b"[1]")
            assert bad.status_code == 400
            assert (await client.post("/sleep")).status_code == 404  # vLLM's route


async def test_sleep_and_wake_delays_apply() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder(
                "--sleep-api", "vllm", "--sleep-delay", "0.3", "--wake-delay", "0.4"
            ) as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            started = trio.current_time()
            assert (await client.post("/sleep")).status_code == 200
            slept = trio.current_time() - started
            started = trio.current_time()
            assert (await client.post("/wake_up")).status_code == 200
            woke = trio.current_time() - started
    assert slept >= 0.3
    assert woke >= 0.4


async def test_a_wake_sent_during_a_sleep_waits_for_it() -> None:
    """Calls are serialised: the wake answers after the sleep, and the server is awake."""
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--sleep-api", "vllm", "--sleep-delay", "0.5") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):

            async def call(path: str) -> None:
                assert (await client.post(path)).status_code == 200

            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, "/sleep")

                async def sleeping() -> bool:
                    return (await client.get("/is_sleeping")).json()["is_sleeping"] is True

                await wait_for(sleeping, what="the sleep to begin")
                nursery.start_soon(call, "/wake_up")
            # Logged as each call ends, in the order they ran.
            await responder.wait_for_line("awake")
            done = [line for line in responder.stdout if line in ("sleeping (level 1)", "awake")]
            assert done == ["sleeping (level 1)", "awake"]
            assert (await client.get("/is_sleeping")).json() == {"is_sleeping": False}


async def test_broken_after_wake_answers_500() -> None:
    with trio.fail_after(TIMEOUT):
        async with (
            run_responder("--sleep-api", "vllm", "--broken-after-wake") as responder,
            httpx.AsyncClient(base_url=responder.url) as client,
        ):
            assert (await _chat(client)).status_code == 200  # fine until a wake
            assert (await client.post("/sleep")).status_code == 200
            assert (await client.post("/wake_up")).status_code == 200
            for path in (CHAT, "/v1/completions"):
                broken = await client.post(path, json=PING)
                assert broken.status_code == 500
                assert "broken-after-wake" in broken.json()["error"]["message"]
            assert (await client.get("/health")).status_code == 200


def test_sleep_options() -> None:
    defaults = parse_options(["--port", "0"])
    assert (defaults.sleep_api, defaults.sleep_delay, defaults.wake_delay) == (None, 0.0, 0.0)
    assert defaults.broken_after_wake is False
    options = parse_options(
        ["--port", "0", "--sleep-api", "sglang", "--sleep-delay", "1.5", "--broken-after-wake"]
    )
    assert (options.sleep_api, options.sleep_delay, options.broken_after_wake) == (
        "sglang",
        1.5,
        True,
    )


@pytest.mark.parametrize(
    "args",
    [
        ["--sleep-api", "llama"],
        ["--sleep-api", "vllm", "--wake-delay", "-1"],
        ["--sleep-delay", "1"],
        ["--wake-delay", "1"],
        ["--broken-after-wake"],
    ],
)
def test_bad_sleep_options_exit_2(args: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_options(["--port", "0", *args])
    assert exited.value.code == 2
    assert "error:" in capsys.readouterr().err
