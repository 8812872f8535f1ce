"""Config reload without downtime (docs/reload.md).

Pure tests first (port assignment, the diff, the scheduler's reconfigure
rules), then real responder processes behind a real trio-swap: what stays up,
what restarts and when, what a client sees, and the three triggers (the API,
SIGHUP and ``--watch-config``) on a real ``trio-swap serve``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import pytest
import trio
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.conftest import Harness, alive, chat, free_port, make_config, responder_model, running
from trio_swap.config import Config, ConfigError, ModelConfig, load_config, load_config_text
from trio_swap.config.diff import diff_configs
from trio_swap.errors import ModelNotFound
from trio_swap.policy import OneAtATime, build_policy
from trio_swap.reload import Reloader, ReloadUnavailable
from trio_swap.router import Router
from trio_swap.scheduling import (
    FifoScheduler,
    Grant,
    ModelLimits,
    Phase,
    Queued,
    Reject,
    Retire,
    StartSwap,
    StopModels,
)
from trio_swap.upstream import ModelProcess

PYTHON = sys.executable


def config_text(
    models: dict[str, str], *, start_port: int, extra: str = "", flags: str = ""
) -> str:
    """A config of responders: model id -> extra responder flags; ports from ``${PORT}``."""
    lines = ["healthCheckTimeout: 30", f"startPort: {start_port}", "logLevel: debug", extra]
    lines.append("models:")
    for model_id, model_flags in models.items():
        lines.append(f"  {model_id}:")
        lines.append(
            f"    cmd: {PYTHON} -m trio_swap responder --port ${{PORT}} --model ${{MODEL_ID}}"
            f" {flags} {model_flags}"
        )
    return "\n".join(lines) + "\n"


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def content_tokens(lines: Sequence[str]) -> int:
    events = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    assert events and events[-1] == "[DONE]", lines[-3:]
    return sum(1 for event in events[:-1] if '"content"' in event)


async def stream(h: Harness, model: str, into: list[str], first_token: trio.Event) -> None:
    """A streaming chat whose lines land in ``into``; ``first_token`` once one arrived."""
    async with h.client.stream(
        "POST", "/v1/chat/completions", json=chat(model, stream=True)
    ) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            into.append(line)
            if '"content"' in line:
                first_token.set()


def served_by(response: httpx.Response) -> int:
    """The responder's pid, from its completion id ``chatcmpl-<pid>-<n>``."""
    assert response.status_code == 200, response.text
    return int(response.json()["id"].split("-")[1])


async def reload(h: Harness) -> dict[str, object]:
    response = await h.client.post("/api/config/reload")
    assert response.status_code == 200, response.text
    body: dict[str, object] = response.json()
    return body


async def wait_until_gone(pid: int | None) -> None:
    while alive(pid):
        await trio.sleep(0.02)


# -- ${PORT} stability ---------------------------------------------------------------


def test_ports_of_surviving_models_stay_when_a_model_is_inserted_before_them() -> None:
    text = "startPort: 7000\nmodels:\n" + "".join(
        f"  {m}:\n    cmd: serve --port ${{PORT}}\n" for m in ("m", "z")
    )
    before = load_config_text(text, "c.yaml")
    assert before.ports == {"m": 7000, "z": 7001}
    inserted = text + "  a:\n    cmd: serve --port ${PORT}\n"
    fresh = load_config_text(inserted, "c.yaml")
    assert fresh.ports == {"a": 7000, "m": 7001, "z": 7002}  # llama-swap's numbering
    after = load_config_text(inserted, "c.yaml", previous=before)
    assert after.ports == {"a": 7002, "m": 7000, "z": 7001}
    assert after.models["m"] == before.models["m"]
    assert after.models["a"].proxy == "http://localhost:7002"
    # a removed model's port goes to the next model added
    removed = load_config_text(text.replace("  m:\n", "  b:\n"), "c.yaml", previous=after)
    assert removed.ports == {"b": 7000, "z": 7001}
    # a new startPort numbers everything afresh, as asked
    moved = load_config_text(inserted.replace("7000", "8000"), "c.yaml", previous=after)
    assert moved.ports == {"a": 8000, "m": 8001, "z": 8002}


def test_diff_sorts_models_by_what_a_reload_does_to_them() -> None:
    text = """\
models:
  same: {cmd: "serve --port ${PORT}"}
  ttl: {cmd: "serve --port ${PORT}", ttl: 60}
  cmd: {cmd: "serve --port ${PORT} --fast"}
  gone: {cmd: "serve --port ${PORT}"}
"""
    old = load_config_text(text, "c.yaml")
    new_text = (
        text.replace("ttl: 60", "ttl: 90, aliases: [t]")
        .replace("--fast", "--slow")
        .replace("  gone:", "  new:")
    ) + "apiKeys: [sk-1]\ngroups:\n  g: {swap: false, members: [same, ttl]}\n"
    diff = diff_configs(old, load_config_text(new_text, "c.yaml", previous=old))
    assert diff.added == ("new",)
    assert diff.removed == ("gone",)
    assert diff.changed == ("ttl", "cmd")
    assert diff.restart == ("cmd",)  # a ttl or an alias never restarts a process
    assert diff.unchanged == ("same",)
    assert diff.settings == ("apiKeys", "groups")


