"""``/livez`` and ``/readyz``: the answers an orchestrator's probes get (docs/api.md).

Liveness follows the systemd watchdog's ticks: a router that stops taking
events is found with the router-block hook of ``tests/test_systemd.py``
(``_Gate``: the router's channel, closed). Readiness ends the moment a
shutdown begins.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path

import httpx
import msgspec
import pytest
import trio
import trio.testing

from tests.conftest import chat, free_port, make_config, responder_model, running, wait_for
from tests.test_systemd import _Gate, fake_systemd
from trio_swap.config.model import Config
from trio_swap.http.probes import Probes
from trio_swap.policy import build_policy
from trio_swap.router import Router
from trio_swap.server import RunningServer, serve
from trio_swap.systemd import Notifier, Watchdog

KEYS = ("sk-probe-test",)


def _wedge(server: RunningServer, monkeypatch: pytest.MonkeyPatch) -> _Gate:
    """The router-block hook: the router's channel behind a gate (open until closed)."""
    router = server.router
    gate = _Gate(router._receive)
    monkeypatch.setattr(router, "_receive", gate)
    return gate


# -- normally ----------------------------------------------------------------------


async def test_both_probes_answer_200_normally_and_differ_from_health() -> None:
    with trio.fail_after(30):
        async with running(make_config(responder_model("alpha"))) as h:
            for path in ("/livez", "/readyz"):
                response = await h.client.get(path)
                assert response.status_code == 200, path
                assert response.json() == {"status": "ok"}
                assert response.headers["content-type"] == "application/json"
                assert response.headers["cache-control"] == "no-store"
                assert (await h.client.head(path)).status_code == 200
            health = await h.client.get("/health")
            assert (health.status_code, health.text) == (200, "OK")


async def test_both_probes_need_no_key_when_api_keys_are_set() -> None:
    config = msgspec.structs.replace(make_config(responder_model("alpha")), api_keys=KEYS)
    with trio.fail_after(30):
        async with running(config) as h:
            assert (await h.client.get("/api/models")).status_code == 401  # keys are on
            for path in ("/livez", "/readyz"):
                response = await h.client.get(path)
                assert response.status_code == 200, path
                assert response.json() == {"status": "ok"}


@asynccontextmanager
async def _listening_on(config: Config, host: str) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        server: RunningServer = await nursery.start(
            partial(serve, config, host=host, port=0, handle_signals=False, shutdown_timeout=2)
        )
        try:
            yield int(server.url.rsplit(":", 1)[1])
        finally:
            server.stop()


async def test_a_kubelet_probe_host_header_is_answered_when_listening_on_every_interface() -> None:
    # The kubelet's httpGet probe sends `Host: <pod IP>:<port>`: an address literal,
    # which the DNS-rebinding check allows when trio-swap listens on 0.0.0.0.
    with trio.fail_after(30):
        async with (
            _listening_on(make_config(), "0.0.0.0") as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        ):
            for path in ("/livez", "/readyz"):
                response = await client.get(path, headers={"Host": f"10.244.3.17:{port}"})
                assert response.status_code == 200, path
            # A name the config does not list is still refused (docs/kubernetes.md:
            # the ConfigMap lists the Service's names in allowedHosts).
            named = await client.get("/readyz", headers={"Host": f"trio-swap.example:{port}"})
            assert named.status_code == 403


async def test_on_a_specific_address_another_address_in_host_is_refused() -> None:
    # Why the manifests listen on 0.0.0.0: on 127.0.0.1 the pod IP is not a valid Host.
    with trio.fail_after(30):
        async with (
            _listening_on(make_config(), "127.0.0.1") as port,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client,
        ):
            response = await client.get("/livez", headers={"Host": f"10.244.3.17:{port}"})
            assert response.status_code == 403


# -- liveness ----------------------------------------------------------------------


async def test_livez_turns_503_while_the_router_is_wedged_and_200_once_it_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with trio.fail_after(30):
        async with running(make_config(), liveness_timeout=0.2) as h:
            assert (await h.client.get("/livez")).status_code == 200
            gate = _wedge(h.server, monkeypatch)
            gate.close()
            await gate.stuck.wait()  # the router took an event and is stuck on it

            async def wedged() -> httpx.Response | None:
                response = await h.client.get("/livez")
                return response if response.status_code == 503 else None

            response = await wait_for(wedged, what="/livez to say 503")
            body = response.json()
            assert body["status"] == "wedged"
            assert body["bound_seconds"] == pytest.approx(0.2)
            assert body["router_silent_seconds"] > body["bound_seconds"]
            # The instance still takes requests (they queue): readiness is not liveness.
            assert (await h.client.get("/readyz")).status_code == 200

            gate.open()

            async def alive() -> bool:
                return (await h.client.get("/livez")).status_code == 200

            await wait_for(alive, what="/livez to recover")


