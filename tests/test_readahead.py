"""Read-ahead on start (issue 11): a starting model's files are read into the page cache
beside its own load, and the read stops when the model is ready, fails or stops.

The hooks alone (`ReadAhead` under a trio nursery, real files or a warmer that
waits for its stop flag), then end to end: a responder model whose ``files:``
names a dropped file, started through trio-swap, shows the file resident in
``/api/models``.
"""

from __future__ import annotations

import errno
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import trio
import trio.testing

from tests.conftest import chat, free_port, make_config, responder_model, running, wait_for
from tests.test_cli import trio_swap
from tests.test_pagecache import MIB, dropped, write_file
from trio_swap.config.model import PrefetchConfig
from trio_swap.reasons import StopReason
from trio_swap.upstream.pagecache import WarmResult, resident_bytes
from trio_swap.upstream.readahead import MEMORY_SHARE, ReadAhead, ReadAheadResult, room_beside

PLENTY = 1 << 40


class HeldWarmer:
    """A warmer that reads nothing and returns only when told to stop (a slow disk)."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.returned = threading.Event()
        self.paths: list[str] = []

    def __call__(self, path: str, *, stop: Callable[[], bool], limit: int) -> WarmResult:
        self.paths.append(path)
        self.called.set()
        while not stop():
            threading.Event().wait(0.001)
        self.returned.set()
        return WarmResult(0, 0, "stopped")


class StuckWarmer:
    """A warmer stuck in one read that ignores its flag (a network disk that stopped
    answering) until the test releases it."""

    def __init__(self) -> None:
        self.called = threading.Event()
        self.release = threading.Event()
        self.returned = threading.Event()

    def __call__(self, path: str, *, stop: Callable[[], bool], limit: int) -> WarmResult:
        self.called.set()
        self.release.wait()
        self.returned.set()
        return WarmResult(0, 0, "stopped" if stop() else "done")


@pytest.fixture
def a_file(tmp_path: Path) -> str:
    """A small real file (the read-ahead skips paths that are not regular files)."""
    return str(write_file(tmp_path / "a.gguf", MIB))


async def finished(hooks: ReadAhead, model: str) -> ReadAheadResult:
    return await wait_for(lambda: hooks.results.get(model), what=f"{model}'s read-ahead to end")


@pytest.mark.parametrize(
    ("end", "why"),
    [
        pytest.param(lambda h: h.ready("a", 1.0), "ready", id="ready"),
        pytest.param(lambda h: h.start_failed("a"), "start failed", id="start-failed"),
        pytest.param(lambda h: h.stopping("a", StopReason.SWAP), "stopped", id="stopping"),
        pytest.param(lambda h: h.crashed("a"), "crashed", id="crashed"),
        pytest.param(lambda h: h.stopped("a"), "stopped", id="stopped"),
    ],
)
async def test_the_read_stops_when_the_start_ends(
    end: Callable[[ReadAhead], None], why: str, a_file: str
) -> None:
    warmer = HeldWarmer()
    hooks = ReadAhead(lambda model: (a_file,), memory=lambda: PLENTY, warmer=warmer)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.run)
            hooks.starting("a")
            await wait_for(warmer.called.is_set, what="the read to begin")
            end(hooks)
            result = await finished(hooks, "a")
            nursery.cancel_scope.cancel()
    assert result.why == why
    assert warmer.paths == [a_file]


async def test_shutdown_stops_a_read_in_progress(a_file: str) -> None:
    warmer = HeldWarmer()
    hooks = ReadAhead(lambda model: (a_file,), memory=lambda: PLENTY, warmer=warmer)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.run)
            hooks.starting("a")
            await wait_for(warmer.called.is_set, what="the read to begin")
            nursery.cancel_scope.cancel()
        # The thread was abandoned, but shutdown set its flag: it ends at its next block.
        await wait_for(warmer.returned.is_set, what="the worker thread to end")
    assert warmer.paths == [a_file]
    assert "a" not in hooks.results  # an abandoned read reports nothing


async def test_shutdown_does_not_wait_for_a_read_stuck_in_the_kernel(a_file: str) -> None:
    """The worker thread is abandoned: trio-swap stops while the read still hangs, and the
    thread, once it returns, changes nothing."""
    warmer = StuckWarmer()
    hooks = ReadAhead(lambda model: (a_file,), memory=lambda: PLENTY, warmer=warmer)
    finished = hooks.finished
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.run)
            hooks.starting("a")
            await wait_for(warmer.called.is_set, what="the read to begin")
            nursery.cancel_scope.cancel()
        assert not warmer.returned.is_set()  # shut down while the read still hangs
        warmer.release.set()
        await wait_for(warmer.returned.is_set, what="the worker thread to end")
        await trio.testing.wait_all_tasks_blocked()
    assert hooks.results == {}
    assert not finished.is_set()


async def test_a_start_reads_every_file_into_the_page_cache(tmp_path: Path) -> None:
    first = dropped(write_file(tmp_path / "a.gguf", 6 * MIB + 7))
    second = dropped(write_file(tmp_path / "a-mmproj.gguf", 3 * MIB))
    files = (str(first), str(tmp_path / "missing.gguf"), str(second))
    hooks = ReadAhead(lambda model: files if model == "a" else (), memory=lambda: PLENTY)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.run)
            hooks.starting("b")  # no files: nothing to read
            hooks.starting("a")
            result = await finished(hooks, "a")
            nursery.cancel_scope.cancel()
    assert (result.why, result.size) == ("read", 9 * MIB + 7)
    assert resident_bytes(str(first)) == 6 * MIB + 7
    assert resident_bytes(str(second)) == 3 * MIB
    assert "b" not in hooks.results


async def test_never_reads_more_than_a_share_of_mem_available(tmp_path: Path) -> None:
    path = dropped(write_file(tmp_path / "big.gguf", 40 * MIB))
    hooks = ReadAhead(lambda model: (str(path),), memory=lambda: 20 * MIB)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.run)
            hooks.starting("a")
            result = await finished(hooks, "a")
            nursery.cancel_scope.cancel()
    assert result.why.startswith("limit")
    assert result.read <= 20 * MIB * MEMORY_SHARE


async def test_the_room_leaves_out_the_running_models_files(tmp_path: Path) -> None:
    """MemAvailable 60 MiB, another running model's 30 MiB file: 90 % of 30 MiB may be read
    (one 16 MiB block of the 40 MiB file; all of it without the subtraction). The starting
    model's own file (also listed as running) is not taken out of the room."""
    path = dropped(write_file(tmp_path / "big.gguf", 40 * MIB))
    other = tmp_path / "other.gguf"
    with other.open("wb") as file:
        file.truncate(30 * MIB)  # its size is what counts
    hooks = ReadAhead(
        lambda model: (str(path),),
        running_files=lambda: (str(other), str(path), str(other)),
        memory=lambda: 60 * MIB,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.run)
            hooks.starting("a")
            result = await finished(hooks, "a")
            nursery.cancel_scope.cancel()
    assert result.why.startswith("limit: 90% of MemAvailable beside the running models")
    assert 0 < result.read <= 30 * MIB * MEMORY_SHARE
    assert room_beside(40 * MIB, [str(other), str(other)]) == 10 * MIB  # counted once
    assert room_beside(20 * MIB, [str(other)]) == 0
    assert room_beside(None, []) == 0


