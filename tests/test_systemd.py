"""What systemd hears from trio-swap: the test plays systemd's end of $NOTIFY_SOCKET.

Most tests run the real ``trio-swap serve`` command with ``NOTIFY_SOCKET``
(and ``WATCHDOG_USEC``) in its environment, as systemd would start it, and
read the datagrams it sends.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import chat, free_port, make_config
from trio_swap.policy import build_policy
from trio_swap.router import Router
from trio_swap.systemd import Notifier, Watchdog, status_line
from trio_swap.upstream.process import ProcessState

# -- systemd's end -----------------------------------------------------------------


class FakeSystemd:
    """A datagram socket where sd_notify messages arrive, parsed into ``KEY: VALUE`` dicts."""

    def __init__(self, sock: socket.socket, notify_socket: str) -> None:
        sock.setblocking(False)
        self._sock = sock
        self._trio_sock = trio.socket.from_stdlib_socket(sock)
        #: What to put in NOTIFY_SOCKET (a path, or ``@name`` for an abstract socket).
        self.notify_socket = notify_socket
        self.received: list[dict[str, str]] = []

    async def receive(self) -> dict[str, str]:
        message = _parse(await self._trio_sock.recv(65536))
        self.received.append(message)
        return message

    async def wait_for(self, key: str, contains: str = "") -> dict[str, str]:
        """The next message that sets ``key`` (to a value containing ``contains``)."""
        while True:
            message = await self.receive()
            if key in message and contains in message[key]:
                return message

    def drain(self) -> list[dict[str, str]]:
        """Every message already queued, without waiting."""
        drained = []
        while True:
            try:
                drained.append(_parse(self._sock.recv(65536)))
            except BlockingIOError:
                return drained


def _parse(datagram: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in datagram.decode().splitlines())


@contextmanager
def fake_systemd(*, abstract: bool = False) -> Iterator[FakeSystemd]:
    # A short directory: AF_UNIX paths are limited to 107 bytes, pytest's tmp_path can be longer.
    with (
        tempfile.TemporaryDirectory(prefix="ts-notify-") as directory,
        socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock,
    ):
        if abstract:
            name = f"trio-swap-test-{uuid.uuid4().hex}"
            sock.bind("\0" + name)
            yield FakeSystemd(sock, "@" + name)
        else:
            path = os.path.join(directory, "notify")
            sock.bind(path)
            yield FakeSystemd(sock, path)


# -- trio-swap under "systemd" ------------------------------------------------------


def write_config(tmp_path: Path) -> Path:
    python = sys.executable
    path = tmp_path / "config.yaml"
    path.write_text(
        f"""\
healthCheckTimeout: 30
startPort: {free_port()}
models:
  alpha:
    cmd: {python} -m trio_swap responder --port ${{PORT}} --model ${{MODEL_ID}}
    env:
      - TRIO_SWAP_TEST_MARKER=alpha