async def test_liveness_fails_within_the_watchdog_period_of_the_router_wedging(
    autojump_clock: trio.testing.MockClock,
) -> None:
    # Virtual time (no wall-clock threshold): from the moment the router is stuck,
    # liveness fails no later than one bound (WatchdogSec: two tick intervals).
    interval = 5.0
    watchdog = Watchdog(Notifier(None), interval=interval)
    router = Router({}, build_policy(make_config()), on_tick=watchdog.on_tick)
    gate = _Gate(router._receive)
    router._receive = gate  # type: ignore[assignment]
    probes = Probes(watchdog, trio.Event())
    async with trio.open_nursery() as nursery:
        await nursery.start(router.run)
        nursery.start_soon(watchdog.run, router.tick)
        while watchdog.last_handled is None:
            await trio.sleep(0.01)
        for _ in range(10):  # healthy for many bounds: never a false alarm
            assert probes.liveness()[0] == 200
            await trio.sleep(interval / 3)
        gate.close()
        await gate.stuck.wait()
        stuck_at = trio.current_time()
        while probes.liveness()[0] == 200:
            await trio.sleep(0.01)
        assert trio.current_time() - stuck_at <= 2 * interval
        gate.open()
        nursery.cancel_scope.cancel()


def test_under_systemd_the_bound_is_watchdog_sec() -> None:
    environment = {"NOTIFY_SOCKET": "@ts-test-nowhere", "WATCHDOG_USEC": "25000000"}
    notifier = Notifier.from_environment(environment)
    try:
        watchdog = Watchdog(notifier, interval=15.0)  # systemd's interval wins
        assert (watchdog.interval, watchdog.bound) == (12.5, 25.0)
    finally:
        notifier.close()
    assert Watchdog(Notifier(None), interval=15.0).bound == 30.0
    assert Watchdog(Notifier(None)).bound is None


# -- readiness ---------------------------------------------------------------------


async def test_readyz_is_503_from_the_moment_shutdown_begins(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The shutdown's first step asks the router to stop admitting; with the router
    # held (the hook), the listener stays open, so the 503 itself can be read.
    with trio.fail_after(30):
        async with running(make_config(), liveness_timeout=0.2) as h:  # ticks come often
            assert (await h.client.get("/readyz")).status_code == 200
            gate = _wedge(h.server, monkeypatch)
            gate.close()
            await gate.stuck.wait()
            h.server.stop()
            response = await h.client.get("/readyz")
            assert response.status_code == 503
            assert response.json()["status"] == "stopping"
            assert (await h.client.get("/health")).status_code == 200
            gate.open()


def _slow_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""\
healthCheckTimeout: 30
startPort: {free_port()}
logToStdout: none
models:
  slow:
    cmd: >-
      {sys.executable} -m trio_swap responder
      --port ${{PORT}} --model ${{MODEL_ID}} --token-delay 0.1
"""
    )
    return path


async def test_after_sigterm_readyz_never_says_ready_while_a_stream_drains(
    tmp_path: Path,
) -> None:
    port = free_port()
    argv = [sys.executable, "-m", "trio_swap", "serve", "--config", str(_slow_config(tmp_path))]
    argv += ["--listen", f"127.0.0.1:{port}", "--shutdown-timeout", "20"]
    url = f"http://127.0.0.1:{port}"
    with fake_systemd() as systemd, trio.fail_after(60):
        env = {**os.environ, "NOTIFY_SOCKET": systemd.notify_socket}
        with (tmp_path / "serve.log").open("wb") as log:
            process = await trio.lowlevel.open_process(
                argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            await systemd.wait_for("READY", "1")
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                assert (await client.get("/readyz")).status_code == 200
                body = chat("slow", stream=True, max_tokens=15)  # 1.5 s of tokens
                async with client.stream("POST", "/v1/chat/completions", json=body) as stream:
                    lines = stream.aiter_lines()
                    assert (await anext(lines)).startswith("data: ")  # under way
                    process.send_signal(signal.SIGTERM)
                    await systemd.wait_for("STOPPING", "1")  # the shutdown has begun
                    answers: set[int | str] = set()
                    for _ in range(5):
                        try:
                            async with httpx.AsyncClient(timeout=5) as probe:
                                answers.add((await probe.get(url + "/readyz")).status_code)
                        except httpx.ConnectError:
                            answers.add("refused")  # the listener is closed: a failure too
                    assert answers <= {503, "refused"}, answers
                    rest = [line async for line in lines]
                    assert rest[-2:] == ["data: [DONE]", ""] or "data: [DONE]" in rest
            assert await process.wait() == 0
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await process.wait()
            print((tmp_path / "serve.log").read_text())
