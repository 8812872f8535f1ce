"""Sleep instead of stop (issue 12): swaps put ``sleep:`` models to sleep and wake them.

Real responders speaking vLLM's sleep API (``--sleep-api vllm``), holding real
memory that they release when asleep: a swap keeps the process (same PID),
its memory goes and comes back, a wake that leaves the server broken is caught
by the test request and the model is started cold, sleepTTL stops a model
that slept too long, and an unload stops a sleeping one.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import msgspec
import trio

from tests.conftest import alive, chat, free_port, running, wait_for
from trio_swap.config.load import load_config_text
from trio_swap.config.model import Config
from trio_swap.upstream.footprint import measure_footprint

MiB = 1 << 20


def sleepy_config(*flags_by_model: tuple[str, Sequence[str]], sleep_ttl: float = 3600) -> Config:
    lines = [f"startPort: {free_port()}", f"sleepTTL: {sleep_ttl}", "logToStdout: none", "models:"]
    for model, flags in flags_by_model:
        cmd = [sys.executable, "-m", "trio_swap", "responder", "--port", "${PORT}"]
        cmd += ["--model", model, "--sleep-api", "vllm", "--hold-memory", "64MiB", *flags]
        lines += [f"  {model}:", f"    cmd: {' '.join(cmd)}", "    sleep: vllm"]
    return load_config_text("\n".join(lines) + "\n", "<test>")


async def answer(harness: object, model: str) -> str:
    client = harness.client  # type: ignore[attr-defined]
    response = await client.post("/v1/chat/completions", json=chat(model))
    assert response.status_code == 200, response.text
    return str(response.json()["choices"][0]["message"]["content"])


async def test_a_swap_puts_the_victim_to_sleep_and_the_next_request_wakes_it() -> None:
    config = sleepy_config(("a", ()), ("b", ()))
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            pid_a = harness.pid("a")
            assert pid_a is not None
            held = measure_footprint(pid_a, None)["ram"]
            await answer(harness, "b")  # a goes to sleep, not away
            rows = await harness.models()
            assert rows["a"]["state"] == "sleeping"
            assert rows["a"]["pid"] == pid_a
            assert measure_footprint(pid_a, None)["ram"] < held - 48 * MiB  # memory released
            await answer(harness, "a")  # wakes: the same process answers
            rows = await harness.models()
            assert rows["a"]["state"] == "ready"
            assert rows["a"]["pid"] == pid_a
            assert rows["a"]["start_count"] == 1
            assert rows["b"]["state"] == "sleeping"
            running_rows = (await harness.client.get("/running")).json()["running"]
            assert {r["model"]: r["state"] for r in running_rows} == {
                "a": "ready",
                "b": "sleeping",
            }
            metrics = (await harness.client.get("/metrics")).text
            assert 'trio_swap_model_sleeps_total{model="a",outcome="ok"} 1.0' in metrics
            assert 'trio_swap_model_wakes_total{model="a",outcome="ok"} 1.0' in metrics
            assert 'trio_swap_model_state{model="b",state="sleeping"} 1.0' in metrics
            # A sleep for a swap is an eviction (it left the GPU)...
            assert 'trio_swap_model_evictions_total{model="a",reason="swap"} 1.0' in metrics
            await harness.client.post("/api/models/unload")  # an unload stops sleepers too
            rows = await harness.models()
            assert {rows[m]["state"] for m in ("a", "b")} == {"stopped"}
            metrics = (await harness.client.get("/metrics")).text
            # ...and stopping it asleep later is not a second one; a (awake) is.
            assert 'trio_swap_model_evictions_total{model="b",reason="unload"} 0.0' in metrics
            assert 'trio_swap_model_evictions_total{model="a",reason="unload"} 1.0' in metrics


async def test_a_broken_wake_is_caught_by_the_test_request_and_started_cold() -> None:
    config = sleepy_config(("a", ("--broken-after-wake",)), ("b", ()))
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            pid_a = harness.pid("a")
            await answer(harness, "b")
            assert (await harness.models())["a"]["state"] == "sleeping"
            await answer(harness, "a")  # the woken server fails its test: a cold start
            rows = await harness.models()
            assert rows["a"]["state"] == "ready"
            assert rows["a"]["pid"] != pid_a
            assert rows["a"]["start_count"] == 2
            metrics = (await harness.client.get("/metrics")).text
            assert 'trio_swap_model_wakes_total{model="a",outcome="failed"} 1.0' in metrics


async def test_a_model_asleep_longer_than_sleep_ttl_is_stopped() -> None:
    config = sleepy_config(("a", ()), ("b", ()), sleep_ttl=0.5)
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            await answer(harness, "b")

            async def a_stopped() -> bool:
                return (await harness.models())["a"]["state"] == "stopped"

            await wait_for(a_stopped, what="a to be stopped after sleepTTL")
            await answer(harness, "a")  # a cold start now
            assert (await harness.models())["a"]["start_count"] == 2


async def test_a_reload_that_changes_a_sleeping_model_stops_it_and_starts_the_new_settings() -> (
    None
):
    config = sleepy_config(("a", ()), ("b", ()))
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            pid_a = harness.pid("a")
            await answer(harness, "b")
            assert (await harness.models())["a"]["state"] == "sleeping"
            a = config.models["a"]
            changed = msgspec.structs.replace(a, cmd=(*a.cmd, "--tokens", "3"))
            new = msgspec.structs.replace(config, models={**config.models, "a": changed})
            await harness.server.reload(new)

            async def a_stopped() -> bool:
                return (await harness.models())["a"]["state"] == "stopped"

            await wait_for(a_stopped, what="the sleeping a to be stopped by the reload")
            await answer(harness, "a")
            pid = harness.pid("a")
            assert pid is not None and pid != pid_a
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()  # noqa: ASYNC240
            assert b"--tokens\x003" in cmdline  # the new settings run


def two_models(a_sleep: str, a_flags: Sequence[str] = ()) -> Config:
    """a with ``a_sleep`` and ``a_flags``, b with ``sleep: vllm``."""
    lines = [f"startPort: {free_port()}", "logToStdout: none", "models:"]
    for model, sleep, flags in (("a", a_sleep, a_flags), ("b", "vllm", ())):
        cmd = [sys.executable, "-m", "trio_swap", "responder", "--port", "${PORT}"]
        cmd += ["--model", model, "--sleep-api", "vllm", *flags]
        lines += [f"  {model}:", f"    cmd: {' '.join(cmd)}", f"    sleep: {sleep}"]
    return load_config_text("\n".join(lines) + "\n", "<test>")


async def test_a_failed_sleep_stops_the_model_and_its_next_start_stays_awake() -> None:
    config = two_models("{sleep: POST /nope, wake: POST /wake_up}")  # the sleep call 404s
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            await answer(harness, "b")
            assert (await harness.models())["a"]["state"] == "stopped"
            await answer(harness, "a")  # a cold start, not put to sleep at once
            assert (await harness.models())["a"]["state"] == "ready"
            await answer(harness, "a")


async def test_a_stop_during_the_sleep_call_does_not_wait_for_it_nor_haunt_the_next_start() -> None:
    config = two_models("vllm", ("--sleep-delay", "30"))  # a sleep call that hangs
    with trio.fail_after(20):  # a hang guard: the unload must not wait 30 s
        async with running(config) as harness:
            await answer(harness, "a")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer, harness, "b")
                await wait_for(
                    lambda: harness.server.processes["a"]._sleep_asked.is_set(),
                    what="a's sleep to be asked for",
                )
                await harness.client.post("/api/models/unload/a")
            await answer(harness, "a")
            rows = await harness.models()
            assert rows["a"]["state"] == "ready"  # awake: no leftover sleep order
            await answer(harness, "a")


async def test_a_reload_during_the_sleep_call_never_wakes_the_old_settings() -> None:
    config = two_models("vllm", ("--sleep-delay", "1"))
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            pid_a = harness.pid("a")
            async with trio.open_nursery() as nursery:
                nursery.start_soon(answer, harness, "b")
                await wait_for(
                    lambda: harness.server.processes["a"]._sleep_asked.is_set(),
                    what="a's sleep to be asked for",
                )
                a = config.models["a"]
                changed = msgspec.structs.replace(a, cmd=(*a.cmd, "--tokens", "3"))
                await harness.server.reload(
                    msgspec.structs.replace(config, models={**config.models, "a": changed})
                )
            await answer(harness, "a")
            assert harness.pid("a") != pid_a


async def test_a_reload_that_drops_sleep_from_a_sleeper_wakes_it_with_the_calls_it_slept_with() -> (
    None
):
    config = two_models("vllm")
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            pid_a = harness.pid("a")
            await answer(harness, "b")
            a = msgspec.structs.replace(config.models["a"], sleep=None)
            await harness.server.reload(
                msgspec.structs.replace(config, models={**config.models, "a": a})
            )
            await answer(harness, "a")  # the server keeps serving
            assert harness.pid("a") == pid_a


async def test_a_reload_that_removes_a_sleeping_model_stops_its_process() -> None:
    config = two_models("vllm")
    with trio.fail_after(60):
        async with running(config) as harness:
            await answer(harness, "a")
            await answer(harness, "b")
            pid_a = harness.pid("a")
            assert (await harness.models())["a"]["state"] == "sleeping"
            await harness.server.reload(
                msgspec.structs.replace(config, models={"b": config.models["b"]})
            )
            await wait_for(lambda: not alive(pid_a), what="the removed sleeper to exit")