def test_every_config_field_is_compared_by_a_reload() -> None:
    """A new Config field must be added to SETTINGS (or COMPARED_ELSEWHERE) in
    config/diff.py, so a reload reports it (and NOT_RELOADED if it cannot apply it)."""
    from trio_swap.config.diff import COMPARED_ELSEWHERE, SETTINGS
    from trio_swap.config.model import Config

    assert set(Config.__struct_fields__) == set(SETTINGS) | COMPARED_ELSEWHERE


# -- the scheduler's rules (pure) ---------------------------------------------------------


def limits() -> ModelLimits:
    return ModelLimits(concurrency_limit=10, ttl=0)


def loaded(*models: str) -> FifoScheduler:
    """A one-at-a-time scheduler whose first model is ready with request 1 in flight."""
    scheduler = FifoScheduler({m: limits() for m in models}, OneAtATime())
    [start] = scheduler.on_request(1, models[0], 0)
    assert isinstance(start, StartSwap)
    assert scheduler.on_swap_done(start.swap_id, None, 0) == [Grant(request_id=1, model=models[0])]
    return scheduler


def test_fifo_a_changed_model_serves_no_new_request_until_it_restarted() -> None:
    scheduler = loaded("a", "b")
    models = {"a": limits(), "b": limits()}
    assert scheduler.on_reconfigure(models, OneAtATime(), restart={"a"}, now=1) == []
    # the old process must not take a request after the reload: it waits
    assert scheduler.on_request(2, "a", 1) == [Queued(request_id=2, model="a", position=1)]
    # the stream ends: stop the old process; once it is gone, the waiting request
    # starts the new one
    stop = StopModels(stop_id=1, models=("a",), reason="reload")
    assert scheduler.on_finished(1, 2) == [stop]
    assert scheduler.on_stops_done(1, 3) == [StartSwap(swap_id=2, target="a", victims=())]
    assert scheduler.on_swap_done(2, None, 3) == [Grant(request_id=2, model="a")]
    assert scheduler.on_request(3, "a", 4) == [Grant(request_id=3, model="a")]


def test_fifo_an_idle_changed_model_stops_at_once() -> None:
    scheduler = loaded("a")
    assert scheduler.on_finished(1, 1) == []
    decisions = scheduler.on_reconfigure({"a": limits()}, OneAtATime(), restart={"a"}, now=2)
    assert decisions == [StopModels(stop_id=1, models=("a",), reason="reload")]


def test_fifo_a_removed_model_finishes_its_request_then_stops_and_is_retired() -> None:
    scheduler = loaded("a", "b")
    assert scheduler.on_reconfigure({"b": limits()}, OneAtATime(), now=1) == []
    [reject] = scheduler.on_request(2, "a", 1)
    assert isinstance(reject, Reject) and isinstance(reject.error, ModelNotFound)
    # loading b needs the removed model gone (no policy vouches for running both)
    assert scheduler.on_request(3, "b", 1) == [Queued(request_id=3, model="b", position=1)]
    stop, swap = scheduler.on_finished(1, 2)
    assert stop == StopModels(stop_id=1, models=("a",), reason="reload")
    assert swap == StartSwap(swap_id=2, target="b", victims=("a",))
    assert scheduler.on_swap_done(2, None, 3) == [Grant(request_id=3, model="b")]
    assert scheduler.on_stops_done(1, 3) == [Retire(model="a")]
    assert scheduler.running() == ["b"]


def test_fifo_a_policy_change_places_the_queue_again() -> None:
    from trio_swap.config.model import GroupConfig
    from trio_swap.policy import GroupsPolicy

    scheduler = loaded("a", "b")
    assert scheduler.on_request(2, "b", 1) == [Queued(request_id=2, model="b", position=1)]
    together = GroupsPolicy([GroupConfig(name="g", swap=False, members=("a", "b"))], ["a", "b"])
    decisions = scheduler.on_reconfigure({"a": limits(), "b": limits()}, together, now=2)
    assert decisions == [StartSwap(swap_id=2, target="b", victims=())]


# -- real processes -----------------------------------------------------------------------


@asynccontextmanager
async def serving(path: Path, **options: object) -> AsyncIterator[Harness]:
    async with running(load_config(path), config_path=path, **options) as h:
        yield h