async def test_fifos_and_devices_are_skipped(tmp_path: Path, a_file: str) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    warmer = HeldWarmer()
    files = (str(fifo), "/dev/zero", str(tmp_path), a_file)
    hooks = ReadAhead(lambda model: files, memory=lambda: PLENTY, warmer=warmer)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(hooks.run)
            hooks.starting("a")
            await wait_for(warmer.called.is_set, what="the read to begin")
            hooks.ready("a", 1.0)
            result = await finished(hooks, "a")
            nursery.cancel_scope.cancel()
    assert warmer.paths == [a_file]
    assert result.size == MIB


async def test_a_fifo_in_files_does_not_hang_a_served_model_or_shutdown(
    tmp_path: Path,
) -> None:
    """The reported hang, as a user meets it: ``files: [a FIFO, /dev/zero, a file]``, one
    request, SIGTERM. The read-ahead ends (its log line), nothing holds the FIFO open, and
    trio-swap exits 0 (it used to hang in ``open`` of the FIFO until a second SIGTERM)."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    weights = write_file(tmp_path / "weights.gguf", MIB)
    port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
healthCheckTimeout: 30
startPort: {free_port()}
models:
  piped:
    cmd: {sys.executable} -m trio_swap responder --port {port} --model piped
    proxy: http://127.0.0.1:{port}
    files: [{fifo}, /dev/zero, {weights}]
"""
    )
    with trio.fail_after(30):
        async with trio_swap("--config", str(config)) as (process, url):
            async with httpx.AsyncClient(base_url=url, timeout=30) as client:
                response = await client.post("/v1/chat/completions", json=chat("piped"))
                assert response.status_code == 200
            assert process.stdout is not None
            output = b""
            while b"model piped: read ahead" not in output:
                chunk = await process.stdout.receive_some()
                assert chunk, output.decode(errors="replace")
                output += chunk
            assert re.search(rb"model piped: read ahead .+ of 1\.0 MiB", output), output
            with pytest.raises(OSError) as excinfo:  # no reader: no thread blocked in open
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            assert excinfo.value.errno == errno.ENXIO
            process.send_signal(signal.SIGTERM)
            assert await process.wait() == 0