"""
    )
    return path


@dataclass
class Service:
    process: trio.Process
    url: str


@asynccontextmanager
async def under_systemd(tmp_path: Path, systemd: FakeSystemd, **env: str) -> AsyncIterator[Service]:
    """``trio-swap serve`` started the way systemd starts it.

    ``WATCHDOG_PID`` is set to the service's own pid, as systemd does, by a shell
    that execs trio-swap (so the pid stays the same).
    """
    port = free_port()
    config = write_config(tmp_path)
    argv = [sys.executable, "-m", "trio_swap", "serve", "--config", str(config)]
    argv += ["--listen", f"127.0.0.1:{port}"]
    environment = {**os.environ, "NOTIFY_SOCKET": systemd.notify_socket, **env}
    environment.pop("WATCHDOG_PID", None)
    shell = 'if [ -n "$WATCHDOG_USEC" ]; then export WATCHDOG_PID=$$; fi; exec "$@"'
    with (tmp_path / "trio-swap.log").open("wb") as output:
        process = await trio.lowlevel.open_process(
            ["/bin/sh", "-c", shell, "sh", *argv],
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield Service(process, f"http://127.0.0.1:{port}")
    finally:
        if process.returncode is None:
            os.killpg(process.pid, signal.SIGKILL)
        with trio.CancelScope(shield=True):
            await process.wait()
        print((tmp_path / "trio-swap.log").read_text())  # pytest shows it if the test failed


# -- the service as systemd sees it -------------------------------------------------


async def test_ready_is_sent_once_the_port_accepts_http(tmp_path: Path) -> None:
    with fake_systemd() as systemd, trio.fail_after(60):
        async with under_systemd(tmp_path, systemd) as service:
            ready = await systemd.wait_for("READY", "1")
            # No retry: by the time systemd hears READY=1, requests are served.
            async with httpx.AsyncClient() as client:
                assert (await client.get(service.url + "/health")).status_code == 200
            port = service.url.rsplit(":", 1)[1]
            assert ready["STATUS"] == f"serving on 127.0.0.1:{port}; no model running"
            assert not any("READY" in message for message in systemd.received[:-1])


async def test_status_names_a_model_once_a_request_loads_it(tmp_path: Path) -> None:
    with fake_systemd() as systemd, trio.fail_after(60):
        async with under_systemd(tmp_path, systemd) as service:
            await systemd.wait_for("READY", "1")
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
                response = await client.post("/v1/chat/completions", json=chat("alpha"))
                assert response.status_code == 200
            status = await systemd.wait_for("STATUS", "alpha (ready)")
            assert status["STATUS"].startswith("serving on 127.0.0.1:")


async def test_watchdog_pings_keep_coming(tmp_path: Path) -> None:
    with fake_systemd() as systemd, trio.fail_after(60):
        async with under_systemd(tmp_path, systemd, WATCHDOG_USEC="200000"):
            await systemd.wait_for("READY", "1")
            for _ in range(5):
                await systemd.wait_for("WATCHDOG", "1")


async def test_sigterm_sends_stopping_then_exits_zero(tmp_path: Path) -> None:
    with fake_systemd() as systemd, trio.fail_after(60):
        async with under_systemd(tmp_path, systemd) as service:
            await systemd.wait_for("READY", "1")
            service.process.send_signal(signal.SIGTERM)
            stopping = await systemd.wait_for("STOPPING", "1")
            assert stopping["STATUS"].startswith("shutting down")
            assert await service.process.wait() == 0


async def test_sighup_reload_is_bracketed_by_reloading_and_ready(tmp_path: Path) -> None:
    with fake_systemd() as systemd, trio.fail_after(60):
        async with under_systemd(tmp_path, systemd) as service:
            await systemd.wait_for("READY", "1")
            service.process.send_signal(signal.SIGHUP)  # what ExecReload= does
            reloading = await systemd.wait_for("RELOADING", "1")
            assert int(reloading["MONOTONIC_USEC"]) > 0
            ready = await systemd.wait_for("READY", "1")
            assert ready["STATUS"].startswith("config reloaded")
            service.process.send_signal(signal.SIGTERM)
            assert await service.process.wait() == 0


async def test_an_abstract_notify_socket_works(tmp_path: Path) -> None:
    with fake_systemd(abstract=True) as systemd, trio.fail_after(60):
        assert systemd.notify_socket.startswith("@")
        async with under_systemd(tmp_path, systemd) as service:
            await systemd.wait_for("READY", "1")
            async with httpx.AsyncClient() as client:
                assert (await client.get(service.url + "/health")).status_code == 200


async def test_model_processes_cannot_talk_to_systemd_in_our_name(tmp_path: Path) -> None:
    with fake_systemd() as systemd, trio.fail_after(60):
        async with under_systemd(tmp_path, systemd, WATCHDOG_USEC="30000000") as service:
            await systemd.wait_for("READY", "1")
            async with httpx.AsyncClient(base_url=service.url, timeout=30) as client:
                response = await client.get("/upstream/alpha/debug/pid")
                assert response.status_code == 200
                pid = response.json()["pid"]
            names = environment_names(pid)
            assert "TRIO_SWAP_TEST_MARKER" in names  # the model server's environment indeed
            assert not names & {"NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"}


def environment_names(pid: int) -> set[str]:
    with open(f"/proc/{pid}/environ", "rb") as environ:
        return {entry.split(b"=", 1)[0].decode() for entry in environ.read().split(b"\0") if entry}


# -- the watchdog is fed by the router task --------------------------------------------


class _Gate:
    """Stands in for the router's channel: while closed, the router stays stuck on an event."""

    def __init__(self, channel: trio.MemoryReceiveChannel[object]) -> None:
        self._channel = channel
        self._open = trio.Event()
        self._open.set()
        self.stuck = trio.Event()

    def close(self) -> None:
        self._open = trio.Event()
        self.stuck = trio.Event()

    def open(self) -> None:
        self._open.set()

    async def receive(self) -> object:
        event = await self._channel.receive()
        if not self._open.is_set():
            self.stuck.set()
            await self._open.wait()
        return event

    def receive_nowait(self) -> object:
        return self._channel.receive_nowait()