async def test_unchanged_model_keeps_its_process_and_its_stream_through_a_reload(
    tmp_path: Path,
) -> None:
    start = free_port()
    slow = "--tokens 30 --token-delay 0.05"
    path = write(tmp_path / "c.yaml", config_text({"m": slow, "z": ""}, start_port=start))
    with trio.fail_after(60):
        async with serving(path) as h:
            lines: list[str] = []
            first_token = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, h, "m", lines, first_token)
                await first_token.wait()
                before = await h.models()
                # "a" sorts before "m": with llama-swap's numbering m would get a new port
                edited = config_text({"m": slow, "z": "--tokens 4", "a": ""}, start_port=start)
                report = await reload(h)  # the file has not changed yet: nothing to do
                assert report["changed"] == [] and report["unchanged"] == ["m", "z"]
                write(path, edited)
                report = await reload(h)
                assert report["added"] == ["a"]
                assert report["changed"] == ["z"] and report["restart"] == ["z"]
                assert report["unchanged"] == ["m"]
                assert report["source"] == str(path)
                assert h.pid("m") == before["m"]["pid"]
            assert content_tokens(lines) == 30  # the stream went on untouched
            after = await h.models()
            assert after["m"]["pid"] == before["m"]["pid"]
            assert after["m"]["start_count"] == 1
            assert after["m"]["port"] == before["m"]["port"]
            assert after["z"]["port"] == before["z"]["port"]
            response = await h.client.post("/v1/chat/completions", json=chat("m"))
            assert served_by(response) == before["m"]["pid"]
            # the added model is routable and listed
            assert served_by(await h.client.post("/v1/chat/completions", json=chat("a")))
            listed = {m["id"] for m in (await h.client.get("/v1/models")).json()["data"]}
            assert listed == {"a", "m", "z"}


async def test_changed_model_finishes_its_stream_then_serves_the_new_settings(
    tmp_path: Path,
) -> None:
    start = free_port()
    path = write(
        tmp_path / "c.yaml",
        config_text({"m": "--tokens 30 --token-delay 0.05"}, start_port=start),
    )
    with trio.fail_after(60):
        async with serving(path) as h:
            lines: list[str] = []
            first_token = trio.Event()
            finished: list[str] = []
            answers: list[httpx.Response] = []

            async def streamed() -> None:
                await stream(h, "m", lines, first_token)
                finished.append("stream")

            async def asked() -> None:
                answers.append(await h.client.post("/v1/chat/completions", json=chat("m")))
                finished.append("request")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(streamed)
                await first_token.wait()
                old_pid = h.pid("m")
                write(path, config_text({"m": "--tokens 5"}, start_port=start))
                report = await reload(h)
                assert report["changed"] == ["m"] and report["restart"] == ["m"]
                nursery.start_soon(asked)  # after the reload: must run the new settings
            assert finished == ["stream", "request"]
            assert content_tokens(lines) == 30
            [answer] = answers
            assert served_by(answer) != old_pid
            assert answer.json()["usage"]["completion_tokens"] == 5
            assert not alive(old_pid)
            assert (await h.models())["m"]["start_count"] == 2


async def test_settings_that_need_no_restart_apply_in_place(tmp_path: Path) -> None:
    start = free_port()
    path = write(tmp_path / "c.yaml", config_text({"m": ""}, start_port=start))
    with trio.fail_after(60):
        async with serving(path) as h:
            pid = served_by(await h.client.post("/v1/chat/completions", json=chat("m")))
            edited = config_text({"m": ""}, start_port=start).replace(
                "  m:\n", "  m:\n    aliases: [mini]\n    ttl: 300\n    name: Mini\n"
            )
            write(path, edited)
            report = await reload(h)
            assert report["changed"] == ["m"] and report["restart"] == []
            response = await h.client.post("/v1/chat/completions", json=chat("mini"))
            assert served_by(response) == pid
            row = (await h.models())["m"]
            assert (row["pid"], row["ttl"], row["name"], row["aliases"]) == (
                pid,
                300,
                "Mini",
                ["mini"],
            )


async def test_broken_config_is_reported_and_the_old_one_keeps_serving(tmp_path: Path) -> None:
    start = free_port()
    good = config_text({"m": ""}, start_port=start)
    path = write(tmp_path / "c.yaml", good)
    with trio.fail_after(60):
        async with serving(path) as h:
            pid = served_by(await h.client.post("/v1/chat/completions", json=chat("m")))
            write(path, good + "  broken: [unclosed\n")
            response = await h.client.post("/api/config/reload")
            assert response.status_code == 422
            error = response.json()["error"]
            assert error["code"] == "invalid_config"
            assert error["source"] == str(path)
            assert isinstance(error["line"], int)
            assert f"{path}:" in error["message"]
            assert "previous config keeps serving" in error["message"]

            write(path, good.replace("  m:\n", "  m:\n    ttl: -5\n"))
            response = await h.client.post("/api/config/reload")
            assert response.status_code == 422
            error = response.json()["error"]
            assert (error["key_path"], error["line"]) == ("models.m.ttl", 7)
            assert f"{path}:7: models.m.ttl" in error["message"]
            with pytest.raises(ConfigError):
                await h.server.reload()

            response = await h.client.post("/v1/chat/completions", json=chat("m"))
            assert served_by(response) == pid