async def test_before_run_a_start_is_not_read_ahead() -> None:
    warmer = HeldWarmer()
    hooks = ReadAhead(lambda model: ("/m/a.gguf",), memory=lambda: PLENTY, warmer=warmer)
    hooks.starting("a")
    hooks.ready("a", 1.0)
    assert not warmer.called.is_set()


async def test_a_starting_model_shows_its_files_resident(tmp_path: Path) -> None:
    """End to end: a responder still loading (503 for a minute) has its file read ahead,
    ``/api/models`` says so, and a model with ``prefetch: false`` is left alone."""
    path = dropped(write_file(tmp_path / "weights.gguf", 24 * MIB + 3))
    other = dropped(write_file(tmp_path / "other.gguf", 4 * MIB))
    loading = responder_model("loading", "--load-delay", "60", files=(str(path),))
    off = responder_model("off", files=(str(other),), prefetch=False)
    config = make_config(loading, off)
    config = type(config)(  # no idle prefetching: only the read-ahead may read
        source=config.source,
        models=config.models,
        start_port=config.start_port,
        log_to_stdout="none",
        prefetch=PrefetchConfig(budget=0),
    )
    with trio.fail_after(30):
        async with running(config) as harness:
            rows = await harness.models()
            # The responder's --model names no file: listed, but with no size.
            assert rows["loading"]["files"][0] == {  # type: ignore[index]
                "path": "loading",
                "bytes": None,
                "resident_bytes": None,
            }
            async with trio.open_nursery() as nursery:
                answers: list[int] = []

                async def load() -> None:
                    response = await harness.client.post("/api/models/load/loading")
                    answers.append(response.status_code)

                nursery.start_soon(load)
                await harness.wait_for_state("loading", "starting")

                async def fully_resident() -> bool:
                    files = (await harness.models())["loading"]["files"]
                    return files[1] == {  # type: ignore[index,no-any-return]
                        "path": str(path),
                        "bytes": 24 * MIB + 3,
                        "resident_bytes": 24 * MIB + 3,
                    }

                await wait_for(fully_resident, what="the read-ahead to fill the page cache")
                await harness.client.post("/api/models/unload")
            assert answers == [503]  # the load was stopped, not completed
            response = await harness.client.post("/api/models/load/off")
            assert response.status_code == 200
            lines = harness.server.logs.proxy.lines()
            finished = re.compile(r"model loading: read ahead .+ of 24\.0 MiB in .+s \(read\)")
            assert any(finished.search(line) for line in lines)
            assert not any("model off: read ahead" in line for line in lines)
            files = (await harness.models())["off"]["files"]
            assert files[1]["resident_bytes"] == 0  # type: ignore[index]
