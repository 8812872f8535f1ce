"""One model's process supervisor on its own: groups, stop escalation, racing messages."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from tests.conftest import alive, free_port, group_alive, responder_model
from trio_swap.config.model import ModelConfig
from trio_swap.reasons import StopReason
from trio_swap.upstream import ModelProcess, ProcessState


@asynccontextmanager
async def supervised(model: ModelConfig, timeout: float = 20) -> AsyncIterator[ModelProcess]:
    async with trio.open_nursery() as nursery:
        process = ModelProcess(model, health_check_timeout=timeout)
        await nursery.start(process.run)
        try:
            yield process
        finally:
            nursery.cancel_scope.cancel()


async def until(condition: Callable[[], bool]) -> None:
    """Poll ``condition`` (the caller bounds the wait with ``fail_after``)."""
    while not condition():
        await trio.sleep(0.005)


async def test_child_leads_its_own_process_group() -> None:
    with trio.fail_after(20):
        async with supervised(responder_model("A")) as process:
            await process.ensure_ready()
            assert process.pid is not None
            assert os.getpgid(process.pid) == process.pid
            assert os.getpgid(process.pid) != os.getpgrp()


async def test_stop_kills_grandchildren_left_in_the_group(tmp_path: Path) -> None:
    """A wrapper script's helpers die with it: the whole group is signalled."""
    port = free_port()
    pidfile = tmp_path / "sleeper.pid"
    responder = f"{sys.executable} -m trio_swap responder --port {port}"
    model = ModelConfig(
        id="wrapped",
        cmd=("sh", "-c", f"sleep 1000 & echo $! > {pidfile}; exec {responder}"),
        proxy=f"http://127.0.0.1:{port}",
        unload_timeout=2,
    )
    with trio.fail_after(20):
        async with supervised(model) as process:
            await process.ensure_ready()
            sleeper = int(pidfile.read_text())
            assert alive(sleeper)
            await process.stop()
            assert process.state is ProcessState.STOPPED
            assert not alive(sleeper)


async def test_cancelling_the_supervisor_stops_the_group() -> None:
    with trio.fail_after(20):
        async with supervised(responder_model("A")) as process:
            await process.ensure_ready()
            pgid = process.pid
            assert pgid is not None
        assert not group_alive(pgid)


async def test_ensure_ready_during_a_stop_restarts_after_the_old_process_is_gone() -> None:
    """Invariant 2: the process decides from its own state when messages race.

    A stop (say a TTL expiry) and a request's ensure_ready arrive together:
    the stop completes, then a fresh process starts, and nobody hangs.
    """
    with trio.fail_after(20):
        async with supervised(responder_model("A", "--ignore-sigterm", unload_timeout=0.3)) as p:
            await p.ensure_ready()
            first_pid = p.pid
            async with trio.open_nursery() as nursery:
                nursery.start_soon(p.stop)
                # the stop is under way (SIGTERM ignored: the grace period runs)
                await until(lambda: p.state is ProcessState.STOPPING)
                nursery.start_soon(p.ensure_ready)
            assert p.state is ProcessState.READY
            assert p.start_count == 2
            assert p.pid != first_pid
            assert not alive(first_pid)


async def test_stop_while_starting_aborts_the_start_with_a_clear_error() -> None:
    with trio.fail_after(20):
        async with supervised(responder_model("A", "--load-delay", "5")) as process:
            errors: list[str] = []

            async def want_ready() -> None:
                try:
                    await process.ensure_ready()
                except Exception as exc:
                    errors.append(str(exc))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(want_ready)
                await until(lambda: process.child is not None)  # spawned, loading for 5 s
                assert process.state is ProcessState.STARTING
                await process.stop(reason=StopReason.UNLOAD)
            assert process.state is ProcessState.STOPPED
            assert errors and "stopped while starting (unload)" in errors[0]


async def test_cmd_stop_runs_with_the_pid_instead_of_sigterm(tmp_path: Path) -> None:
    marker = tmp_path / "stopped-pid"
    base = responder_model("A")
    model = ModelConfig(
        id="A",
        cmd=base.cmd,
        proxy=base.proxy,
        cmd_stop=("sh", "-c", f"echo ${{PID}} > {marker}; kill ${{PID}}"),
    )
    with trio.fail_after(20):
        async with supervised(model) as process:
            await process.ensure_ready()
            pid = process.pid
            await process.stop()
            assert marker.read_text().strip() == str(pid)
            assert not alive(pid)


async def test_missing_executable_fails_the_start_with_the_reason() -> None:
    model = ModelConfig(id="ghost", cmd=("/nonexistent/llama-server",), proxy="http://127.0.0.1:9")
    with trio.fail_after(10):
        async with supervised(model) as process:
            try:
                await process.ensure_ready()
            except Exception as exc:
                assert "/nonexistent/llama-server" in str(exc)
                assert "No such file" in str(exc)
            else:
                raise AssertionError("start must fail")
            assert process.state is ProcessState.STOPPED


async def test_a_crashed_process_is_never_reported_ready_while_its_output_drains(
    tmp_path: Path,
) -> None:
    """A helper that escaped the process group keeps the output pipe open after a crash.

    While trio-swap drains that pipe, the model must already count as not ready,
    so an ensure_ready waits for a fresh process instead of being told "ready".
    """
    port = free_port()
    pidfile = tmp_path / "escaped.pid"
    responder = f"{sys.executable} -m trio_swap responder --port {port} --exit-after 1"
    model = ModelConfig(
        id="crashy",
        cmd=("sh", "-c", f"setsid sleep 5 & echo $! > {pidfile}; exec {responder}"),
        proxy=f"http://127.0.0.1:{port}",
    )
    stopped: list[str] = []
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                process = ModelProcess(model, health_check_timeout=20, on_stopped=stopped.append)
                await nursery.start(process.run)
                await process.ensure_ready()
                first = process.pid
                # the supervisor has seen the exit; the escaped helper holds the pipe
                await until(lambda: process.state is ProcessState.STOPPING)
                assert not alive(first)
                await process.ensure_ready()
                assert process.start_count == 2
                assert process.pid != first
                assert stopped == ["crashy"]  # the crash was reported to the router
                nursery.cancel_scope.cancel()
    finally:
        if pidfile.exists():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pidfile.read_text()), 9)