async def test_removed_model_finishes_its_stream_then_stops_and_404s(tmp_path: Path) -> None:
    start = free_port()
    slow = "--tokens 30 --token-delay 0.05"
    path = write(tmp_path / "c.yaml", config_text({"m": slow, "n": ""}, start_port=start))
    with trio.fail_after(60):
        async with serving(path) as h:
            lines: list[str] = []
            first_token = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, h, "m", lines, first_token)
                await first_token.wait()
                pid = h.pid("m")
                write(path, config_text({"n": ""}, start_port=start))
                report = await reload(h)
                assert report["removed"] == ["m"] and report["unchanged"] == ["n"]
                response = await h.client.post("/v1/chat/completions", json=chat("m"))
                assert response.status_code == 404
                assert response.json()["error"]["code"] == "model_not_found"
                assert alive(pid)  # still streaming
            assert content_tokens(lines) == 30
            await wait_until_gone(pid)
            listed = [m["id"] for m in (await h.client.get("/v1/models")).json()["data"]]
            assert listed == ["n"]
            while "m" in h.server.processes:  # retired: its supervisor ended
                await trio.sleep(0.02)
            assert served_by(await h.client.post("/v1/chat/completions", json=chat("n")))
            scrape = (await h.client.get("/metrics")).text
            assert 'trio_swap_model_evictions_total{model="m",reason="reload"} 1.0' in scrape


async def test_policy_change_takes_effect_for_requests_already_waiting(tmp_path: Path) -> None:
    """A request queued behind a stream (one model at a time) runs at once when a
    reload puts both models in a group that does not swap."""
    start = free_port()
    long = "--tokens 400 --token-delay 0.05"  # 20 s: far longer than a load
    path = write(tmp_path / "c.yaml", config_text({"a": long, "b": ""}, start_port=start))
    with trio.fail_after(60):
        async with serving(path) as h:
            lines: list[str] = []
            first_token = trio.Event()
            answered = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, h, "a", lines, first_token)
                await first_token.wait()
                a_pid = h.pid("a")

                async def ask_b() -> None:
                    response = await h.client.post("/v1/chat/completions", json=chat("b"))
                    assert response.status_code == 200
                    answered.set()

                nursery.start_soon(ask_b)
                while (await h.models())["b"]["queued"] != 1:
                    await trio.sleep(0.02)
                group = "groups:\n  both:\n    swap: false\n    members: [a, b]\n"
                write(path, config_text({"a": long, "b": ""}, start_port=start, extra=group))
                report = await reload(h)
                assert report["settings"] == ["groups"] and report["unchanged"] == ["a", "b"]
                await answered.wait()
                assert "[DONE]" not in "".join(lines)  # b ran beside a's stream
                assert h.pid("a") == a_pid
                nursery.cancel_scope.cancel()
            assert (await h.models())["a"]["start_count"] == 1


async def test_api_keys_apply_to_the_next_request(tmp_path: Path) -> None:
    start = free_port()
    path = write(tmp_path / "c.yaml", config_text({"m": ""}, start_port=start))
    with trio.fail_after(60):
        async with serving(path) as h:
            write(path, config_text({"m": ""}, start_port=start, extra="apiKeys: [sk-new]"))
            assert (await reload(h))["settings"] == ["apiKeys"]
            response = await h.client.post("/v1/chat/completions", json=chat("m"))
            assert response.status_code == 401
            headers = {"Authorization": "Bearer sk-new"}
            response = await h.client.post("/v1/chat/completions", json=chat("m"), headers=headers)
            assert response.status_code == 200
            # the reload endpoint itself now needs the key
            assert (await h.client.post("/api/config/reload")).status_code == 401
            response = await h.client.post("/api/config/reload", headers=headers)
            assert response.status_code == 200


