"""trio-swap as PID 1 (a container) or a child subreaper: orphans are reaped, SIGTERM stops it.

A model's own children can outlive it; the kernel hands them to PID 1 of the
PID namespace (or the nearest subreaper), and their zombies stay until that
process waits for them. :mod:`trio_swap.reaper` does, without stealing the
exit status of a process trio-swap supervises.

The end-to-end tests run ``trio-swap serve`` twice over: under a wrapper that
makes it a subreaper (any Linux, no privileges), and as PID 1 of a new PID
namespace with ``unshare --pid --fork --mount-proc`` (needs root, or
unprivileged user namespaces: skipped with the reason otherwise). The model's
command leaves an orphan behind that exits when the test says so; the test
then checks that no zombie remains.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import chat, free_port, wait_for
from trio_swap.reaper import (
    OrphanReaper,
    become_child_subreaper,
    is_child_subreaper,
    popen_pids,
    should_reap,
    zombie_children,
)

_PR_SET_CHILD_SUBREAPER = 36


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid) of ``pid``; None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            fields = stat.read().rsplit(b") ", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0].decode(), int(fields[1])


def _cmdlines() -> Iterator[tuple[int, str]]:
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as cmdline:
                    yield int(entry), cmdline.read().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue


def _children(parent: int) -> list[int]:
    return [pid for pid, _ in _cmdlines() if (_stat(pid) or ("", -1))[1] == parent]


def _namespace_pid(pid: int) -> int:
    """``pid`` as its own PID namespace numbers it (the last of ``NSpid:``)."""
    with open(f"/proc/{pid}/status") as status:
        return int(next(line for line in status if line.startswith("NSpid:")).split()[-1])


@contextmanager
def _subreaper() -> Iterator[None]:
    """This test process as a child subreaper, for the test only."""
    assert become_child_subreaper()
    try:
        yield
    finally:
        ctypes.CDLL(None).prctl(_PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


# -- the reaper on its own -------------------------------------------------------------


async def test_a_supervised_process_keeps_its_exit_status() -> None:
    # trio's processes are subprocess.Popen underneath, as the launcher's are.
    with trio.fail_after(30):
        process = await trio.lowlevel.open_process(["/bin/sh", "-c", "exit 7"])
        try:
            await wait_for(lambda: process.pid in zombie_children(), what="the child a zombie")
            assert process.pid in popen_pids()
            reaper = OrphanReaper()
            for _ in range(3):  # seen, then judged (a Popen waits for it), then left alone
                assert reaper.sweep() == []
            assert await process.wait() == 7  # not 0: nobody took its status
        finally:
            process.kill()
            await process.wait()


async def test_an_orphan_is_reaped_on_its_second_sweep_and_only_then(tmp_path: Path) -> None:
    go = tmp_path / "go"
    with trio.fail_after(30), _subreaper():
        assert should_reap() and is_child_subreaper()
        # The shell starts a background subshell and exits: the subshell is orphaned,
        # reparented to this process (a subreaper), and exits with status 5 on "go".
        script = f"(while [ ! -e {go} ]; do sleep 0.01; done; exit 5) >/dev/null & echo $!"
        started = await trio.run_process(["/bin/sh", "-c", script], capture_stdout=True)
        orphan = int(started.stdout)
        await wait_for(lambda: _stat(orphan) == ("S", os.getpid()), what="the orphan, ours")
        go.touch()
        await wait_for(lambda: orphan in zombie_children(), what="the orphan's zombie")
        reaper = OrphanReaper()
        assert reaper.sweep() == []  # first seen: left for one sweep
        assert _stat(orphan) == ("Z", os.getpid())
        assert reaper.sweep() == [(orphan, 5)]
        assert _stat(orphan) is None
        assert reaper.reaped == 1
    assert not is_child_subreaper()


def test_outside_pid_1_and_without_a_subreaper_nothing_is_reaped() -> None:
    assert os.getpid() != 1
    assert not should_reap()


# -- trio-swap serve as a subreaper and as PID 1 ---------------------------------------

#: The model's command: leave an orphan behind (a subshell whose parent exits at
#: once) that waits for the file $1, then exit 3; then exec the responder.
_MODEL_SCRIPT = """\
#!/bin/sh
go="$1"; shift
( sh -c 'while [ ! -e "$1" ]; do sleep 0.05; done; exit 3' orphan "$go" & )
exec "$@"
"""

#: Runs ``trio-swap serve`` as a child subreaper (the attribute survives exec).
_SUBREAPER_WRAPPER = textwrap.dedent(
    """\
    import ctypes, os, sys
    assert ctypes.CDLL(None).prctl(36, 1, 0, 0, 0) == 0
    os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    """
)


def _unshare_refusal() -> str | None:
    """Why ``unshare --pid --fork --mount-proc`` cannot run here, or None if it can."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return "unshare (util-linux) is not installed"
    probe = subprocess.run(
        [unshare, "--pid", "--fork", "--mount-proc", "true"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        why = probe.stderr.decode(errors="replace").strip()
        return f"unshare --pid --fork --mount-proc is refused here: {why}"
    return None


@pytest.mark.parametrize("mode", ["subreaper", "pid1"])
async def test_serve_reaps_a_model_s_orphan_and_stops_cleanly_on_sigterm(
    tmp_path: Path, mode: str
) -> None:
    if mode == "pid1" and (refusal := _unshare_refusal()) is not None:
        pytest.skip(refusal)
    go = tmp_path / "go"
    script = tmp_path / "model.sh"
    script.write_text(_MODEL_SCRIPT)
    model_port = free_port()
    config = tmp_path / "config.yaml"
    config.write_text(
        f"""\
healthCheckTimeout: 30
startPort: {model_port}
logLevel: debug
models:
  alpha:
    cmd: >-
      /bin/sh {script} {go}
      {sys.executable} -m trio_swap responder --port ${{PORT}} --model ${{MODEL_ID}}
"""
    )
    port = free_port()
    serve = [sys.executable, "-m", "trio_swap", "serve", "--config", str(config)]
    serve += ["--listen", f"127.0.0.1:{port}"]
    if mode == "subreaper":
        wrapper = tmp_path / "subreaper.py"
        wrapper.write_text(_SUBREAPER_WRAPPER)
        argv = [sys.executable, str(wrapper), *serve[1:]]
    else:
        argv = ["unshare", "--pid", "--fork", "--mount-proc", *serve]
    url = f"http://127.0.0.1:{port}"
    with trio.fail_after(60), (tmp_path / "serve.log").open("wb") as log:
        process = await trio.lowlevel.open_process(
            argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            if mode == "subreaper":
                trio_swap = process.pid  # the wrapper execs: the same process
            else:  # unshare's child, PID 1 in the new namespace
                trio_swap = await wait_for(
                    lambda: next(iter(_children(process.pid)), None), what="PID 1 to start"
                )
                assert _namespace_pid(trio_swap) == 1

            async with httpx.AsyncClient(base_url=url, timeout=30) as client:

                async def ready() -> bool:
                    try:
                        return (await client.get("/readyz")).status_code == 200
                    except httpx.ConnectError:
                        return False

                await wait_for(ready, what="trio-swap to be ready", timeout=30)
                response = await client.post("/v1/chat/completions", json=chat("alpha"))
                assert response.status_code == 200

            def the_orphan() -> int | None:
                return next((pid for pid, line in _cmdlines() if str(go) in line), None)

            orphan = await wait_for(the_orphan, what="the model's orphan")
            # Its parent exited at once: the kernel handed it to trio-swap.
            await wait_for(
                lambda: (_stat(orphan) or ("", 0))[1] == trio_swap, what="the orphan reparented"
            )
            go.touch()  # the orphan exits (status 3) ...
            # ... and trio-swap reaps it: the pid disappears, no zombie is left.
            await wait_for(lambda: _stat(orphan) is None, what="the orphan's zombie reaped")
            assert not [pid for pid in _children(trio_swap) if (_stat(pid) or ("",))[0] == "Z"]

            model = next(
                pid for pid, line in _cmdlines() if f"--port {model_port}" in line and pid != orphan
            )
            os.kill(trio_swap, signal.SIGTERM)  # to PID 1 itself, as the runtime does
            assert await process.wait() == 0
            await wait_for(lambda: _stat(model) is None, what="the model process gone")
            assert not [pid for pid, line in _cmdlines() if str(tmp_path) in line]
        finally:
            if process.returncode is None:
                os.killpg(process.pid, signal.SIGKILL)
                with trio.CancelScope(shield=True):
                    await process.wait()
            print((tmp_path / "serve.log").read_text())