async def test_a_wedged_router_stops_the_watchdog_pings_until_it_recovers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with fake_systemd() as systemd, trio.fail_after(30):
        notifier = Notifier(systemd.notify_socket, watchdog_interval=0.02)
        watchdog = Watchdog(notifier)
        router = Router({}, build_policy(make_config()), on_tick=watchdog.on_tick)
        gate = _Gate(router._receive)  # type: ignore[arg-type]
        monkeypatch.setattr(router, "_receive", gate)
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(router.run)
                nursery.start_soon(watchdog.run, router.tick)
                await systemd.wait_for("WATCHDOG", "1")  # healthy: pings arrive

                gate.close()
                await gate.stuck.wait()  # the router took a tick and is stuck on it
                systemd.drain()  # pings sent before it got stuck
                while watchdog.missed < 3:  # several intervals pass without an answer
                    await trio.sleep(0.01)
                assert systemd.drain() == []

                gate.open()
                await systemd.wait_for("WATCHDOG", "1")  # pings resume
                while watchdog.missed:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        finally:
            notifier.close()


# -- the notifier on its own ----------------------------------------------------------


def test_without_notify_socket_the_notifier_is_a_no_op() -> None:
    notifier = Notifier.from_environment({"WATCHDOG_USEC": "200000"})
    assert not notifier.enabled
    assert notifier.watchdog_interval is None
    notifier.ready("ready")
    notifier.status("status")
    notifier.reloading()
    notifier.stopping()
    notifier.watchdog()
    assert notifier.send("READY=1") is False
    notifier.close()


def test_a_missing_or_refusing_socket_never_raises(tmp_path: Path) -> None:
    for address in (str(tmp_path / "absent"), "@trio-swap-test-nobody-" + uuid.uuid4().hex):
        notifier = Notifier.from_environment({"NOTIFY_SOCKET": address})
        assert notifier.enabled
        assert notifier.send("READY=1") is False
        notifier.ready("ready")
        notifier.watchdog()
        notifier.close()


def test_the_watchdog_is_only_ours_when_watchdog_pid_is_our_pid() -> None:
    base = {"NOTIFY_SOCKET": "@trio-swap-test", "WATCHDOG_USEC": "30000000"}
    cases = [
        ({}, 15.0),
        ({"WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_PID": "1"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
    ]
    for extra, interval in cases:
        notifier = Notifier.from_environment({**base, **extra})
        assert notifier.watchdog_interval == interval, extra
        notifier.close()


async def test_reloading_then_ready_and_status_only_when_it_changes() -> None:
    with fake_systemd() as systemd, trio.fail_after(10):
        notifier = Notifier(systemd.notify_socket)
        try:
            before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            notifier.reloading()
            reloading = await systemd.receive()
            assert reloading["RELOADING"] == "1"
            assert before <= int(reloading["MONOTONIC_USEC"])
            assert (
                int(reloading["MONOTONIC_USEC"])
                <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
            )
            notifier.ready("serving")
            assert await systemd.receive() == {"READY": "1", "STATUS": "serving"}

            notifier.status("serving")  # unchanged: nothing sent
            notifier.status("serving; running: a (ready)")
            assert await systemd.receive() == {"STATUS": "serving; running: a (ready)"}
            assert systemd.drain() == []
        finally:
            notifier.close()


def test_status_line_names_where_it_listens_and_every_model_not_stopped() -> None:
    binds = ["http://127.0.0.1:8080", "http://[::1]:8080"]
    states = {
        "qwen": ProcessState.READY,
        "idle": ProcessState.STOPPED,
        "coder": ProcessState.STARTING,
    }
    assert status_line(binds, states, stopping=False) == (
        "serving on 127.0.0.1:8080, [::1]:8080; running: qwen (ready), coder (starting)"
    )
    assert status_line(binds, states, stopping=True) == (
        "shutting down; running: qwen (ready), coder (starting)"
    )
    assert status_line(binds, {"idle": ProcessState.STOPPED}, stopping=False) == (
        "serving on 127.0.0.1:8080, [::1]:8080; no model running"
    )