async def test_peers_added_by_a_reload_route_from_the_next_request(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with running(make_config(responder_model("big", "--tokens", "7"))) as remote:
            start = free_port()
            path = write(tmp_path / "c.yaml", config_text({"m": ""}, start_port=start))
            async with serving(path) as h:
                response = await h.client.post("/v1/chat/completions", json=chat("gpu2/big"))
                assert response.status_code == 404
                peers = f"peers:\n  gpu2:\n    proxy: {remote.server.url}\n    models: [big]"
                write(path, config_text({"m": ""}, start_port=start, extra=peers))
                assert (await reload(h))["settings"] == ["peers"]
                response = await h.client.post("/v1/chat/completions", json=chat("gpu2/big"))
                assert response.status_code == 200, response.text
                assert response.json()["usage"]["completion_tokens"] == 7


async def test_reload_without_a_config_file_is_refused() -> None:
    with trio.fail_after(60):
        async with running(make_config(responder_model("m"))) as h:
            response = await h.client.post("/api/config/reload")
            assert response.status_code == 409
            assert response.json()["error"]["code"] == "no_config_file"
            with pytest.raises(ReloadUnavailable):
                await h.server.reload()
            # a Config given in code still works (embedding trio-swap)
            report = await h.server.reload(make_config(responder_model("m"), responder_model("n")))
            assert report.added == ("n",)


# -- the triggers on a real `trio-swap serve` ----------------------------------------------


@asynccontextmanager
async def trio_swap_serve(
    *args: str,
) -> AsyncIterator[tuple[trio.Process, httpx.AsyncClient, list[str]]]:
    """``trio-swap serve ARGS`` on a free port: (process, a client for it, its output lines)."""
    port = free_port()
    process = await trio.lowlevel.open_process(
        [PYTHON, "-m", "trio_swap", "serve", "--listen", f"127.0.0.1:{port}", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    output: list[str] = []

    async def drain() -> None:  # a full pipe would block trio-swap's logging
        assert process.stdout is not None
        pending = b""
        async for chunk in process.stdout:
            pending += chunk
            *done, pending = pending.split(b"\n")
            output.extend(line.decode(errors="replace") for line in done)

    try:
        async with (
            trio.open_nursery() as nursery,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client,
        ):
            nursery.start_soon(drain)
            while True:
                try:
                    if (await client.get("/health")).status_code == 200:
                        break
                except httpx.TransportError:
                    await trio.sleep(0.05)
            yield process, client, output
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()


async def listed(client: httpx.AsyncClient) -> list[str]:
    return [m["id"] for m in (await client.get("/v1/models")).json()["data"]]


async def pids(client: httpx.AsyncClient) -> dict[str, int | None]:
    return {m["id"]: m["pid"] for m in (await client.get("/api/models")).json()["models"]}


async def test_sighup_reloads_a_running_trio_swap(tmp_path: Path) -> None:
    start = free_port()
    path = write(tmp_path / "c.yaml", config_text({"alpha": ""}, start_port=start))
    with trio.fail_after(60):
        async with trio_swap_serve("--config", str(path)) as (process, client, output):
            assert (await client.post("/v1/chat/completions", json=chat("alpha"))).is_success
            before = await pids(client)
            write(path, config_text({"alpha": "", "beta": ""}, start_port=start))
            process.send_signal(signal.SIGHUP)
            while await listed(client) != ["alpha", "beta"]:
                await trio.sleep(0.05)
            assert (await pids(client))["alpha"] == before["alpha"]
            assert (await client.post("/v1/chat/completions", json=chat("beta"))).is_success
            assert any("config reloaded from" in line and "added: beta" in line for line in output)


async def test_watch_config_reloads_an_edited_file_and_survives_a_broken_one(
    tmp_path: Path,
) -> None:
    start = free_port()
    good = config_text({"alpha": ""}, start_port=start)
    path = write(tmp_path / "c.yaml", good)
    with trio.fail_after(60):
        async with trio_swap_serve("--config", str(path), "--watch-config") as (_, client, output):
            assert (await client.post("/v1/chat/completions", json=chat("alpha"))).is_success
            write(path, good + "  broken: [unclosed\n")
            while not any("config reload failed" in line for line in output):
                await trio.sleep(0.05)
            assert (await client.post("/v1/chat/completions", json=chat("alpha"))).is_success
            write(path, config_text({"alpha": "", "beta": ""}, start_port=start))
            while await listed(client) != ["alpha", "beta"]:
                await trio.sleep(0.05)
            assert (await client.post("/v1/chat/completions", json=chat("beta"))).is_success


def test_watch_config_needs_a_config_file() -> None:
    result = subprocess.run(
        [PYTHON, "-m", "trio_swap", "serve", "--watch-config"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "--watch-config needs --config" in result.stderr


def test_reload_report_is_json() -> None:
    """The API answer is the report itself (checked here without a server)."""
    import msgspec

    from trio_swap.reload import ReloadReport

    old = load_config_text("models:\n  a:\n    cmd: x --port ${PORT}\n", "c.yaml")
    new = load_config_text("models:\n  b:\n    cmd: x --port ${PORT}\n", "c.yaml", previous=old)
    body = json.loads(msgspec.json.encode(ReloadReport.of(diff_configs(old, new), new)))
    assert body["added"] == ["b"] and body["removed"] == ["a"] and body["msg"] == "ok"


# -- random event sequences with reloads in between (pure) --------------------------------

POOL = ("A", "B", "C")


class ReloadMachine(RuleBasedStateMachine):
    """The router's events, reloads included, in any order: every request still ends
    exactly once, no swap cuts a request, nothing is granted on a model the config
    no longer has, and a removed model is retired once it is idle and stopped."""

    def __init__(self) -> None:
        super().__init__()
        self.config: set[str] = set(POOL)
        self.s = FifoScheduler({m: limits() for m in POOL}, OneAtATime(), max_wait=2.0)
        self.now = 0.0
        self.next_id = 1
        self.waiting: dict[int, str] = {}
        self.granted: dict[int, str] = {}
        self.swaps: list[int] = []
        self.stops: dict[int, tuple[str, ...]] = {}

    def stopping(self) -> set[str]:
        return {model for models in self.stops.values() for model in models}

    def apply(self, decisions: list[object]) -> None:
        for decision in decisions:
            match decision:
                case Grant(request_id=rid, model=model):
                    assert self.waiting.pop(rid) == model
                    assert model in self.config, f"granted {model}, which left the config"
                    assert model not in self.stopping(), f"granted {model}, which is stopping"
                    self.granted[rid] = model
                case Reject(request_id=rid):
                    del self.waiting[rid]
                case StartSwap(swap_id=sid, target=target, victims=victims):
                    assert target in self.config
                    assert target not in self.stopping(), "a start would race a stop"
                    for victim in victims:
                        assert self.s.in_flight(victim) == 0, "a swap would cut a request off"
                    self.swaps.append(sid)
                case StopModels(stop_id=stop_id, models=models):
                    self.stops[stop_id] = models
                case Retire(model=model):
                    assert model not in self.config
                    assert model not in self.granted.values()
                    assert model not in self.waiting.values()

    @rule(model=st.sampled_from(POOL))
    def request(self, model: str) -> None:
        rid, self.next_id = self.next_id, self.next_id + 1
        self.waiting[rid] = model
        self.apply(self.s.on_request(rid, model, self.now))

    @rule(pick=st.integers(0, 50))
    def finish(self, pick: int) -> None:
        pool = sorted(self.granted | self.waiting)
        if pool:
            rid = pool[pick % len(pool)]
            self.granted.pop(rid, None)
            self.waiting.pop(rid, None)
            self.apply(self.s.on_finished(rid, self.now))

    @rule(pick=st.integers(0, 10), ok=st.booleans())
    def swap_done(self, pick: int, ok: bool) -> None:
        if self.swaps:
            sid = self.swaps.pop(pick % len(self.swaps))
            self.apply(self.s.on_swap_done(sid, None if ok else ModelNotFound("?"), self.now))

    @rule(pick=st.integers(0, 10))
    def stops_done(self, pick: int) -> None:
        if self.stops:
            stop_id = sorted(self.stops)[pick % len(self.stops)]
            del self.stops[stop_id]
            self.apply(self.s.on_stops_done(stop_id, self.now))

    @rule(model=st.sampled_from(POOL))
    def crash(self, model: str) -> None:
        self.apply(self.s.on_model_stopped(model, self.now))

    @rule(seconds=st.sampled_from([0.25, 3.0]))
    def tick(self, seconds: float) -> None:
        self.now += seconds
        self.apply(self.s.on_tick(self.now))

    @rule(
        models=st.sets(st.sampled_from(POOL)),
        restart=st.sets(st.sampled_from(POOL)),
        together=st.booleans(),
    )
    def reload(self, models: set[str], restart: set[str], together: bool) -> None:
        from trio_swap.config.model import GroupConfig
        from trio_swap.policy import GroupsPolicy, SwapPolicy

        policy: SwapPolicy = OneAtATime()
        if together:
            group = GroupConfig(name="g", swap=False, members=tuple(sorted(models)))
            policy = GroupsPolicy([group], sorted(models))
        self.config = models
        self.apply(
            self.s.on_reconfigure(
                {m: limits() for m in models}, policy, restart=restart, now=self.now
            )
        )

    @invariant()
    def bookkeeping_holds(self) -> None:
        s = self.s
        known = s.models()
        assert self.config <= set(known)
        assert sum(s.in_flight(m) for m in known) == len(self.granted)
        assert s.pending_requests() == len(self.granted) + len(self.waiting)

    def teardown(self) -> None:
        s = self.s
        while self.swaps or self.stops or self.granted or self.waiting:
            if self.swaps:
                self.apply(s.on_swap_done(self.swaps.pop(0), None, self.now))
            elif self.stops:
                self.stops_done(0)
            else:
                self.finish(0)
        for model in s.models():
            if model not in self.config and s.phase(model) is Phase.READY:
                raise AssertionError(f"{model} left the config but still runs idle")
        # stopping every idle model leaves no removed model behind
        self.apply(s.on_unload(s.models(), self.now))
        while self.stops or self.swaps:
            if self.swaps:
                self.apply(s.on_swap_done(self.swaps.pop(0), None, self.now))
            else:
                self.stops_done(0)
        assert set(s.models()) == self.config
        assert s.pending_requests() == 0


ReloadMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)
test_reload_state_machine = ReloadMachine.TestCase


# -- review fixes: loads cancelled during a swap, retired supervisors, ports, pins ------


def with_keys(text: str, model: str, keys: str) -> str:
    """``text`` with extra YAML ``keys`` (one ``key: value`` a line) under ``model``."""
    extra = "".join(f"    {line}\n" for line in keys.splitlines())
    return text.replace(f"  {model}:\n", f"  {model}:\n{extra}")


async def test_a_load_cancelled_by_a_reload_while_its_victim_stops_never_starts(
    tmp_path: Path,
) -> None:
    """x's swap first stops v (slowly: it ignores SIGTERM); a reload removes x
    meanwhile. x must not be started once v is gone (nobody would track it)."""
    from trio_swap.upstream import ProcessState

    start = free_port()
    text = with_keys(
        config_text({"v": "--ignore-sigterm", "x": ""}, start_port=start), "v", "unloadTimeout: 3"
    )
    path = write(tmp_path / "c.yaml", text)
    with trio.fail_after(60):
        async with serving(path) as h:
            assert served_by(await h.client.post("/v1/chat/completions", json=chat("v")))
            x = h.server.processes["x"]
            v = h.server.processes["v"]
            answers: list[httpx.Response] = []

            async def ask_x() -> None:
                answers.append(await h.client.post("/v1/chat/completions", json=chat("x")))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(ask_x)
                while v.state is not ProcessState.STOPPING:  # the swap evicts v
                    await trio.sleep(0.02)
                write(
                    path,
                    with_keys(
                        config_text({"v": "--ignore-sigterm"}, start_port=start),
                        "v",
                        "unloadTimeout: 3",
                    ),
                )
                assert (await reload(h))["removed"] == ["x"]
            [answer] = answers
            assert answer.status_code == 404
            # v loads again once the swap is over: x must not have started meanwhile
            assert served_by(await h.client.post("/v1/chat/completions", json=chat("v")))
            assert x.start_count == 0 and x.pid is None
            while "x" in h.server.processes:
                await trio.sleep(0.02)


async def test_closing_a_supervisor_stops_its_running_process() -> None:
    """A retired model's supervisor never leaves its process behind."""
    from tests.conftest import responder_model
    from trio_swap.upstream import ProcessState

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            process = ModelProcess(responder_model("m"), health_check_timeout=20)
            await nursery.start(process.run)
            await process.ensure_ready()
            pid = process.pid
            assert alive(pid)
            process.close()
        # the nursery is over: run() returned, and only after the process was gone
        assert not alive(pid)
        assert process.state is ProcessState.STOPPED


def test_fifo_a_removed_pinned_model_delays_other_loads_instead_of_refusing_them() -> None:
    pinned = ModelLimits(concurrency_limit=10, ttl=0, swappable=False)
    scheduler = FifoScheduler({"a": pinned, "b": limits()}, OneAtATime())
    [start] = scheduler.on_request(1, "a", 0)
    assert isinstance(start, StartSwap)
    assert scheduler.on_swap_done(start.swap_id, None, 0) == [Grant(request_id=1, model="a")]
    assert scheduler.on_reconfigure({"b": limits()}, OneAtATime(), now=1) == []
    # a is gone: no "unload a" 409; b waits for a's last request, then replaces it
    assert scheduler.on_request(2, "b", 1) == [Queued(request_id=2, model="b", position=1)]
    stop, swap = scheduler.on_finished(1, 2)
    assert stop == StopModels(stop_id=1, models=("a",), reason="reload")
    assert swap == StartSwap(swap_id=2, target="b", victims=("a",))


async def test_a_reload_whose_caller_is_cancelled_still_reports_success() -> None:
    """The router applies a reload whether or not its caller still waits: systemd
    must hear "reloaded", not "failed"."""
    from trio_swap.systemd import Notifier

    class Recorder(Notifier):
        def __init__(self, scope: trio.CancelScope) -> None:
            super().__init__(None)
            self.scope = scope
            self.statuses: list[str | None] = []

        def reloading(self, status: str = "") -> None:
            self.scope.cancel()  # the caller goes away once the reload is under way

        def ready(self, status: str | None = None) -> None:
            self.statuses.append(status)

    with trio.fail_after(60):
        m = responder_model("m")
        async with running(make_config(m)) as h:
            reloader = h.server._reloader
            assert reloader is not None
            with trio.CancelScope() as scope:
                reloader._notifier = Recorder(scope)
                await h.server.reload(make_config(m, responder_model("n")))
            assert scope.cancel_called
            assert isinstance(reloader._notifier, Recorder)
            assert reloader._notifier.statuses == ["config reloaded (added: n; unchanged: 1)"]
            assert "n" in h.server.processes


def test_a_port_still_held_by_a_running_process_goes_to_no_other_model() -> None:
    text = "startPort: 7000\nmodels:\n" + "".join(
        f"  {m}:\n    cmd: serve --port ${{PORT}}\n" for m in ("a", "b")
    )
    before = load_config_text(text, "c.yaml")
    assert before.ports == {"a": 7000, "b": 7001}
    # a is removed while it still streams on 7000; a model added meanwhile skips it
    added = text.replace("  a:\n", "  c:\n")
    after = load_config_text(added, "c.yaml", previous=before, ports_in_use={7000: "a"})
    assert after.ports == {"b": 7001, "c": 7002}
    # a new startPort numbers afresh, but around the ports still held by others
    moved = load_config_text(
        text.replace("7000", "6999"), "c.yaml", previous=before, ports_in_use={7000: "a"}
    )
    assert moved.ports == {"a": 6999, "b": 7001}


async def test_a_reload_never_points_a_model_at_a_port_another_model_still_serves(
    tmp_path: Path,
) -> None:
    """a streams; a reload moves startPort down by one, so llama-swap-style
    numbering would give b a's old port while a's old process still listens there."""
    start = free_port()
    long = "--tokens 400 --token-delay 0.05"
    group = "groups:\n  both:\n    swap: false\n    members: [a, b]\n"
    path = write(
        tmp_path / "c.yaml", config_text({"a": long, "b": ""}, start_port=start, extra=group)
    )
    with trio.fail_after(60):
        async with serving(path) as h:
            lines: list[str] = []
            first_token = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, h, "a", lines, first_token)
                await first_token.wait()
                a_pid = h.pid("a")
                write(path, config_text({"a": long, "b": ""}, start_port=start - 1, extra=group))
                await reload(h)
                response = await h.client.post("/v1/chat/completions", json=chat("b"))
                assert served_by(response) == h.pid("b") != a_pid
                ports = {m: row["port"] for m, row in (await h.models()).items()}
                assert ports["b"] != start  # a's old process still listens there
                nursery.cancel_scope.cancel()


def test_fifo_a_reload_that_undoes_a_change_keeps_the_running_process() -> None:
    scheduler = loaded("a", "b")
    models = {"a": limits(), "b": limits()}
    assert scheduler.on_reconfigure(models, OneAtATime(), restart={"a"}, now=1) == []
    assert scheduler.on_request(2, "a", 1) == [Queued(request_id=2, model="a", position=1)]
    # the second reload puts back what the process runs: it is current again, the
    # waiting request is served by it, and nothing is stopped when the stream ends
    decisions = scheduler.on_reconfigure(models, OneAtATime(), restart=frozenset(), now=2)
    assert decisions == [Grant(request_id=2, model="a")]
    assert scheduler.on_finished(1, 3) == []
    assert scheduler.on_request(3, "a", 4) == [Grant(request_id=3, model="a")]


async def test_a_reload_that_undoes_a_change_keeps_the_running_process(tmp_path: Path) -> None:
    start = free_port()
    original = config_text({"m": "--tokens 30 --token-delay 0.05"}, start_port=start)
    path = write(tmp_path / "c.yaml", original)
    with trio.fail_after(60):
        async with serving(path) as h:
            lines: list[str] = []
            first_token = trio.Event()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stream, h, "m", lines, first_token)
                await first_token.wait()
                pid = h.pid("m")
                write(path, original.replace("--tokens 30", "--tokens 31"))
                assert (await reload(h))["restart"] == ["m"]
                write(path, original)  # changed my mind before the stream ended
                await reload(h)
            assert content_tokens(lines) == 30
            # the process the file describes again is still the one running
            assert served_by(await h.client.post("/v1/chat/completions", json=chat("m"))) == pid
            assert h.server.processes["m"].start_count == 1


async def test_a_reloader_switches_the_http_layer_through_its_callback_only_when_the_file_loads(
    tmp_path: Path,
) -> None:
    """reload.py knows nothing of HTTP: the server hands the Reloader a callback for
    its part. It runs once per reload that loads, with the new config, before
    reload() returns; a file that does not load switches nothing."""
    path = write(tmp_path / "c.yaml", "models: {}\n")
    first = load_config(path)
    switched: list[Config] = []

    def spawn(model: ModelConfig, health_check_timeout: float) -> ModelProcess:
        raise AssertionError(f"no model to start, yet asked for {model.id}")

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            router = Router({}, build_policy(first), first.routing.scheduler)
            await nursery.start(router.run)
            reloader = Reloader(
                first, path=path, router=router, switch_config=switched.append, spawn=spawn
            )
            write(path, "models: {}\napiKeys: [unclosed\n")
            with pytest.raises(ConfigError):
                await reloader.reload()
            assert switched == []
            assert reloader.config is first

            write(path, 'apiKeys: ["sk-new"]\nmodels: {}\n')
            report = await reloader.reload()
            assert report.settings == ("apiKeys",)
            assert [config.api_keys for config in switched] == [("sk-new",)]
            assert reloader.config is switched[0]
            nursery.cancel_scope.cancel()
